"""A data file is read by its content's compression, not its name: a gzip named `.jsonl` (a user
who ran `gzip -c a.jsonl > b.jsonl`) loads, and a plain file named `.jsonl.gz` too. Found:
`tvkd data check b.jsonl` said 'row 0: not_utf8: line 1: invalid UTF-8 at byte 1'. The size bound
after decompression still holds for either."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tvkd.pairs import DataError
from tvkd.sources import ReadLimits, read_source

ROWS = [{"prompt": f"q{i}", "chosen": " yes", "rejected": " no"} for i in range(3)]


def _jsonl() -> bytes:
    return "".join(json.dumps(r) + "\n" for r in ROWS).encode()


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.json"])
def test_a_gzip_file_without_the_gz_suffix_loads(tmp_path: Path, name: str) -> None:
    body = _jsonl() if name.endswith("l") else json.dumps(ROWS).encode()
    (tmp_path / name).write_bytes(gzip.compress(body))
    raw = read_source(str(tmp_path / name), "train", None)
    assert [rec for _, rec in raw.records] == ROWS and not raw.issues


def test_a_plain_file_named_gz_loads(tmp_path: Path) -> None:
    (tmp_path / "pairs.jsonl.gz").write_bytes(_jsonl())
    raw = read_source(str(tmp_path / "pairs.jsonl.gz"), "train", None)
    assert [rec for _, rec in raw.records] == ROWS and not raw.issues


def test_the_decompressed_size_bound_holds_for_an_unsuffixed_gzip(tmp_path: Path) -> None:
    (tmp_path / "big.jsonl").write_bytes(gzip.compress(_jsonl() * 1000))
    with pytest.raises(DataError, match="after decompression"):
        read_source(str(tmp_path / "big.jsonl"), "train", None, ReadLimits(max_bytes=10_000))
