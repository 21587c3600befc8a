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


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["demo", "--workers", "0"], "--workers"),
        (["demo", "--workers", "-1"], "--workers"),
        (["demo", "--port", "99999"], "--port"),
        (["demo", "--port", "-5"], "--port"),
        (["demo", "--dashboard-port", "70000"], "--dashboard-port"),
        (["up", "--port", "65536"], "--port"),
    ],
)
def test_an_out_of_range_worker_count_or_port_is_refused_naming_the_option(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: --workers 0 was clamped to 1 in silence, --port 99999 reached uvicorn.
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["demo", "--pairs", "10"], "--pairs"),
        (["demo", "--steps", "3", "--alpha", "0.5"], "--steps"),
        (["demo", "--real", "--scale", "tiny"], "--scale"),
        (["demo", "--real", "--workers", "3"], "--workers"),
        (["demo", "--real", "--split", "dev"], "--split"),
    ],
)
def test_an_option_of_the_other_demo_is_refused_not_ignored(
    argv: list[str], option: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tvkd.cli import demo_real

    def must_not_run(args: Any) -> int:
        raise AssertionError("the demo ran with an option it ignores")

    monkeypatch.setattr(demo_real, "run", must_not_run)
    monkeypatch.setattr(dp, "run", must_not_run)
    args = build_parser().parse_args(argv)
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert option in err and ("only with --real" in err or "not with --real" in err)


@pytest.mark.parametrize("real", [False, True])
def test_sigterm_reaches_either_demo_as_an_interrupt(real: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both demos stop their service on KeyboardInterrupt; SIGTERM must become one in both (before:
    `tvkd demo --real` under `timeout`/`kill` left the API, worker and dashboard orphaned)."""
    import os
    import signal
    import time

    from tvkd.cli import demo_real

    seen: list[str] = []

    def fake_run(args: Any) -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            seen.append("interrupt")
            return 130
        return 0

    monkeypatch.setattr(demo_real if real else dp, "run", fake_run)
    before = signal.getsignal(signal.SIGTERM)
    # Without the demo's own handler this one swallows the signal: the test fails, pytest lives.
    signal.signal(signal.SIGTERM, lambda *_: seen.append("ignored"))
    try:
        args = build_parser().parse_args(["demo", "--real"] if real else ["demo"])
        assert args.func(args) == 130 and seen == ["interrupt"]
    finally:
        signal.signal(signal.SIGTERM, before)


def test_the_real_demo_reports_a_missing_wheel_in_one_line(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found: `tvkd demo --real --wheel /nonexistent.whl` ended in a traceback (ModelError)."""
    monkeypatch.setenv("TVKD_HOME", str(tmp_path))
    args = build_parser().parse_args(["demo", "--real", "--wheel", str(tmp_path / "missing.whl")])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "missing.whl does not exist" in err and "Traceback" not in err


def test_the_real_demo_prints_progress_lines_into_a_log(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found: `tvkd demo --real 2>log` wrote redrawn tqdm bars (cursor-up escapes) into the log;
    when stderr is not a terminal it prints '[demo] ...' lines, as the pipeline demo does."""
    from tvkd.cli import demo_common, demo_real

    polls = iter([("training", "train", 0.5), ("succeeded", "evaluate", 1.0)])

    def fake_call(client: Any, method: str, path: str, **kw: Any) -> dict[str, Any]:
        status, stage, frac = next(polls)
        return {"status": status, "stage": stage, "progress": {"fraction": frac, "eta_seconds": 3}}

    monkeypatch.setattr(demo_common, "call", fake_call)  # the follower both demos share
    monkeypatch.setattr(demo_common.time, "sleep", lambda s: None)
    jobs = demo_real.follow(object(), {"tvkd": "job_1"})
    assert jobs["tvkd"]["status"] == "succeeded"
    err = capsys.readouterr().err
    assert "\x1b[" not in err and "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("[demo]") and "tvkd training train 50%" in lines[0]
    assert "tvkd succeeded" in lines[-1]
