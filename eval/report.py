"""Markdown tables, JSON summaries and the accuracy-distribution figure."""

from __future__ import annotations

import json
from pathlib import Path

from eval.metrics import summarize, welch


def write_json(path: str | Path | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")


def mcq_table(results: dict[str, dict]) -> str:
    lines = [
        "| system | accuracy mean | std | min | max | rounds | invalid/round | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s = summarize(r["accuracy"])
        inv = sum(r["invalid"]) / max(1, r["rounds"])
        lines.append(
            f"| {name} | {100 * s.mean:.1f}% | {100 * s.std:.1f} | {100 * s.min:.1f}% | "
            f"{100 * s.max:.1f}% | {r['rounds']} | {inv:.1f} | {sum(r['errors'])} |"
        )
    return "\n".join(lines)


def welch_lines(results: dict[str, dict]) -> str:
    names = list(results)
    out = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            w = welch(results[names[i]]["accuracy"], results[names[j]]["accuracy"])
            out.append(
                f"- Welch t-test {names[i]} vs {names[j]}: t = {w['t']:.3f}, p = {w['p']:.4g}"
            )
    return "\n".join(out)


def wrong_table(results: dict[str, dict], limit: int = 20) -> str:
    names = list(results)
    first = results[names[0]]["per_question"]
    lines = [
        "| question | " + " | ".join(f"{n} correct" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for qi, q in enumerate(first[:limit]):
        cells = [
            f"{results[n]['per_question'][qi]['n_correct']}/{results[n]['rounds']}" for n in names
        ]
        lines.append(f"| {q['question'][:70]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy(results: dict[str, dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    data = [[100 * a for a in r["accuracy"]] for r in results.values()]
    ax.boxplot(data, tick_labels=list(results), showmeans=True)
    for i, d in enumerate(data, 1):
        ax.scatter([i] * len(d), d, alpha=0.4, s=12)
    ax.axhline(25, ls="--", c="grey", lw=0.8, label="chance (25%)")
    ax.set_ylabel("accuracy per round (%)")
    ax.set_title("Multiple-choice accuracy over rounds")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
