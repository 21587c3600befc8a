"""Summary, tables and plot of bench/replicate.py (numbers in, JSON-ready dict and markdown out)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import _replicate_stats as st
from _common import environment_line, markdown_table


def summarise(
    *,
    scale: dict[str, Any],
    methods: list[dict[str, Any]],
    split: str,
    teacher: dict[str, Any],
    student_params: int,
    starts: dict[int, dict[str, float]],
    runs: list[dict[str, Any]],
    skipped: dict[str, str],
    accuracy: list[dict[str, Any]],
    wall_s: float,
    cpu_s: float,
    load: tuple[tuple[float, ...], tuple[float, ...]],
    command: str,
    commit: str,
) -> dict[str, Any]:
    """Everything the tables and the plot show, plus every run, as one JSON-ready dict."""
    seeds = sorted(starts)
    gold = {m["name"]: {} for m in methods}
    for r in runs:
        gold[r["method"]][r["seed"]] = r["gold"]

    def series(name: str, which: str) -> list[float]:
        return [gold[name][s][which] for s in seeds]

    start = {w: [starts[s][w] for s in seeds] for w in ("dev", "test")}
    rows = []
    for m in methods:
        name = m["name"]
        mean, half = st.mean_ci(series(name, split))
        dev_mean, _ = st.mean_ci(series(name, "dev"))
        vs_start = st.paired(series(name, split), start[split])
        vs_dpo = st.paired(series(name, split), series("DPO", split)) if name != "DPO" else None
        rows.append(
            {
                "method": name,
                "gold": mean,
                "gold_ci": half,
                "dev_gold": dev_mean,
                "vs_start": vs_start.__dict__,
                "vs_dpo": vs_dpo.__dict__ if vs_dpo else None,
            }
        )
    compared = [r for r in rows if r["vs_dpo"]]
    for r, p in zip(compared, st.holm([r["vs_dpo"]["p"] for r in compared]), strict=True):
        r["vs_dpo"]["p_holm"] = p
    acc = []
    for a in accuracy:
        if "error" not in a:
            low, high = st.wilson(a["right"], a["n"])
            a = {**a, "accuracy": a["right"] / a["n"], "low": low, "high": high}
        acc.append(a)
    best = max(rows, key=lambda r: r["dev_gold"])
    start_mean, start_half = st.mean_ci(start[split])
    return {
        "env": environment_line(),
        "command": command,
        "commit": commit,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "load_before_after": load,
        "split": split,
        "seeds": seeds,
        "scale": scale,
        "teacher": {k: teacher[k] for k in ("params", "seconds", "gold")},
        "student": {
            "params": student_params,
            "start": start,
            "start_mean": start_mean,
            "start_ci": start_half,
        },
        "methods": methods,
        "table": rows,
        "shaping_accuracy": acc,
        "best_on_dev": best["method"],
        "skipped": skipped,
        "runs": runs,
    }


def json_ready(x: Any) -> Any:
    """NaN → None (strict JSON), tuples → lists, recursively."""
    if isinstance(x, float):
        return None if math.isnan(x) else x
    if isinstance(x, dict):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_ready(v) for v in x]
    return x


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _diff(p: dict[str, Any] | None) -> str:
    if not p:
        return "—"
    return f"{100 * p['mean']:+.1f} [{100 * p['low']:+.1f}, {100 * p['high']:+.1f}]"


def _p(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def tables(result: dict[str, Any]) -> str:
    """The result as markdown: setting line, gold table, shaping accuracy table, recommendation."""
    split, n = result["split"], len(result["seeds"])
    t, s = result["teacher"], result["student"]
    cpu = f", CPU {result['cpu_s'] / 60:.1f} min" if result.get("cpu_s") is not None else ""
    head = (
        f"{result['env']}\ncommit {result['commit']}; `{result['command']}`\n"
        f"wall {result['wall_s'] / 60:.1f} min{cpu}; load average before/after "
        f"{result['load_before_after'][0][0]:.1f}/{result['load_before_after'][1][0]:.1f}\n\n"
        f"Teacher {t['params']:,} params: gold ({split}) {_pct(t['gold']['sft'][split])}% after SFT, "
        f"{_pct(t['gold']['dpo'][split])}% after DPO. Student {s['params']:,} params, SFT start "
        f"{_pct(s['start_mean'])} ± {_pct(s['start_ci'])}% ({n} seeds).\n"
    )
    gold_rows = [
        [
            r["method"],
            f"{_pct(r['gold'])} ± {_pct(r['gold_ci'])}",
            _diff(r["vs_start"]),
            _diff(r["vs_dpo"]),
            _p(r["vs_dpo"]["p"]) if r["vs_dpo"] else "—",
            _p(r["vs_dpo"]["p_holm"]) if r["vs_dpo"] else "—",
            f"{r['vs_dpo']['wins']}/{r['vs_dpo']['n']}" if r["vs_dpo"] else "—",
            _pct(r["dev_gold"]),
        ]
        for r in result["table"]
    ]
    gold = markdown_table(
        [
            "method",
            f"gold % ({split}) ± 95% CI",
            "vs SFT start [95% CI]",
            "vs DPO [95% CI]",
            "p",
            "p (Holm)",
            "seeds > DPO",
            "dev gold %",
        ],
        gold_rows,
    )
    acc_rows = []
    for a in result["shaping_accuracy"]:
        if "error" in a:
            acc_rows.append([a["source"], "n/a", "n/a", "n/a", a["error"][:60]])
        else:
            acc_rows.append(
                [
                    a["source"],
                    f"{_pct(a['accuracy'])} [{_pct(a['low'])}, {_pct(a['high'])}]",
                    _pct(a["by_kind"]["procedure"]),
                    _pct(a["by_kind"]["corruption"]),
                    _pct(a["ties"] / a["n"]),
                ]
            )
    acc = markdown_table(
        ["teacher signal", "pairs ranked right % [95% CI]", "vs wrong procedure", "vs corruption", "ties %"],
        acc_rows,
    )
    skipped = "".join(f"\nskipped {k}: {v}" for k, v in result["skipped"].items())
    return (
        f"{head}\n{gold}{skipped}\n\nTeacher shaping accuracy on the student's training pairs "
        f"(Σψ(y_w) > Σψ(y_l), γ = 1):\n\n{acc}\n\nBest on the dev split: {result['best_on_dev']}"
    )


def plot(result: dict[str, Any], path: Path) -> None:
    """Gold accuracy per method with 95% intervals; the SFT start and the teacher as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["table"]
    names = [r["method"] for r in rows]
    means = [100 * r["gold"] for r in rows]
    errs = [0.0 if math.isnan(r["gold_ci"]) else 100 * r["gold_ci"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.6))
    y = list(range(len(rows)))[::-1]
    ax.errorbar(means, y, xerr=errs, fmt="o", color="tab:blue", capsize=3, label="student after training")
    ax.axvline(100 * result["student"]["start_mean"], color="tab:gray", ls="--", label="student SFT start")
    split = result["split"]
    ax.axvline(
        100 * result["teacher"]["gold"]["dpo"][split], color="tab:green", ls=":", label="teacher (DPO)"
    )
    ax.set_yticks(y, names)
    ax.set_xlabel(f"gold accuracy % ({split} split, greedy), mean ± 95% CI over {len(result['seeds'])} seeds")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
