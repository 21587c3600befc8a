"""The 'a rank crashed' event names the rank torchrun saw fail first and how, not the last line of
its log (found: a service job whose rank 1 got `kill -9` said '... did not finish (killed, or a peer
died): ======================================================='). worker/torchrun.py _crash_summary."""

from __future__ import annotations

from worker.torchrun import _crash_summary

TORCHRUN_TAIL = """\
  exitcode  : -15 (pid: 22403)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 22403
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_20:18:30
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 22404)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 22404
======================================================="""


def test_the_crash_message_names_the_first_failed_rank_and_its_signal() -> None:
    summary = _crash_summary(TORCHRUN_TAIL)
    assert "rank 1" in summary and "-9" in summary and "SIGKILL" in summary
    assert "=====" not in summary


def test_without_a_root_cause_block_the_last_line_with_words_is_kept() -> None:
    assert _crash_summary("RuntimeError: boom\n=====\n----\n") == "RuntimeError: boom"
    assert _crash_summary("") == ""
