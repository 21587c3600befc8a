"""Progress of `tvkd train`/`sft` (PrintCallbacks) when stderr is not a terminal: plain lines every
few seconds, not a redrawn tqdm bar (found: `tvkd train ... 2>log` wrote 'reference:  0%|...|'
with carriage returns into the log). The developers' guide: a progress line when not a terminal."""

from __future__ import annotations

import io

from tvkd.callbacks import PrintCallbacks


def test_progress_into_a_file_is_lines_not_a_redrawn_bar() -> None:
    out = io.StringIO()  # not a terminal
    cb = PrintCallbacks(out)
    for done in range(0, 11):
        cb.on_progress("train", done, 10, 3.0 if done < 10 else 0.0)
    cb.close()
    text = out.getvalue()
    assert "\r" not in text and "|" not in text
    lines = [ln for ln in text.splitlines() if ln]
    # The first report and the last one; the others fell within the few seconds between lines.
    assert lines[0].startswith("[progress] train 0/10") and lines[-1].startswith("[progress] train 10/10")
    assert len(lines) == 2, lines


def test_hugging_face_bars_are_off_when_stderr_is_not_a_terminal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`tvkd models tiny OUT 2>log` wrote transformers' 'Writing model shards: 0%|...' bar into
    the log; tvkd.cli.main turns the Hugging Face bars off when stderr is not a terminal."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    run = subprocess.run(
        [sys.executable, "-m", "tvkd.cli", "models", "tiny", str(tmp_path / "tiny")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "it/s]" not in run.stderr and "\r" not in run.stderr, run.stderr[-2000:]
