"""The teacher pass into the value store, on a real tiny Llama teacher (tests/conftest.py):
values against a float64 full-logits reference, padding invariance, cache keys, resume,
two processes on one key, size per token on real HH data, flat memory, bad rows, the CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import sys
import time
import tracemalloc
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tvkd.cli import main
from tvkd.config import PrecomputeConfig
from tvkd.data import DataError, PreferencePair, load_pairs
from tvkd.models import load_causal_lm, load_tokenizer
from tvkd.precompute import (
    PrecomputeStopped,
    precompute_key,
    precompute_values,
)
from tvkd.store import MANIFEST, ValueStore, shard_name
from tvkd.teacher import UnsupportedTeacher, compute_pair_signals
from tvkd.tokenize import tokenize_pair

HH_TEST = Path("/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz")
_SENTENCE = (
    "the quick brown fox jumps over a lazy dog while helpful assistants answer every question "
    "politely and clearly because people ask why the sky is blue"
)
_WORDS = _SENTENCE.split()


def _pairs(n: int, seed: int = 0, max_words: int = 30) -> list[PreferencePair]:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))

    return [
        PreferencePair(
            row=i,
            prompt=f"Human: {text(3, 15)}\n\nAssistant:",
            chosen=" " + text(1, max_words),
            rejected=" " + text(1, max_words),
        )
        for i in range(n)
    ]


@pytest.fixture(autouse=True)
def _fingerprint_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # model_fingerprint caches per-file hashes under $TVKD_CACHE_DIR: keep tests out of ~/.cache.
    monkeypatch.setenv("TVKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tvkd-cache"))


@pytest.fixture(scope="module")
def teacher_model(precompute_teacher: str) -> Any:
    return load_causal_lm(precompute_teacher)


@pytest.fixture(scope="module")
def teacher_model64(precompute_teacher: str) -> Any:
    return load_causal_lm(precompute_teacher, dtype=torch.float64)


@pytest.fixture(scope="module")
def teacher_tokenizer(precompute_teacher: str) -> Any:
    return load_tokenizer(precompute_teacher)


def _run(teacher: str, pairs: list[PreferencePair], root: Path, model: Any, tok: Any, **kw: Any) -> Any:
    run_kw = {k: kw.pop(k) for k in ("should_stop", "progress", "on_error") if k in kw}
    return precompute_values(
        teacher, pairs, PrecomputeConfig(**kw), store_root=root, model=model, tokenizer=tok, **run_kw
    )


# --------------------------------------------------------------------------------------------
# Values against a float64 reference


def _reference(model64: Any, ids: list[int], prompt_len: int, q_source: str, beta: float, k: int) -> dict:
    with torch.no_grad():
        z = model64(torch.tensor([ids])).logits[0]
    assert z.dtype == torch.float64
    zs = z[prompt_len - 1 : len(ids)]  # states s_1 .. s_{T+1}
    values = beta * torch.logsumexp(zs / beta, -1)
    if q_source == "logprobs":
        values = values - torch.logsumexp(zs, -1)
    labels = torch.tensor(ids[prompt_len:])
    token_logits = zs[:-1].gather(-1, labels[:, None])[:, 0]
    top = zs.topk(k, -1)
    return {
        "values": values.numpy(),
        "token_logits": token_logits.numpy(),
        "token_logps": (token_logits - torch.logsumexp(zs[:-1], -1)).numpy(),
        "topk_logits": top.values.numpy(),
        "topk_ids": top.indices.numpy(),
    }


@pytest.mark.parametrize(("q_source", "beta"), [("logits", 1.0), ("logprobs", 0.5)])
def test_store_matches_float64_full_logits(
    tmp_path: Path,
    precompute_teacher: str,
    teacher_model: Any,
    teacher_tokenizer: Any,
    teacher_model64: Any,
    q_source: str,
    beta: float,
) -> None:
    pairs = _pairs(3, seed=1)
    k = 4
    res = _run(
        precompute_teacher, pairs, tmp_path, teacher_model, teacher_tokenizer,
        q_source=q_source, value_beta=beta, topk=k, token_stats=True, max_length=256, shard_size=2,
        batch_tokens=200, chunk_size=7,
    )  # fmt: skip
    for i, pair in enumerate(pairs):
        tp = tokenize_pair(teacher_tokenizer, pair, max_length=256)
        got = res.store.pair(i)
        for side in ("chosen", "rejected"):
            resp = getattr(tp, f"{side}_ids")
            ref = _reference(teacher_model64, tp.prompt_ids + resp, len(tp.prompt_ids), q_source, beta, k)
            assert getattr(got, f"{side}_values").shape == (len(resp) + 1,)
            for name in ("values", "token_logps", "token_logits", "topk_logits"):
                stored = getattr(got, f"{side}_{name}")
                assert stored.dtype == np.float32
                np.testing.assert_allclose(
                    stored, ref[name], rtol=1e-5, atol=1e-6, err_msg=f"{i} {side} {name}"
                )
            np.testing.assert_array_equal(getattr(got, f"{side}_topk_ids"), ref["topk_ids"])


def test_gpt2_style_teacher(teacher_tokenizer: Any) -> None:
    # GPT-2 keeps its decoder under `transformer` and ties the head to the embeddings.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=512, n_positions=256, n_embd=32, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(cfg).eval()
    config = PrecomputeConfig(topk=3, token_stats=True)
    tp, got = compute_pair_signals(model, teacher_tokenizer, _pairs(1, seed=10)[0], config)
    ids = tp.prompt_ids + tp.rejected_ids
    ref = _reference(model.double(), ids, len(tp.prompt_ids), "logits", 1.0, 3)
    np.testing.assert_allclose(got.rejected_values, ref["values"], rtol=1e-5)
    np.testing.assert_allclose(got.rejected_token_logps, ref["token_logps"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.rejected_topk_ids, ref["topk_ids"])


def test_values_do_not_depend_on_batching(
    tmp_path: Path, precompute_teacher: str, teacher_model: Any, teacher_tokenizer: Any
) -> None:
    pairs = _pairs(6, seed=2, max_words=60)
    pairs[0] = PreferencePair(row=0, prompt="Human: hi\n\nAssistant:", chosen=" yes", rejected=" no")
    alone = _run(precompute_teacher, pairs, tmp_path / "a", teacher_model, teacher_tokenizer, batch_tokens=1)
    packed = _run(
        precompute_teacher, pairs, tmp_path / "b", teacher_model, teacher_tokenizer, batch_tokens=10**6
    )
    assert alone.key == packed.key  # batch_tokens is not part of the key
    for i in range(len(pairs)):
        a, b = alone.store.pair(i), packed.store.pair(i)
        for side in ("chosen_values", "rejected_values"):
            np.testing.assert_allclose(getattr(a, side), getattr(b, side), rtol=1e-5)
    tp, single = compute_pair_signals(teacher_model, teacher_tokenizer, pairs[0], PrecomputeConfig())
    assert len(single.chosen_values) == len(tp.chosen_ids) + 1
    np.testing.assert_allclose(single.chosen_values, packed.store.pair(0).chosen_values, rtol=1e-5)
    np.testing.assert_allclose(single.rejected_values, packed.store.pair(0).rejected_values, rtol=1e-5)


def test_bf16_keeps_float32_values_close(
    tmp_path: Path, precompute_teacher: str, teacher_model: Any, teacher_tokenizer: Any
) -> None:
    pairs = _pairs(3, seed=3)
    fp32 = _run(precompute_teacher, pairs, tmp_path, teacher_model, teacher_tokenizer)
    bf16 = _run(precompute_teacher, pairs, tmp_path, teacher_model, teacher_tokenizer, bf16=True)
    assert bf16.key != fp32.key and not bf16.cached
    assert bf16.store.fields["precision"] == "bf16"
    got, want = bf16.store.pair(0).chosen_values, fp32.store.pair(0).chosen_values
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=0.05)


def test_unsupported_heads_are_refused(precompute_teacher: str, teacher_tokenizer: Any) -> None:
    pair = _pairs(1)[0]
    scaled = load_causal_lm(precompute_teacher)
    scaled.config.logit_scale = 2.0  # a Cohere-style scaled head
    with pytest.raises(UnsupportedTeacher, match="logit_scale"):
        compute_pair_signals(scaled, teacher_tokenizer, pair, PrecomputeConfig())
    # A soft-cap the model's own forward does not apply: the one-off logits check catches it.
    capped = load_causal_lm(precompute_teacher)
    capped.config.final_logit_softcapping = 0.5
    with pytest.raises(UnsupportedTeacher, match="differ from the model's logits"):
        compute_pair_signals(capped, teacher_tokenizer, pair, PrecomputeConfig())


# --------------------------------------------------------------------------------------------
# Cache keys, resume, concurrency


def test_same_key_is_a_cache_hit_and_settings_change_the_key(
    tmp_path: Path, precompute_teacher: str, teacher_model: Any, teacher_tokenizer: Any
) -> None:
    pairs = _pairs(3, seed=4)
    first = _run(precompute_teacher, pairs, tmp_path, teacher_model, teacher_tokenizer, shard_size=2)
    assert not first.cached and first.tokens > 0 and first.tokens_per_second > 0
    # model=None: a hit must not need the teacher's weights loaded.
    again = precompute_values(
        precompute_teacher, pairs, PrecomputeConfig(batch_tokens=64, chunk_size=5), store_root=tmp_path
    )
    assert again.cached and again.tokens == 0 and again.store.path == first.store.path
    assert again.key == first.key

    def key(p: list[PreferencePair] = pairs, **kw: Any) -> str:
        return precompute_key(precompute_teacher, p, PrecomputeConfig(**kw), tokenizer=teacher_tokenizer)[0]

    assert key() == first.key
    changed = [
        key(q_source="logprobs"),
        key(value_beta=0.5),
        key(max_length=256),  # (512 would be the default's: the teacher's window caps 1024 at 512)
        key(topk=2),
        key(token_stats=True),
        key(bf16=True),
        key([*pairs[:2], PreferencePair(row=2, prompt="Human: x\n\nAssistant:", chosen=" a", rejected=" b")]),
    ]
    assert len({first.key, *changed}) == len(changed) + 1
    other_data = _run(precompute_teacher, pairs[:2], tmp_path, teacher_model, teacher_tokenizer)
    assert not other_data.cached and other_data.store.path != first.store.path


def _pair_tokens(tok: Any, pairs: list[PreferencePair]) -> int:
    tps = [tokenize_pair(tok, p, max_length=1024) for p in pairs]
    return sum(2 * len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in tps)


def test_stop_and_resume_recompute_only_missing_shards(
    tmp_path: Path, precompute_teacher: str, teacher_model: Any, teacher_tokenizer: Any
) -> None:
    pairs = _pairs(6, seed=5)
    cfg = {"shard_size": 2, "batch_tokens": 64}
    full = _run(precompute_teacher, pairs, tmp_path / "full", teacher_model, teacher_tokenizer, **cfg)
    assert full.tokens == _pair_tokens(teacher_tokenizer, pairs)

    root = tmp_path / "resumed"
    folder = root / full.key
    calls: list[tuple[int, int]] = []
    with pytest.raises(PrecomputeStopped):
        _run(
            precompute_teacher, pairs, root, teacher_model, teacher_tokenizer,
            should_stop=lambda: (folder / shard_name(0)).exists(), progress=lambda d, t: calls.append((d, t)),
            **cfg,
        )  # fmt: skip
    assert (folder / shard_name(0)).is_file() and not (folder / shard_name(1)).exists()
    assert not (folder / MANIFEST).exists() and ValueStore.find(root, full.key) is None
    assert calls[-1] == (2, 6)

    calls.clear()
    resumed = _run(
        precompute_teacher, pairs, root, teacher_model, teacher_tokenizer,
        progress=lambda d, t: calls.append((d, t)), **cfg,
    )  # fmt: skip
    assert not resumed.cached
    assert resumed.tokens == _pair_tokens(teacher_tokenizer, pairs[2:])  # shard 0 not redone
    assert calls[0] == (2, 6) and calls[-1] == (6, 6)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    for i in range(len(pairs)):
        a, b = full.store.pair(i), resumed.store.pair(i)
        np.testing.assert_array_equal(a.chosen_values, b.chosen_values)
        np.testing.assert_array_equal(a.rejected_values, b.rejected_values)
    assert resumed.store.manifest["teacher_tokens"] == full.tokens  # totals cover both runs


def _concurrent_worker(teacher: str, pairs: list, root: str, cache_dir: str, barrier: Any, out: Any) -> None:
    os.environ["TVKD_CACHE_DIR"] = cache_dir
    torch.set_num_threads(1)
    barrier.wait(timeout=120)
    # Slow each batch down so the computing process surely holds the lock when the other arrives.
    res = precompute_values(
        teacher,
        pairs,
        PrecomputeConfig(shard_size=2, batch_tokens=64),
        store_root=root,
        progress=lambda done, total: time.sleep(0.2),
    )
    out.put((res.cached, res.tokens, str(res.store.path), res.waited))


def test_two_processes_on_one_key_compute_it_once(
    tmp_path: Path, precompute_teacher: str, teacher_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Spawned children re-run __main__ from its path; after the dashboard tests' AppTest that is
    # dashboard/app.py (the children died in its login gate and the queue stayed empty in a full run).
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    pairs = _pairs(6, seed=6)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    args = (precompute_teacher, pairs, str(tmp_path), os.environ["TVKD_CACHE_DIR"], barrier, out)
    procs = [ctx.Process(target=_concurrent_worker, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    results.sort()  # (cached=False, ...) first
    (c0, tokens0, path0, _), (c1, tokens1, path1, waited1) = results
    assert (c0, c1) == (False, True)
    assert tokens0 == _pair_tokens(teacher_tokenizer, pairs) and tokens1 == 0
    assert path0 == path1
    assert waited1 > 0.2  # the second one found the lock held and waited for the first
    store = ValueStore.open(path0)
    assert store.manifest["teacher_tokens"] == tokens0  # every shard computed exactly once


# --------------------------------------------------------------------------------------------
# Real data: size per token, bad rows; memory


def test_store_size_per_response_token_on_hh(
    tmp_path: Path, precompute_teacher: str, teacher_model: Any, teacher_tokenizer: Any
) -> None:
    pairs, _ = load_pairs(HH_TEST, on_error="drop", limit=200)
    res = _run(
        precompute_teacher,
        pairs,
        tmp_path,
        teacher_model,
        teacher_tokenizer,
        max_length=512,
        batch_tokens=16384,
    )
    store = res.store
    present = len(store) - len(store.missing)
    assert present > 100 and res.report.dropped == len(store.missing)
    bpt = store.bytes_per_response_token()
    print(
        f"\nHH {len(pairs)} pairs ({present} fit max_length 512): {store.response_tokens()} response "
        f"tokens, {store.nbytes()} bytes, {bpt:.2f} bytes/response token, "
        f"{res.tokens_per_second:.0f} teacher tokens/s"
    )
    assert bpt <= 8.0


def test_too_long_pairs_are_missing_or_raise(
    tmp_path: Path, precompute_teacher: str, teacher_model: Any, teacher_tokenizer: Any
) -> None:
    pairs = _pairs(4, seed=7, max_words=5)
    pairs[2] = PreferencePair(row=2, prompt=pairs[2].prompt, chosen=" fox" * 200, rejected=" no")
    res = _run(
        precompute_teacher, pairs, tmp_path, teacher_model, teacher_tokenizer, max_length=64, shard_size=3
    )
    assert res.store.missing == {2} and 2 not in res.store
    with pytest.raises(KeyError):
        res.store.pair(2)
    assert res.report.dropped == 1 and res.report.issues[0].code == "too_long"
    assert res.store.manifest["missing"] == [2]
    assert len(res.store.pair(3).chosen_values) > 1
    with pytest.raises(DataError) as exc:  # a cache hit with missing pairs still refuses
        _run(
            precompute_teacher,
            pairs,
            tmp_path,
            teacher_model,
            teacher_tokenizer,
            max_length=64,
            on_error="raise",
        )
    assert exc.value.report.issues[0].row == 2
    with pytest.raises(DataError, match="too_long"):  # and so does a fresh run, before any work
        _run(
            precompute_teacher,
            pairs,
            tmp_path / "x",
            teacher_model,
            teacher_tokenizer,
            max_length=64,
            on_error="raise",
        )
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").rglob("shard-*"))


def _traced_peak(teacher: str, pairs: list[PreferencePair], root: Path, model: Any, tok: Any) -> int:
    """Peak of Python-visible allocations (numpy arrays and token lists included) over the
    dataset pass; the first progress call (before any shard) starts the measurement, so the
    fingerprinting and loading before it do not count."""

    def progress(done: int, total: int) -> None:
        if done == 0:
            tracemalloc.reset_peak()

    tracemalloc.start()
    try:
        _run(teacher, pairs, root, model, tok, topk=64, shard_size=4, batch_tokens=256, progress=progress)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_dataset(
    tmp_path: Path, precompute_teacher: str, teacher_model: Any, teacher_tokenizer: Any
) -> None:
    # Top-k rows make each pair's results large (~64·(T+1)·8 bytes a side): holding the whole
    # dataset's results (or token ids) would raise the Python-visible peak far above one shard's.
    small, large = _pairs(8, seed=8), _pairs(48, seed=8)
    _traced_peak(
        precompute_teacher, small, tmp_path / "warm", teacher_model, teacher_tokenizer
    )  # lazy imports
    peak_small = _traced_peak(precompute_teacher, small, tmp_path / "s", teacher_model, teacher_tokenizer)
    peak_large = _traced_peak(precompute_teacher, large, tmp_path / "l", teacher_model, teacher_tokenizer)
    large_data = sum(p.stat().st_size for p in (tmp_path / "l").rglob("shard-*"))
    assert large_data > 2 * peak_small  # accumulating would be visible
    assert peak_large < 1.5 * peak_small, (peak_small, peak_large, large_data)


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_precompute_end_to_end(
    tmp_path: Path,
    precompute_teacher: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in _pairs(5, seed=9)]
    rows.append({"prompt": "Human: hi\n\nAssistant:", "chosen": " same", "rejected": " same"})  # bad row
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("TVKD_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    argv = ["precompute", "--teacher", precompute_teacher, "--data", str(data), "--max-length", "128"]

    assert main(argv) == 1  # the identical row is an error unless dropped
    assert "identical" in capsys.readouterr().err

    assert main([*argv, "--drop-bad-rows", "--token-stats"]) == 0
    out = capsys.readouterr().out
    assert "cached:     no" in out and "5 of 5" in out and "bytes/response token" in out
    assert "1 dropped" in out  # the data report of the dropped row
    key = next(line.split()[-1] for line in out.splitlines() if line.startswith("key:"))
    store = ValueStore.open(tmp_path / "artifacts" / "values" / key)
    assert store.manifest["fields"]["token_stats"] is True

    assert main([*argv, "--drop-bad-rows", "--token-stats", "--limit", "5"]) == 0
    assert "cached:     yes" in capsys.readouterr().out  # the first 5 rows are the same 5 pairs
