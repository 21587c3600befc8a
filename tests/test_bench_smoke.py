"""Smoke runs of the bench scripts at minimal sizes, so they cannot rot unnoticed.

Each script runs as a user would run it (`python bench/NAME.py --smoke`) and must exit 0 and
print its table. Nothing here asserts a timing: the numbers of a smoke run mean nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def _require_hh() -> None:
    # A missing data file is a failure with a reason, never a silent skip.
    assert HH.is_file(), f"the HH test file is missing at {HH} (the benches read ../shared/data)"


def _run(script: str, *args: str, tmp_path: Path, timeout: int = 600) -> str:
    _require_hh()
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_step_time_smoke(tmp_path):
    out = _run("step_time.py", "--smoke", "--threads", "1", tmp_path=tmp_path)  # TRL: in the dev extra
    assert "| method" in out and "median step ms" in out
    names = (
        "TVKD (α=0.7)",
        "TVKD (α=0.7), bf16",
        "DPO (same step, α=0)",
        "TRL DPOTrainer, ref forward every step",
        "TRL DPOTrainer, precompute_ref_log_probs",
        "TRL DPOTrainer, precompute_ref_log_probs, bf16",
    )
    for name in names:
        assert f"| {name} " in out  # a timed row of the step table
    assert "TVKD ÷ DPO step" in out and "÷ TRL's best (" in out
    # padding_free is either timed or reported as not run, never silently dropped
    assert "padding_free" in out


@pytest.mark.slow
def test_store_bytes_smoke(tmp_path):
    out = _run("store_bytes.py", "--smoke", "--threads", "1", tmp_path=tmp_path)
    assert "B/token" in out and "values only (default)" in out and "values + top-50" in out


@pytest.mark.slow
def test_gpu_cpu_smoke(tmp_path):
    # every lever in one call, as on a lent GPU (aot_eager: no minutes of inductor C++ builds)
    out = _run("gpu.py", "--cpu-smoke", "--threads", "1", "--compile-backend", "aot_eager", tmp_path=tmp_path)
    assert "## Correctness" in out and "FAIL" not in out and "PASS" in out
    assert "## Precompute" in out and "## Training step" in out and "## Packing" in out
    assert "naive DPO step (full logits, ref forward)" in out
    for row in (
        "tvkd step + activation checkpointing",
        "tvkd step, micro batch 4 pairs",
        "tvkd step + torch.compile",
        "tvkd precompute (exact head) + torch.compile",
        "tvkd step, random lengths, packed (sdpa)",
        "packed = padded, sdpa",
        "compiled = eager log-probs",
    ):
        assert f"| {row}" in out, row
    assert "Error:" not in out and "skipped" not in out  # every row was measured
    data = json.loads((tmp_path / "out" / "gpu.json").read_text())  # written to $OUT like on the device
    assert {"correctness", "precompute", "train", "packing"} <= set(data)
    assert all(m["tokens_per_s"] > 0 for m in data["train"])


@pytest.mark.slow
def test_gpu_budget_reports_skipped_rows(tmp_path):
    out = _run(
        "gpu.py", "--cpu-smoke", "--threads", "1", "--skip-correctness", "--levers", "", "--budget-s", "0",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert "skipped: --budget-s spent" in out and "## Training step" in out


@pytest.mark.slow
def test_precompute_time_smoke(tmp_path):
    out = _run("precompute_time.py", "--smoke", "--threads", "1", tmp_path=tmp_path)
    assert "| path" in out and "tokens/s" in out and "B/response token" in out
    assert "TVKD precompute_values" in out and "research method: fp16" in out


@pytest.mark.slow
def test_levers_smoke(tmp_path):
    # aot_eager: the compile path without minutes of inductor C++ builds on a CI core
    out = _run("levers.py", "--smoke", "--threads", "1", "--compile-backend", "aot_eager", tmp_path=tmp_path)
    assert "| setting" in out and "time ÷ plain" in out
    for name in (
        "padding_free",
        "fused head off",
        "activation checkpointing on",
        "micro batch",
        "torch.compile",
    ):
        assert name in out


@pytest.mark.slow
def test_generation_eval_smoke(tmp_path):
    out = _run("generation_eval.py", "--smoke", tmp_path=tmp_path)
    assert "| generation evaluation | train s | evaluate s |" in out
    assert "| off |" in out and "2 prompts × 4 tokens, reward model" in out


@pytest.mark.slow
def test_scale_smoke(tmp_path):
    out_json = tmp_path / "scale.json"
    args = ["--smoke", "--work", str(tmp_path / "work"), "--out", str(out_json)]
    out = _run("scale.py", *args, tmp_path=tmp_path)
    assert "s/step (median)" in out and "FSDP2, 2 processes" in out
    rows = {r["run"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert set(rows) == {"one process", "DDP, 2 processes", "FSDP2, 2 processes"}
    # The 2-process runs are the one-process run (the smoke run's steps are not clipped).
    assert all(r["max_abs_weight_diff"] <= 1e-5 for r in rows.values())
    assert rows["DDP, 2 processes"]["bytes_per_step_per_rank"] == 8.0 * rows["one process"]["params"] / 2


@pytest.mark.slow
def test_precompute_scale_smoke(tmp_path):
    out = _run("precompute_scale.py", "--smoke", tmp_path=tmp_path)
    assert "| 2 torchrun ranks, 1 thread each " in out and "| 1 process, 1 thread " in out
    assert out.count("| equal ") == 2  # both other stores equal the one-process store, bit for bit
