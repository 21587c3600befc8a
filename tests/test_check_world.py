"""`--num-nodes`/`--num-processes` state the torchrun world (README 'Scaling': num_processes per
node); the CLI refuses another one, naming the field and both worlds. Found: `--num-nodes 2
--num-processes 2` on one node of 2 said '2 process(es) on 2 node(s) asked for, but this run has 2',
and `--num-nodes 2 --num-processes 1` on one node of 2 processes ran."""

from __future__ import annotations

import pytest

from tvkd.cli.train import check_world
from tvkd.config import ConfigError, TrainConfig


def _in_torchrun(monkeypatch: pytest.MonkeyPatch, world: int, local_world: int) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")


def test_the_world_asked_for_is_stated_per_node_and_in_all(monkeypatch: pytest.MonkeyPatch) -> None:
    _in_torchrun(monkeypatch, world=2, local_world=2)
    with pytest.raises(ConfigError) as exc:
        check_world(TrainConfig.from_dict({"num_nodes": 2, "num_processes": 2}))
    text = str(exc.value)
    assert "num_nodes" in text and "2 process(es) per node on 2 node(s), 4 in all" in text
    assert "this run has 2 process(es) on 1 node(s)" in text


def test_the_same_total_split_another_way_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _in_torchrun(monkeypatch, world=2, local_world=2)
    with pytest.raises(ConfigError, match="num_processes"):
        check_world(TrainConfig.from_dict({"num_nodes": 2, "num_processes": 1}))


def test_the_world_asked_for_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    _in_torchrun(monkeypatch, world=4, local_world=2)
    check_world(TrainConfig.from_dict({"num_nodes": 2, "num_processes": 2}))
    _in_torchrun(monkeypatch, world=2, local_world=2)
    check_world(TrainConfig.from_dict({}))  # nothing stated: any world
