"""Print the README's "How a job moves" block (the stage table and the state diagram), made from
the state machine the code declares (service/statemachine.py); with --check, fail when the
README's copy is out of date (tests/test_readme.py runs that).

    python scripts/job_states.py            # print the markdown
    python scripts/job_states.py --write    # rewrite the README section in place
"""

from __future__ import annotations

import sys
from pathlib import Path

from service.statemachine import FIRST_STAGE, PATHS, STAGES, TERMINAL, TRANSITIONS, Status

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- JOB-STATES:BEGIN -->", "<!-- JOB-STATES:END -->"


def stage_table() -> str:
    head = ["stage", "status while it runs", "queue", "Celery task", "runner (`worker/stages.py`)", "next"]
    rows = ["| " + " | ".join([*head, "what runs"]) + " |", "|---|---|---|---|---|---|---|"]
    for s in STAGES.values():
        nxt = " or ".join(f"`{n}`" for n in s.next) if s.next else "— (`succeeded`)"
        queue = f"`{s.queue}`" + (f", `{s.queue}.n<N>` (num_processes N > 1)" if s.sized else "")
        rows.append(f"| `{s.name}` | `{s.status}` | {queue} | `{s.task}` | `{s.runner}` | {nxt} | {s.doc} |")
    return "\n".join(rows)


def diagram() -> str:
    """The stage flow as a state diagram (mermaid); the stops are listed below it."""
    lines = ["```mermaid", "stateDiagram-v2", "    direction LR"]
    first = STAGES[FIRST_STAGE].status
    lines.append(f"    [*] --> {first} : POST /v1/jobs")
    lines.append(f"    [*] --> {Status.WAITING} : POST /v1/jobs naming a job:ID model")
    lines.append(f"    {Status.WAITING} --> {first} : the named jobs succeeded")
    seen: set[tuple[str, str]] = set()

    def edge(a: str, b: str, label: str) -> None:
        if (a, b) not in seen:
            seen.add((a, b))
            lines.append(f"    {a} --> {b} : {label}")

    for s in STAGES.values():
        for n in s.next:
            edge(s.status, Status.QUEUED, f"{s.name} done")
            edge(Status.QUEUED, STAGES[n].status, f"{n} starts")
        if s.last:
            edge(s.status, Status.SUCCEEDED, f"{s.name} done")
    for status in sorted(TERMINAL):
        lines.append(f"    {status} --> [*]")
    lines.append("```")
    return "\n".join(lines)


def stops() -> str:
    """The other moves of TRANSITIONS (cancel and failure), in words."""
    flow = {(Status.WAITING, STAGES[FIRST_STAGE].status)}
    for s in STAGES.values():  # a hand-back: the stage waits in the queue and starts again
        flow |= {(s.status, Status.QUEUED), (Status.QUEUED, s.status)}
    for s in STAGES.values():
        for n in s.next:
            flow |= {(s.status, Status.QUEUED), (Status.QUEUED, STAGES[n].status)}
        if s.last:
            flow.add((s.status, Status.SUCCEEDED))
    by_targets: dict[tuple[str, ...], list[str]] = {}
    for src, targets in TRANSITIONS.items():
        rest = tuple(sorted(t.value for t in targets if (src, t) not in flow))
        if rest:
            by_targets.setdefault(rest, []).append(src.value)
    parts = [
        f"{' / '.join(f'`{s}`' for s in sources)} → {', '.join(f'`{t}`' for t in targets)}"
        for targets, sources in by_targets.items()
    ]
    return (
        "Besides the flow above: "
        + "; ".join(parts)
        + ". A stage whose worker shuts down goes back to `queued` and starts again on another "
        + f"worker. Terminal states ({', '.join(f'`{s}`' for s in sorted(TERMINAL))}) are final."
    )


def paths_table() -> str:
    """Each job kind's path through the stages (PATHS)."""
    rows = ["| job kind | stages |", "|---|---|"]
    rows += [f"| `{kind}` | {' → '.join(f'`{s}`' for s in path)} |" for kind, path in PATHS.items()]
    return "\n".join(rows)


def render() -> str:
    return "\n\n".join(
        [
            BEGIN,
            "The stages and statuses below are generated from `service/statemachine.py` "
            "(`python scripts/job_states.py --write`; a test keeps them current).",
            stage_table(),
            paths_table(),
            diagram(),
            stops(),
            END,
        ]
    )


def main(argv: list[str]) -> int:
    text = README.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0:
        print(f"README.md lacks the {BEGIN} … {END} markers", file=sys.stderr)
        return 1
    current = text[start : end + len(END)]
    if "--write" in argv:
        README.write_text(text.replace(current, render()))
        return 0
    if "--check" in argv:
        if current != render():
            print("README job states are stale: python scripts/job_states.py --write")
            return 1
        return 0
    print(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
