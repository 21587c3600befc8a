"""`tvkd data check --tokenizer` loads the tokenizer as training does (tvkd.models.load_tokenizer):
a missing folder is named as missing. Found: '--tokenizer /nonexistent' said 'Repo id must use
alphanumeric chars ...' (transformers took the path for a hub id)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tvkd.cli import main


def test_a_missing_tokenizer_folder_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": " a", "rejected": " b"}) + "\n")
    assert main(["data", "check", str(data), "--tokenizer", str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err
    assert "does not exist" in err and "Repo id" not in err
