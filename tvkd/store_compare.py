"""Is one value store the same as another, bit for bit? (The sharded precompute's promise:
`tvkd.precompute.precompute_shards` on any number of processes writes the store one process
would; tests/test_precompute_shards.py and bench/precompute_scale.py check it with this.)"""

from __future__ import annotations

from typing import Any

from tvkd.ragged import RaggedFile
from tvkd.store import ValueStore

PROVENANCE = ("created", "timings")  # manifest keys that say when and by whom, not what


def store_differences(a: ValueStore, b: ValueStore) -> list[str]:
    """What differs between stores `a` and `b` ([] when they are the same): every array of every
    shard file compared byte for byte (dtype and shape too), the shards' headers but for
    `made_by` (who wrote the shard, how long it took), and the manifests but for the creation
    time, the timings and the files' byte sizes (the headers hold `made_by`)."""
    out: list[str] = []
    if a.key != b.key:
        out.append(f"key {a.key} != {b.key}")
    names = sorted(p.name for p in a.path.glob("shard-*"))
    if names != sorted(p.name for p in b.path.glob("shard-*")):
        return [*out, "not the same shard files"]
    for name in names:
        fa, fb = RaggedFile(a.path / name), RaggedFile(b.path / name)
        if sorted(fa.fields) != sorted(fb.fields):
            out.append(f"{name}: fields {sorted(fa.fields)} != {sorted(fb.fields)}")
            continue
        ta, tb = fa.tensors(), fb.tensors()
        for array in sorted(ta):
            x, y = ta[array], tb.get(array)
            if y is None or x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                out.append(f"{name}: {array} differs")
        ma = {k: v for k, v in fa.metadata.items() if k != "made_by"}
        if ma != {k: v for k, v in fb.metadata.items() if k != "made_by"}:
            out.append(f"{name}: header differs")
    if _content(a.manifest) != _content(b.manifest):
        out.append("manifest differs")
    return out


def _content(manifest: dict[str, Any]) -> dict[str, Any]:
    m = {k: v for k, v in manifest.items() if k not in PROVENANCE}
    m["shards"] = [{k: v for k, v in s.items() if k != "bytes"} for s in m["shards"]]
    return m
