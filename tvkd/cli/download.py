"""`tvkd download JOB_ID DIR`: take a job's trained model (or a checkpoint) from the API.

It lists the files (`GET /v1/jobs/{id}/model`, with sizes and sha256), fetches each into
DIR/NAME.part, resuming a partial file with an HTTP Range request, checks its sha256, and only
then renames it into place; a file already in DIR with the listed hash is skipped. DIR then
loads with `AutoModelForCausalLM.from_pretrained(DIR)`.

Exit codes as the other API commands: 0 done, 1 the API refused or a hash did not match,
2 usage, 3 the API cannot be reached.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

from tvkd.cli.client import ClientError, _client, _common, _run, call, describe_error

PART = ".part"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "download",
        help="download a job's trained model (or a checkpoint) into a folder",
        description="Download a job's model folder from the API into DIR, resuming partial files "
        "and checking every file's sha256. DIR then loads with from_pretrained.",
    )
    p.add_argument("job_id")
    p.add_argument("dir", help="the folder to write (created if needed)")
    p.add_argument(
        "--checkpoint",
        type=int,
        default=None,
        metavar="STEP",
        help="a checkpoint's step instead of the model",
    )
    _common(p)
    p.set_defaults(func=cmd_download)


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fetch(client: Any, url: str, part: Path, size: int) -> int:
    """Fetch `url` into `part`, continuing after the bytes already there; returns bytes received."""
    import httpx

    have = part.stat().st_size if part.exists() else 0
    if have > size:  # not a prefix of this file
        part.unlink()
        have = 0
    if have == size:
        return 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    received = 0
    try:
        with client.stream("GET", url, headers=headers) as response:
            if response.status_code >= 400:
                response.read()
                raise ClientError(describe_error(response))
            mode = "ab" if have and response.status_code == 206 else "wb"  # 200: the server sent it all
            with part.open(mode) as fh:
                for chunk in response.iter_bytes(1 << 20):
                    fh.write(chunk)
                    received += len(chunk)
    except httpx.HTTPError as exc:
        raise ClientError(
            f"download of {url} broke off after {received} bytes (run again to resume): {exc}", 3
        ) from exc
    return received


def download(client: Any, job_id: str, out: Path, checkpoint: int | None = None) -> dict[str, Any]:
    """Download into `out`; returns the listing with, per file, `status` (skipped | fetched |
    resumed) and `received` bytes. Raises ClientError on a refused request or a hash mismatch."""
    params = {} if checkpoint is None else {"checkpoint": checkpoint}
    listing = call(client, "GET", f"/v1/jobs/{job_id}/model", params=params)
    out.mkdir(parents=True, exist_ok=True)
    for f in listing["files"]:
        name = Path(f["name"]).name  # a listing names files, never paths
        target, part = out / name, out / (name + PART)
        if target.is_file() and target.stat().st_size == f["size"] and sha256_file(target) == f["sha256"]:
            f["status"], f["received"] = "skipped", 0
            continue
        resumed = part.exists() and 0 < part.stat().st_size <= f["size"]
        f["received"] = _fetch(client, f["url"], part, f["size"])
        f["status"] = "resumed" if resumed else "fetched"
        digest = sha256_file(part)
        if digest != f["sha256"]:
            part.unlink()
            raise ClientError(
                f"{name}: sha256 {digest} does not match the listed {f['sha256']} (the partial file was "
                "removed; run again to fetch it afresh)"
            )
        part.replace(target)
    return listing


def cmd_download(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        with _client(args) as client:
            listing = download(client, args.job_id, Path(args.dir), args.checkpoint)
        if args.json:
            import json

            print(json.dumps(listing, indent=2))
            return 0
        for f in listing["files"]:
            print(f"{f['status']:<8} {f['name']:<40} {f['size']:>14,} bytes  sha256 {f['sha256'][:16]}…")
        what = "model" if args.checkpoint is None else f"checkpoint {args.checkpoint}"
        print(f"{what} of {args.job_id}: {listing['total_bytes']:,} bytes in {args.dir} (hashes checked)")
        return 0

    try:
        return _run(go, args)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
