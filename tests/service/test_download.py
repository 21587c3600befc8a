"""Taking a model away: GET /v1/jobs/{id}/model (files, sizes, sha256), one file with HTTP Range,
the tar of the folder, owner-only; `tvkd download` resumes, checks hashes and leaves a folder
`from_pretrained` loads; a checkpoint too. A real API process; the job's model folder and
checkpoint are written where a worker writes them, and recorded in the database as it does."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import ALICE, BOB, client
from sqlalchemy.orm import Session, sessionmaker

from service.db import make_engine, session_factory
from service.models import Artifact, Checkpoint


@pytest.fixture(scope="module")
def db(database_url: str):
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def trained_job(api: str, tiny_assets: dict[str, str], service_home: Path, db: sessionmaker[Session]):
    """A job (no worker takes it: its stage stays pending) given a model folder and a step-2
    checkpoint under its output folder, recorded as a worker records them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tvkd import checkpoint as ckpt_io

    body = {
        "teacher": tiny_assets["teacher"],
        "student": tiny_assets["student"],
        "dataset": tiny_assets["dataset"],
    }
    with client(api) as c:
        r = c.post("/v1/jobs", json={**body, "hyperparameters": {"max_steps": 1}})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    out = service_home / "artifacts" / "jobs" / job_id
    student = service_home / "models" / tiny_assets["student"]
    model = AutoModelForCausalLM.from_pretrained(student)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # a "trained" model differs from the student
    model.save_pretrained(out / "model")
    AutoTokenizer.from_pretrained(student).save_pretrained(out / "model")
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ckpt = ckpt_io.save_checkpoint(
        out, 2, model=model, optimizer=optimizer, scheduler=scheduler, state={"step": 2}, keep=2
    )
    with db() as s, s.begin():
        s.add(Artifact(job_id=job_id, kind="model", path=f"jobs/{job_id}/model", bytes=0))
        s.add(Checkpoint(job_id=job_id, step=2, path=str(ckpt.relative_to(service_home / "artifacts"))))
    return job_id, out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_listing_file_range_and_archive(api: str, trained_job) -> None:
    job_id, out = trained_job
    with client(api) as c:
        listing = c.get(f"/v1/jobs/{job_id}/model").json()
        names = {f["name"]: f for f in listing["files"]}
        on_disk = {p.name: p.read_bytes() for p in (out / "model").iterdir()}
        assert set(names) == set(on_disk) and "model.safetensors" in names and "config.json" in names
        for name, data in on_disk.items():
            assert (names[name]["size"], names[name]["sha256"]) == (len(data), sha256(data))
        assert listing["total_bytes"] == sum(len(d) for d in on_disk.values())

        weights = on_disk["model.safetensors"]
        r = c.get(names["model.safetensors"]["url"], headers={"Range": "bytes=100-199"})
        assert r.status_code == 206 and r.content == weights[100:200]
        assert r.headers["content-range"] == f"bytes 100-199/{len(weights)}"
        r = c.get(names["config.json"]["url"])
        assert r.status_code == 200 and r.content == on_disk["config.json"]

        r = c.get(listing["archive_url"])
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
        with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
            got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        assert got == {f"model/{n}": d for n, d in on_disk.items()}

        for path in ("/model", "/model/config.json", "/model.tar", "/model?checkpoint=2"):
            with client(api, BOB) as other:
                r = other.get(f"/v1/jobs/{job_id}{path}")
            assert r.status_code == 404, path  # another key's job does not exist for it
        for path in ("/model/..%2Fresult.json", "/model/nothing.bin", "/model?checkpoint=7"):
            assert c.get(f"/v1/jobs/{job_id}{path}").status_code == 404, path


def test_tvkd_download_resumes_checks_hashes_and_loads(api: str, trained_job, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tvkd.cli import main

    job_id, out = trained_job
    argv = ["download", job_id, str(tmp_path / "m"), "--api-url", api, "--api-key", ALICE]
    # A broken earlier download: the first half of the weights in the partial file.
    weights = (out / "model" / "model.safetensors").read_bytes()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors.part").write_bytes(weights[: len(weights) // 2])
    assert main([*argv, "--json"]) == 0
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == weights
    assert not list((tmp_path / "m").glob("*.part"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    for (name, a), b in zip(loaded.state_dict().items(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    # A partial file that is not a prefix of the real one: the hash check refuses it.
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "model.safetensors.part").write_bytes(b"\x00" * 64)
    assert main(argv) == 1
    assert not (tmp_path / "m" / "model.safetensors").exists()
    assert main(argv) == 0  # and the next run fetches it afresh


def test_a_checkpoint_downloads_as_a_loadable_folder(api: str, trained_job, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tvkd.cli import main

    job_id, out = trained_job
    assert (
        main(
            [
                "download",
                job_id,
                str(tmp_path / "c"),
                "--checkpoint",
                "2",
                "--api-url",
                api,
                "--api-key",
                ALICE,
            ]
        )
        == 0
    )
    names = {p.name for p in (tmp_path / "c").iterdir()}
    assert {"model.safetensors", "state.json", "config.json", "tokenizer.json"} <= names
    assert "optimizer.pt" not in names
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    saved = load_file(out / "checkpoints" / "step-000002" / "model.safetensors")
    state = loaded.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
