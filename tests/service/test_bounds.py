"""Input the API reads is bounded (a real API process with small limits): an upload is bounded
after decompression (a 400 KB gzip that inflates to 400 MB is a 413 naming the limit, with
flat memory), deeply nested or malformed bodies are 4xx, JSON bodies have a size limit and an
upload whose body stalls times out."""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ALICE, client, free_port, start_process

ROW = json.dumps({"prompt": "Q: 1+1=", "chosen": " 2", "rejected": " 3"}) + "\n"


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~500 KB of gzip that inflates to 400 MB of valid rows."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.jsonl.gz"
    row = json.dumps({"prompt": "a" * 8000, "chosen": " 2", "rejected": " 3"}) + "\n"
    block = (row * ((1 << 20) // len(row))).encode()
    with gzip.open(path, "wb", compresslevel=9) as fh:
        for _ in range(400):
            fh.write(block)
    return path


@pytest.fixture(scope="module")
def small_api(service_env: dict[str, str], service_home: Path) -> Iterator[tuple[str, int]]:
    """An API with small body limits (default decompressed-upload limit, 256 MiB); yields
    (base URL, pid)."""
    env = {**service_env, "TVKD_MAX_JSON_BODY_BYTES": "4096", "TVKD_UPLOAD_IDLE_SECONDS": "1",
           "TVKD_UPLOAD_MAX_ROWS": "20", "TVKD_LIMIT_MAX_STEPS": "100", "TVKD_LIMIT_BATCH_SIZE": "64",
           "TVKD_LIMIT_EPOCHS": "3", "TVKD_TEMPLATE_SECONDS": "1",
           "TVKD_LIMIT_NUM_PROCESSES": "4"}  # fmt: skip
    port = free_port()
    proc = start_process(
        "api-bounds", ["serve", "--host", "127.0.0.1", "--port", str(port)], env, service_home
    )
    url = f"http://127.0.0.1:{port}"
    proc.wait_answering(f"{url}/healthz")
    yield url, proc.popen.pid
    proc.stop()


def _peak_rss(pid: int) -> int:
    """VmHWM of `pid` (and of its children, the uvicorn server) in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM"))


def _upload(url: str, name: str, data: bytes) -> httpx.Response:
    with client(url) as c:
        return c.post("/v1/datasets", files={"file": (name, data)}, timeout=120)


def test_a_gzip_bomb_is_refused_naming_the_limit(small_api, bomb):
    url, pid = small_api
    assert bomb.stat().st_size < 600_000
    _upload(url, "warm.jsonl", ROW.encode() * 3)  # the imports of the first upload are not the bomb's
    before = _peak_rss(pid)
    r = _upload(url, "bomb.jsonl.gz", bomb.read_bytes())
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "upload_too_large" and error["field"] == "file"
    assert "bytes after decompression" in error["message"]
    assert "TVKD_UPLOAD_MAX_DECOMPRESSED_BYTES" in error["message"]
    assert _peak_rss(pid) - before < 64 << 20  # flat: 400 MB inflated, nothing of it held


def test_rows_nesting_and_malformed_uploads_are_4xx(small_api):
    url, _ = small_api
    r = _upload(url, "many.jsonl", ROW.encode() * 21)
    assert r.status_code == 413 and "TVKD_UPLOAD_MAX_ROWS" in r.json()["error"]["message"], r.text
    deep = '{"prompt": ' + "[" * 50_000 + "]" * 50_000 + ', "chosen": " a", "rejected": " b"}\n'
    r = _upload(url, "deep.jsonl", (ROW + deep).encode())
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "file.rows[1].<row>" and "too_deep" in r.json()["error"]["message"]
    r = _upload(url, "deep.json", ("[" * 50_000 + "]" * 50_000).encode())
    assert r.status_code == 422, r.text
    for name, data in (
        ("bad.jsonl.gz", b"\x1f\x8b\x08garbage"),
        ("bad.parquet", b"PAR1xx"),
        ("bad.json", b"{"),
    ):
        r = _upload(url, name, data)
        assert 400 <= r.status_code < 500, (name, r.text)


def test_json_bodies_are_bounded(small_api):
    url, _ = small_api
    with client(url) as c:
        r = c.post(
            "/v1/jobs", json={"teacher": "t", "student": "s", "dataset": "d", "metadata": {"x": "y" * 5000}}
        )
        assert r.status_code == 413 and "TVKD_MAX_JSON_BODY_BYTES" in r.json()["error"]["message"], r.text

        def chunks() -> Iterator[bytes]:  # no Content-Length: cut off while it arrives
            yield b'{"teacher": "' + b"t" * 3000
            yield b"t" * 3000 + b'"}'

        r = c.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        r = c.post("/v1/jobs", content=b"[" * 4000 + b"]" * 0, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text


def test_a_stalled_upload_times_out(small_api):
    url, _ = small_api
    host, port = url.removeprefix("http://").split(":")
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + ROW.encode()
    request = (
        f"POST /v1/datasets HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ALICE}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 100000\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=20) as s:
        t0 = time.monotonic()
        s.sendall(request + head)  # ... and then nothing more
        answer = s.recv(65536).decode("latin-1")
        waited = time.monotonic() - t0
        # The head and the body may come in two segments (seen under load): read to the body's end.
        head_end = answer.find("\r\n\r\n")
        headers = [h.split(":", 1) for h in answer[:head_end].split("\r\n")[1:]]
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
        while head_end >= 0 and len(answer.encode("latin-1")) < head_end + 4 + length:
            more = s.recv(65536)
            if not more:
                break
            answer += more.decode("latin-1")
    assert answer.startswith("HTTP/1.1 408"), answer[:300]
    assert "upload_timeout" in answer and 0.9 < waited < 15


def test_a_file_symlinked_out_of_the_roots_is_refused(api, service_home, tiny_assets, tmp_path):
    import shutil

    outside = tmp_path / "outside"
    shutil.copytree(service_home / "models" / tiny_assets["student"], outside)
    model = service_home / "models" / "linked_file_model"
    model.mkdir()
    for f in outside.iterdir():  # a real folder inside the root, every file a symlink out of it
        (model / f.name).symlink_to(f)
    data = service_home / "data" / "linked_folder"
    data.mkdir()
    (outside / "train.jsonl").write_text(ROW * 4)
    (data / "train.jsonl").symlink_to(outside / "train.jsonl")
    body = {**tiny_assets, "alpha": 0.5, "beta": 0.1}
    with client(api) as c:
        r = c.post("/v1/jobs", json={**body, "student": "linked_file_model"})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["field"] == "student" and "symlink" in error["message"]
        assert str(tmp_path) not in r.text  # the target outside is not disclosed
        r = c.post("/v1/jobs", json={**body, "dataset": "linked_folder"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "dataset", r.text
        assert "symlink" in r.json()["error"]["message"]
        # The same folder with a real file is accepted.
        (data / "train.jsonl").unlink()
        (data / "train.jsonl").write_text(ROW * 4)
        r = c.post("/v1/jobs", json={**body, "dataset": "linked_folder"})
        assert r.status_code == 201, r.text
        c.post(f"/v1/jobs/{r.json()['id']}/cancel")  # never run


def test_run_size_and_model_size_have_operator_bounds(small_api, service_home, tiny_assets):
    url, _ = small_api
    body = {**tiny_assets, "alpha": 0.5, "beta": 0.1}
    config = json.loads((service_home / "models" / tiny_assets["student"] / "config.json").read_text())
    for name, patch in (("deep", {"num_hidden_layers": 200_000}), ("wide", {"hidden_size": 1_000_000})):
        (service_home / "models" / name).mkdir(exist_ok=True)
        (service_home / "models" / name / "config.json").write_text(json.dumps({**config, **patch}))
    with client(url) as c:
        for hp, field, setting in (
            ({"max_steps": 101}, "hyperparameters.max_steps", "TVKD_LIMIT_MAX_STEPS"),
            ({"batch_size": 65}, "hyperparameters.batch_size", "TVKD_LIMIT_BATCH_SIZE"),
            ({"epochs": 3.5}, "hyperparameters.epochs", "TVKD_LIMIT_EPOCHS"),
            ({"num_processes": 5}, "hyperparameters.num_processes", "TVKD_LIMIT_NUM_PROCESSES"),
            # One node only: multi-node runs go through the library CLI (README 'Scaling').
            ({"num_nodes": 2}, "hyperparameters.num_nodes", "README 'Scaling'"),
        ):
            r = c.post("/v1/jobs", json={**body, "hyperparameters": hp})
            assert r.status_code == 422, r.text
            assert r.json()["error"]["field"] == field and setting in r.json()["error"]["message"]
        # A config of 200,000 layers (or of 1e6 hidden units) is refused before anything builds it.
        for name, setting in (("deep", "TVKD_MAX_MODEL_LAYERS"), ("wide", "TVKD_MAX_MODEL_PARAMETERS")):
            r = c.post("/v1/jobs", json={**body, "student": name})
            assert r.status_code == 422, r.text
            assert r.json()["error"]["field"] == "student" and setting in r.json()["error"]["message"]
        r = c.post("/v1/jobs", json={**body, "hyperparameters": {"max_steps": 100, "batch_size": 64}})
        assert r.status_code == 201, r.text
        c.post(f"/v1/jobs/{r.json()['id']}/cancel")  # never run


def test_a_looping_chat_template_is_a_named_error_in_inspect(small_api, service_home, tiny_assets):
    import shutil

    url, _ = small_api
    looping = service_home / "models" / "looping_template"
    if not looping.exists():
        shutil.copytree(service_home / "models" / tiny_assets["teacher"], looping)
        (looping / "chat_template.jinja").write_text(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        )
    body = {"teacher": "looping_template", "prompt": [{"role": "user", "content": "hi"}], "response": "yes"}
    with client(url) as c:
        t0 = time.monotonic()
        r = c.post("/v1/inspect", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "template_time" and "TVKD_TEMPLATE_SECONDS" in r.text
        assert time.monotonic() - t0 < 30
        assert c.get("/healthz").status_code == 200  # still answering
