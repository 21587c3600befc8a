"""tvkd.dcp in one process: a sharded (DCP) checkpoint and a one-process checkpoint both load
into a fresh model and optimizer exactly, tied embeddings included (Llama-3.2-1B ties them)."""

from __future__ import annotations

import torch

from tvkd import checkpoint as ckpt_io
from tvkd import dcp
from tvkd.model_prep import build_tiny_model
from tvkd.models import load_causal_lm


def trained(folder):
    torch.manual_seed(0)
    model = load_causal_lm(str(folder), dtype=torch.float32, device="cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ids = torch.arange(12)[None]
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_both_formats_restore_exactly_with_tied_embeddings(tmp_path) -> None:
    folder = build_tiny_model(tmp_path / "tied", seed=0, tie_word_embeddings=True)
    model, optimizer, scheduler = trained(folder)
    kw = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "keep": 2}
    sharded = dcp.save_sharded(tmp_path / "a", 1, state={"step": 1, "config": {}}, **kw)
    plain = ckpt_io.save_checkpoint(tmp_path / "b", 1, state={"step": 1, "config": {}}, **kw)
    assert dcp.is_sharded(sharded) and not dcp.is_sharded(plain)
    for ckpt in (sharded, plain):
        fresh = load_causal_lm(str(folder), dtype=torch.float32, device="cpu")
        opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        state = dcp.load_any(ckpt, model=fresh, optimizer=opt, scheduler=sched, device=torch.device("cpu"))
        assert state["step"] == 1 and sched.last_epoch == scheduler.last_epoch
        for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
            assert torch.equal(p, q), name
            assert torch.equal(optimizer.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"]), name
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # still tied
