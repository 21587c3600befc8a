"""bench/replicate.py: the --quick form end to end (JSON, table, plot) and its statistics."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _replicate_stats as st  # noqa: E402


def test_quick_run_writes_json_table_and_plot(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "replicate.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "OUT": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "replicate.json").read_text())
    names = [r["method"] for r in result["table"]]
    assert names == ["SFT-only", "DPO", "TVKD α0.7", "implicit +sft"]
    assert result["seeds"] == [0, 1] and len(result["runs"]) == 2 * len(names)
    for r in result["table"]:
        assert 0.0 <= r["gold"] <= 1.0 and 0.0 <= r["dev_gold"] <= 1.0
        assert (r["vs_dpo"] is None) == (r["method"] == "DPO")
        if r["vs_dpo"]:
            p, p_holm = r["vs_dpo"]["p"], r["vs_dpo"]["p_holm"]
            assert r["vs_dpo"]["n"] == 2 and (p is None or p_holm >= p)
    # every run is paired with DPO on the same seed: the differences are recomputable from the runs
    by = {(x["method"], x["seed"]): x["gold"]["test"] for x in result["runs"]}
    want = sum(by[("TVKD α0.7", s)] - by[("DPO", s)] for s in (0, 1)) / 2
    assert result["table"][2]["vs_dpo"]["mean"] == pytest.approx(want)
    sources = {a["source"]: a for a in result["shaping_accuracy"]}
    ll = sources["log-likelihood Σ log π_φ (shaping=logprob)"]
    assert ll["n"] == 150 * 4 and ll["low"] <= ll["accuracy"] <= ll["high"]
    assert result["teacher"]["params"] > result["student"]["params"]
    assert result["cpu_s"] > 0 and result["wall_s"] > 0 and result["commit"]
    assert "| method" in proc.stdout and "Teacher shaping accuracy" in proc.stdout
    assert (out / "replicate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_holm_and_paired_intervals():
    # Holm: sorted p 0.01, 0.02, 0.04 × (3, 2, 1) → 0.03, 0.04, 0.04 (monotone), input order kept
    assert st.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    kept = st.holm([0.5, math.nan])
    assert kept[0] == 0.5 and math.isnan(kept[1])  # a NaN p is neither counted nor changed
    p = st.paired([0.5, 0.6, 0.7, 0.9], [0.4, 0.4, 0.5, 0.6])  # d = 0.1, 0.2, 0.2, 0.3
    assert p.mean == pytest.approx(0.2) and p.wins == 4 and p.n == 4
    half = 3.182446305284263 * math.sqrt(2 / 300) / 2  # t(0.975, 3) · sd / √n, sd² = 0.02/3
    assert (p.low, p.high) == pytest.approx((0.2 - half, 0.2 + half))
    assert p.p == pytest.approx(0.01628, abs=1e-4)  # t = 0.2 / (sd/2) = 4.899, df 3, two-sided
    lo, hi = st.wilson(90, 100)
    assert lo == pytest.approx(0.8256, abs=1e-3) and hi == pytest.approx(0.9448, abs=1e-3)
    with pytest.raises(ValueError, match="equal lengths"):
        st.paired([1.0], [1.0, 2.0])
