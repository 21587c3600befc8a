"""`tvkd demo`'s command line: the pipeline by default, `--real` the SmolLM2 run with its options
as before; the table's verdict line says which students ended above their SFT start."""

from __future__ import annotations

from typing import Any

import pytest

from tvkd.cli import build_parser
from tvkd.cli import demo_pipeline as dp


def test_the_default_is_the_pipeline_and_real_keeps_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from tvkd.cli import demo_real

    ran: list[str] = []
    monkeypatch.setattr(demo_real, "run", lambda args: ran.append("real") or 0)
    monkeypatch.setattr(dp, "run", lambda args: ran.append("pipeline") or 0)
    default = build_parser().parse_args(["demo"])
    assert (default.real, default.split, default.scale, default.workers) == (False, "test", "demo", 2)
    assert default.func(default) == 0 and ran == ["pipeline"]
    real = build_parser().parse_args(["demo", "--real"])
    assert (real.pairs, real.eval_pairs, real.student_layers, real.steps) == (240, 40, 12, 25)
    assert (real.batch_size, real.learning_rate, real.alpha, real.port) == (8, 2e-5, 0.7, 8000)
    assert real.func(real) == 0 and ran == ["pipeline", "real"]


def _row(job: str, before: float | None, after: float | None) -> dict[str, Any]:
    row = dict.fromkeys(dp.COLUMNS)
    row.update({"job": job, "gold before": before, "gold after": after})
    if before is not None and after is not None:
        row["change"] = after - before
    return row


def test_the_verdict_names_the_students_that_ended_above_their_start() -> None:
    teacher = _row("teacher DPO", 0.5, 0.6)  # a teacher's gain is not a student's
    rows = [teacher, _row("student SFT", None, 0.3), _row("student DPO (α 0)", 0.3, 0.2)]
    assert dp.verdict([*rows, _row("student recommended", 0.3, 0.31)]) == (
        "Ended above the SFT student's gold accuracy: recommended (of 2)."
    )
    assert dp.verdict([*rows, _row("student recommended", 0.3, 0.3)]).startswith("No distilled student")
    table = dp.render(rows).splitlines()
    assert table[0].startswith("job") and "-10.0 pt" in table[4] and len(table) == 5
