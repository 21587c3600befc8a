"""What a job's model download serves: the files of its model folder (or of one checkpoint), with
sizes and sha256, and a streamed tar of them.

The final model is the job's `model` artifact (a plain Hugging Face folder). A checkpoint folder
holds the trainable weights (`model.safetensors`) and `state.json`; so that the download loads
with `AutoModelForCausalLM.from_pretrained`, its listing adds the student's configuration and
tokenizer files (every file of the student folder that is not weights). A LoRA job's checkpoint
holds only the adapter's weights. Names are the keys of the listing: a request names a file of
it, never a path, so nothing outside the folder can be reached.
"""

from __future__ import annotations

import hashlib
import io
import queue
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
CHECKPOINT_FILES = ("model.safetensors", "state.json")
CHUNK = 1 << 20

_digests: dict[tuple[str, int, int], str] = {}
_digests_lock = threading.Lock()


@dataclass(frozen=True)
class ServedFile:
    name: str  # the name in the listing (and in the downloaded folder)
    path: Path  # where it lies on the server
    size: int

    @property
    def sha256(self) -> str:
        return sha256_of(self.path)


def sha256_of(path: Path) -> str:
    """The file's sha256 (hex), cached in this process by (path, size, mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _digests_lock:
        if key in _digests:
            return _digests[key]
    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    with _digests_lock:
        _digests[key] = digest
    return digest


def _plain_files(folder: Path) -> list[Path]:
    """The regular files directly in `folder` (no links, no hidden files), sorted by name."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
    )


def model_files(folder: Path) -> list[ServedFile]:
    """Every file of a model folder."""
    return [ServedFile(p.name, p, p.stat().st_size) for p in _plain_files(folder)]


def checkpoint_files(checkpoint: Path, student: Path | None) -> list[ServedFile]:
    """A checkpoint's weights and state, and the student's configuration and tokenizer files."""
    out = [ServedFile(n, checkpoint / n, (checkpoint / n).stat().st_size) for n in CHECKPOINT_FILES]
    names = {f.name for f in out}
    if student is not None and student.is_dir():
        for p in _plain_files(student):
            if p.name not in names and not p.name.endswith(WEIGHT_SUFFIXES) and "index.json" not in p.name:
                out.append(ServedFile(p.name, p, p.stat().st_size))
    return sorted(out, key=lambda f: f.name)


class _QueueWriter(io.RawIOBase):
    """A file object whose writes go to a queue (tarfile writes the archive into it)."""

    def __init__(self, chunks: queue.Queue[bytes | BaseException | None], stop: threading.Event) -> None:
        self.chunks, self.stop = chunks, stop

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        while True:
            if self.stop.is_set():
                raise BrokenPipeError("the client went away")
            try:
                self.chunks.put(bytes(data), timeout=1.0)
                return len(data)
            except queue.Full:
                continue


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def tar_stream(files: list[ServedFile], root: str) -> Iterator[bytes]:
    """An uncompressed tar of `files` under the folder `root`, a chunk (≤ 1 MiB) at a time.

    `tarfile` writes the archive (stream mode "w|") from a thread into a bounded queue, so a
    large model is never held in memory; a client that goes away stops the writer."""
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=4)
    stop = threading.Event()

    def produce() -> None:
        try:
            sink = _QueueWriter(chunks, stop)
            with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK) as tar:
                for f in files:
                    tar.add(f.path, arcname=f"{root}/{f.name}", recursive=False, filter=_anonymous)
            chunks.put(None)
        except BaseException as exc:  # handed to the reader, which raises it
            if not stop.is_set():
                chunks.put(exc)

    threading.Thread(target=produce, name="tar-stream", daemon=True).start()
    try:
        while True:
            item = chunks.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
