"""Reading a dataset is bounded after decompression (tvkd.sources.ReadLimits): bytes, rows, the
bytes of one line and JSON nesting; a gzip bomb is refused with flat memory, a deeply nested row
is a bad row (never a RecursionError)."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pytest

from tvkd.data import DataError, load_pairs
from tvkd.sources import ReadLimits, json_depth

ROW = json.dumps({"prompt": "Q: 1+1=", "chosen": " 2", "rejected": " 3"}) + "\n"


def _bomb(path: Path, inflated: int) -> Path:
    """A .jsonl.gz of valid rows that inflates to `inflated` bytes (compresses ~1000:1)."""
    block = (ROW * ((1 << 20) // len(ROW))).encode()
    with gzip.open(path, "wb", compresslevel=9) as fh:
        for _ in range(inflated // len(block)):
            fh.write(block)
    return path


def test_a_gzip_bomb_is_refused_with_flat_memory(tmp_path):
    bomb = _bomb(tmp_path / "bomb.jsonl.gz", 64 << 20)
    assert bomb.stat().st_size < 1 << 20  # < 1 MB on disk, 64 MB inflated
    tracemalloc.start()
    with pytest.raises(DataError) as info:
        load_pairs(bomb, limits=ReadLimits(max_bytes=16 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    issue = info.value.report.issues[0]
    assert issue.code == "too_large" and "16777216 bytes after decompression" in issue.message
    assert peak < 8 << 20, peak  # one chunk at a time, no row kept
    # Within the limit it loads.
    small = _bomb(tmp_path / "small.jsonl.gz", 2 << 20)
    pairs, _ = load_pairs(small, limits=ReadLimits(max_bytes=16 << 20))
    assert len(pairs) > 1000


def test_rows_and_line_limits(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(ROW * 10)
    with pytest.raises(DataError) as info:
        load_pairs(path, limits=ReadLimits(max_rows=9))
    assert info.value.report.issues[0].code == "too_large" and "9 rows" in info.value.report.issues[0].message
    assert len(load_pairs(path, limits=ReadLimits(max_rows=10))[0]) == 10
    long = json.dumps({"prompt": "x" * 5000, "chosen": " a", "rejected": " b"})
    path.write_text(ROW + ROW + long + "\n")
    with pytest.raises(DataError) as info:
        load_pairs(path, limits=ReadLimits(max_line_bytes=4096))
    assert "line 3 is longer than 4096 bytes" in info.value.report.issues[0].message
    # A JSON list file is bounded too (read whole, but never more than max_bytes of it).
    listed = tmp_path / "d.json.gz"
    listed.write_bytes(gzip.compress(json.dumps([json.loads(ROW)] * 500).encode()))
    with pytest.raises(DataError) as info:
        load_pairs(listed, limits=ReadLimits(max_bytes=1000))
    assert info.value.report.issues[0].code == "too_large"


def test_deeply_nested_rows_are_bad_rows(tmp_path):
    deep = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "chosen": " a", "rejected": " b"}'
    nested = {"prompt": "Q", "chosen": " a", "rejected": " b", "meta": json.loads("[" * 70 + "]" * 70)}
    path = tmp_path / "deep.jsonl"
    path.write_text(ROW + deep + "\n" + json.dumps(nested) + "\n" + ROW)
    pairs, report = load_pairs(path, on_error="drop", limits=ReadLimits(max_depth=64))
    assert len(pairs) == 2
    assert [(i.row, i.code) for i in report.issues] == [(1, "too_deep"), (2, "too_deep")]
    with pytest.raises(DataError):
        load_pairs(path, limits=ReadLimits(max_depth=64))
    # The same rows in a JSON list file: the whole file nested too deep is a file error.
    listed = tmp_path / "deep.json"
    listed.write_text("[" + deep + "]")
    with pytest.raises(DataError) as info:
        load_pairs(listed)
    assert info.value.report.issues[0].code == "too_deep"


def test_json_depth():
    assert json_depth(1) == 0 and json_depth([]) == 1 and json_depth({"a": [{"b": 1}]}) == 3
    value: list = []
    for _ in range(5000):  # deeper than the recursion limit: json_depth does not recurse
        value = [value]
    assert json_depth(value) == 5001
