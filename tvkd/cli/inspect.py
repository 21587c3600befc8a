"""`tvkd inspect`: per-token teacher values and shaping for one response, or a job's samples.

    tvkd inspect --teacher T --prompt TEXT --response TEXT [--student S --reference R]
                 [--signal psi|value|logratio|teacher_logp] [--alpha A --beta B --gamma G
                 --terminal model|zero|pre_eos --q-source logits|logprobs|implicit
                 --teacher-reference TR --value-beta BV] [--json]
    tvkd inspect --teacher T --messages '[{"role": "user", "content": "..."}]' --response TEXT
    tvkd inspect --samples RUN_DIR[/samples.json] [--index K] [--json]

Colour (a heat map of the chosen signal) is on when stdout is a terminal and NO_COLOR is unset;
--color / --no-color force it. Runs the library directly: no server is involved.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from tvkd.config import Q_SOURCES, SHAPINGS, TERMINALS, ConfigError, MethodConfig

SIGNAL_CHOICES = ("psi", "value", "logratio", "teacher_logp")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="per-token teacher values and shaping for a response (or a job's samples)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = parser.add_argument_group("what to inspect")
    src.add_argument("--teacher", help="teacher model folder (or hub id where online)")
    src.add_argument(
        "--teacher-reference",
        help="the model the teacher was DPO-trained from (needed by --q-source implicit)",
    )
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--messages", help="prompt as a JSON list of chat messages (instead of --prompt)")
    src.add_argument("--response", help="response text")
    src.add_argument("--student", help="student model folder (with --reference: adds β·logratio)")
    src.add_argument("--reference", help="reference model folder (the student's starting weights)")
    src.add_argument("--samples", metavar="PATH", help="a job's samples.json, or its run folder")
    src.add_argument("--index", type=int, help="with --samples: the sample whose index is K (default all)")

    defaults = MethodConfig()
    m = parser.add_argument_group("method (MATH.md)")
    m.add_argument(
        "--alpha", type=float, default=defaults.alpha, help="recorded in the result; ψ shown without α"
    )
    m.add_argument("--beta", type=float, default=defaults.beta, help="DPO temperature β of the log-ratio")
    m.add_argument("--gamma", type=float, default=defaults.gamma)
    m.add_argument("--terminal", choices=TERMINALS, default=defaults.terminal)
    m.add_argument("--q-source", choices=Q_SOURCES, default=defaults.q_source)
    m.add_argument("--value-beta", type=float, default=defaults.value_beta)
    m.add_argument("--shaping", choices=SHAPINGS, default=defaults.shaping)

    out = parser.add_argument_group("output")
    out.add_argument("--signal", choices=SIGNAL_CHOICES, default="psi", help="the coloured signal")
    out.add_argument("--json", action="store_true", help="print the result as JSON")
    out.add_argument(
        "--color", action=argparse.BooleanOptionalAction, default=None, help="force colour on/off"
    )
    out.add_argument("--max-length", type=int, default=2048, help="longest prompt+response in tokens")
    out.add_argument("--device", default="cpu", help="torch device for the models (cpu, cuda, …)")
    parser.set_defaults(func=run)


def _use_color(args: argparse.Namespace) -> bool:
    if args.color is not None:
        return bool(args.color)
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _error(message: str) -> int:
    print(f"tvkd inspect: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if args.samples:
        return _run_samples(args)
    return _run_response(args)


def _run_samples(args: argparse.Namespace) -> int:
    from tvkd.artifacts import read_samples
    from tvkd.render import render_table, visible

    try:
        doc = read_samples(args.samples)
    except (OSError, ValueError) as exc:
        return _error(f"cannot read samples from {args.samples}: {exc}")
    samples = doc.samples
    if args.index is not None:
        sample = doc.find(args.index)
        if sample is None:
            have = ", ".join(str(s.index) for s in samples) or "none"
            return _error(f"no sample with index {args.index} (indices: {have})")
        samples = [sample]
    if args.json:
        print(json.dumps([s.to_dict() for s in samples], indent=2, ensure_ascii=False))
        return 0
    color = _use_color(args)
    facts = [f"step {doc.step}" if doc.step is not None else "", _options_line(doc.loss_options)]
    if doc.note:
        facts.append(f"note: {doc.note}")
    if any(facts):
        print("; ".join(f for f in facts if f))
    for sample in samples:
        prompt = sample.prompt
        if isinstance(prompt, str):
            prompt_text = prompt
        else:  # chat messages: one "role: content" line each
            prompt_text = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)
        print(f"\n=== sample {sample.index} (row {sample.row}) ===")
        # The end of the prompt is what the response answers; long HH dialogues are cut.
        cut = "…" if len(prompt_text) > 400 else ""
        # Control characters are escaped; spaces and line breaks stay readable here.
        shown = "".join(ch if ch in "\n " else visible(ch) for ch in prompt_text[-400:])
        print(f"prompt: {cut}{shown}")
        for side in ("chosen", "rejected"):
            if sample.side(side) is None:
                continue
            print()
            try:
                print(render_table(doc.result(sample, side), color=color, signal=args.signal))
            except ValueError as exc:
                return _error(str(exc))
    return 0


def _options_line(options: dict[str, Any]) -> str:
    keys = ("alpha", "beta", "gamma", "terminal", "shaping", "value_beta")
    return ", ".join(f"{k}={options[k]}" for k in keys if k in options)


def _run_response(args: argparse.Namespace) -> int:
    if not args.teacher or args.response is None or (args.prompt is None and args.messages is None):
        return _error("give --teacher, --prompt (or --messages) and --response, or --samples")
    if args.prompt is not None and args.messages is not None:
        return _error("give --prompt or --messages, not both")
    if (args.student is None) != (args.reference is None):
        return _error("--student and --reference go together")
    if args.signal == "logratio" and args.student is None:
        return _error("--signal logratio needs --student and --reference")
    if args.q_source == "implicit" and not args.teacher_reference:
        return _error("--q-source implicit needs --teacher-reference (the teacher's DPO starting point)")
    prompt: Any = args.prompt
    if args.messages is not None:
        try:
            prompt = json.loads(args.messages)
        except json.JSONDecodeError as exc:
            return _error(f"--messages is not JSON: {exc}")
        if not isinstance(prompt, list):
            return _error("--messages must be a JSON list of {role, content} messages")
    try:
        method = MethodConfig(
            alpha=args.alpha,
            beta=args.beta,
            gamma=args.gamma,
            terminal=args.terminal,
            q_source=args.q_source,
            value_beta=args.value_beta,
            shaping=args.shaping,
        )
    except ConfigError as exc:
        return _error(str(exc))
    for warning in method.warnings():
        print(f"tvkd inspect: warning: {warning}", file=sys.stderr)

    import torch

    from tvkd.data import RowError
    from tvkd.fingerprints import tokenizer_fingerprint
    from tvkd.inspect import inspect_response
    from tvkd.models import ModelError, load_causal_lm, load_tokenizer
    from tvkd.render import render_table

    try:
        teacher_tok = load_tokenizer(args.teacher)
        teacher = load_causal_lm(args.teacher, dtype=torch.float32, device=args.device)
        teacher_reference = None
        if args.q_source == "implicit":
            ref_tok = load_tokenizer(args.teacher_reference)
            if tokenizer_fingerprint(ref_tok) != tokenizer_fingerprint(teacher_tok):
                return _error(
                    f"--teacher-reference {args.teacher_reference} has another tokenizer than the teacher"
                )
            teacher_reference = load_causal_lm(
                args.teacher_reference, dtype=torch.float32, device=args.device
            )
        student = reference = student_tok = None
        if args.student:
            student_tok = load_tokenizer(args.student)
            student = load_causal_lm(args.student, dtype=torch.float32, device=args.device)
            reference = load_causal_lm(args.reference, dtype=torch.float32, device=args.device)
    except ModelError as exc:
        return _error(str(exc))
    try:
        result = inspect_response(
            teacher,
            teacher_tok,
            prompt,
            args.response,
            method=method,
            student_model=student,
            reference_model=reference,
            student_tokenizer=student_tok,
            max_length=args.max_length,
            teacher_reference_model=teacher_reference,
        )
    except (RowError, ValueError) as exc:
        return _error(str(exc))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(render_table(result, color=_use_color(args), signal=args.signal))
    return 0
