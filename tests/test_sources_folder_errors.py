"""A folder that `datasets` cannot load is a DataError naming the folder and the reason, not a
traceback. Found: `tvkd data check FOLDER` on a folder of JSONL files of two layouts ended in
`datasets.exceptions.DatasetGenerationError` (and its cause, the schema clash, 60 lines up)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tvkd.pairs import DataError
from tvkd.sources import read_source


def test_a_folder_of_two_layouts_is_a_named_error(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    other = {"question": "q", "response_j": "a", "response_k": "b"}
    (tmp_path / "b.jsonl").write_text(json.dumps(other) + "\n")
    with pytest.raises(DataError) as exc:
        read_source(str(tmp_path), "train", None)
    text = str(exc.value)
    assert str(tmp_path) in text and "cannot be loaded as a datasets folder" in text
    assert "Traceback" not in text and len(text.splitlines()) == 1


def test_an_empty_folder_is_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot be loaded as a datasets folder"):
        read_source(str(tmp_path), "train", None)
