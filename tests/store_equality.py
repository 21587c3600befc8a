"""Two value stores with the same content, bit for bit (tests of the sharded precompute)."""

from __future__ import annotations

from typing import Any

from tvkd.ragged import RaggedFile
from tvkd.store import ValueStore


def assert_same_store(a: ValueStore, b: ValueStore) -> None:
    """Every array of every shard file equal bit for bit (dtype and shape too), the shards' headers
    equal but for `made_by` (who wrote it, how long it took), and the manifests equal but for the
    creation time, the timings and the files' byte sizes (the headers hold `made_by`)."""
    assert a.key == b.key
    shards = sorted(p.name for p in a.path.glob("shard-*"))
    assert shards == sorted(p.name for p in b.path.glob("shard-*")) and shards
    for name in shards:
        fa, fb = RaggedFile(a.path / name), RaggedFile(b.path / name)
        assert sorted(fa._arrays) == sorted(fb._arrays)
        for array in fa._arrays:
            x, y = fa._arrays[array], fb._arrays[array]
            assert x.dtype == y.dtype and x.shape == y.shape, (name, array)
            assert x.tobytes() == y.tobytes(), f"{name}: {array} differs"
        ma = {k: v for k, v in fa.metadata.items() if k != "made_by"}
        assert ma == {k: v for k, v in fb.metadata.items() if k != "made_by"}

    def comparable(manifest: dict[str, Any]) -> dict[str, Any]:
        m = {k: v for k, v in manifest.items() if k not in ("created", "timings")}
        m["shards"] = [{k: v for k, v in s.items() if k != "bytes"} for s in m["shards"]]
        return m

    assert comparable(a.manifest) == comparable(b.manifest)
