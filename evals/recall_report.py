"""Tables and plot of the recall grid: each model at its best learning rate, accuracy per length.

The generated part of the markdown file sits between two marker lines and is rewritten on every
call; the prose around it (what the numbers mean) is kept.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from models.config import AGGREGATIONS

START, END = "<!-- recall-results:start -->", "<!-- recall-results:end -->"
TITLES = {"mqar": "MQAR accuracy (queried values predicted exactly)",
          "needle": "Needle-in-a-haystack accuracy (number generated exactly, through LLMEngine)"}


def load_runs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_by_model(runs: list[dict], task: str) -> dict[str, dict]:
    """model -> the summary of its best learning rate (accuracies averaged over seeds)."""
    by_lr: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in runs:
        if r["task"] == task:
            by_lr[(r["model"], r["lr"])].append(r)
    best: dict[str, dict] = {}
    for (model, lr), group in by_lr.items():
        lengths = list(group[0]["accuracy"])
        acc = {n: sum(r["accuracy"][n] for r in group) / len(group) for n in lengths}
        summary = {**group[0], "lr": lr, "accuracy": acc, "seeds": len(group),
                   "spread": {n: max(r["accuracy"][n] for r in group) - min(r["accuracy"][n] for r in group)
                              for n in lengths},
                   "train_seconds": sum(r["train_seconds"] for r in group) / len(group),
                   "end_losses": [r["loss_curve"][-1] for r in group if r.get("loss_curve")],
                   "mean": sum(acc.values()) / len(acc)}
        if model not in best or summary["mean"] > best[model]["mean"]:
            best[model] = summary
    return best


def _order(model: str) -> tuple:
    memory, _, aggregation = model.partition("-")
    return (memory == "transformer", memory, AGGREGATIONS.index(aggregation) if aggregation in AGGREGATIONS else 0)


def table(best: dict[str, dict]) -> str:
    if not best:
        return "_no runs_\n"
    lengths = list(next(iter(best.values()))["accuracy"])
    head = ("| model | params | fixed state | + bytes/token | best lr | "
            + " | ".join(f"acc @ {n}" for n in lengths) + " | end loss | train s/run |")
    rule = "|" + "---|" * (7 + len(lengths))
    rows = []
    for model in sorted(best, key=_order):
        s = best[model]
        accs = " | ".join(_acc(s, n) for n in lengths)
        rows.append(f"| {model} | {s['parameters']:,} | {_kib(s['fixed_state_bytes'])} | "
                    f"{s['bytes_per_token']:,.0f} | {s['lr']:g} | {accs} | {_end_loss(s)} | "
                    f"{_train_time(s)} |")
    return "\n".join([head, rule, *rows]) + "\n"


def _train_time(summary: dict) -> str:
    """Seconds per run, or whose training a twin shares (recall.TRAINS_AS: no time of its own)."""
    twin_of = summary.get("trained_as")
    return f"{twin_of}'s" if twin_of else f"{summary['train_seconds']:.0f}"


def _acc(summary: dict, n: str) -> str:
    text = f"{summary['accuracy'][n]:.3f}"
    return text + (f" ±{summary['spread'][n] / 2:.3f}" if summary["seeds"] > 1 else "")


def _end_loss(summary: dict) -> str:
    """Training loss over the last tenth of the run (mean over seeds): near zero when the task is
    solved, near log(#values) when the model never left chance."""
    curve = summary.get("end_losses")
    return f"{sum(curve) / len(curve):.2f}" if curve else "-"


def _kib(nbytes: float) -> str:
    return f"{nbytes / 1024:,.0f} KiB" if nbytes else "0"


def sweep_table(runs: list[dict], task: str) -> str:
    """Mean accuracy over lengths (and seeds) of every model at every learning rate it ran at;
    '-' where a model has no run at that rate. Empty when the grid used one learning rate."""
    cells: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["task"] == task:
            cells[r["model"]][r["lr"]].append(sum(r["accuracy"].values()) / len(r["accuracy"]))
    lrs = sorted({lr for per_lr in cells.values() for lr in per_lr})
    if len(lrs) < 2:
        return ""
    lines = ["| model | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|" + "---|" * (1 + len(lrs))]
    for model in sorted(cells, key=_order):
        row = [f"{sum(cells[model][lr]) / len(cells[model][lr]):.3f}" if cells[model][lr] else "-" for lr in lrs]
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def depth_table(runs: list[dict], best: dict[str, dict]) -> str:
    """Needle accuracy by depth (over lengths) for each model's best learning rate."""
    cells: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["task"] == "needle" and r["model"] in best and r["lr"] == best[r["model"]]["lr"]:
            for cell, acc in r.get("by_depth", {}).items():
                cells[r["model"]][cell.split("@")[1]].append(acc)
    if not cells:
        return ""
    depths = sorted(next(iter(cells.values())), key=float)
    lines = ["| model | " + " | ".join(f"depth {d}" for d in depths) + " |", "|" + "---|" * (1 + len(depths))]
    for model in sorted(cells, key=_order):
        lines.append(f"| {model} | " + " | ".join(
            f"{sum(cells[model][d]) / len(cells[model][d]):.2f}" for d in depths) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], tasks: list[str], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        best = best_by_model(runs, task)
        for model in sorted(best, key=_order):
            lengths = [int(n) for n in best[model]["accuracy"]]
            style = {"color": "black", "linewidth": 2.5} if model == "transformer" else \
                {"linestyle": "-" if model.startswith("gla") else "--", "marker": "o"}
            ax.plot(lengths, list(best[model]["accuracy"].values()), label=model, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_title(TITLES[task].split(" (")[0])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def results_markdown(runs: list[dict], grid, plot_name: str | None) -> str:
    tasks = [t for t in ("mqar", "needle") if any(r["task"] == t for r in runs)]
    parts = [f"Grid: {json.dumps(_grid_summary(grid))}\n"]
    for task in tasks:
        best = best_by_model(runs, task)
        parts.append(f"### {TITLES[task]}\n\n{table(best)}")
        sweep = sweep_table(runs, task)
        if sweep:
            parts.append(f"Mean accuracy over the lengths at each learning rate:\n\n{sweep}")
        if task == "needle":
            parts.append(f"By depth (0 = start of the haystack, 1 = just before the question):\n\n"
                         f"{depth_table(runs, best)}")
    if plot_name:
        parts.append(f"![accuracy against sequence length]({plot_name})\n")
    return "\n".join(parts)


def _grid_summary(grid) -> dict:
    keys = ("d_model", "n_layers", "n_heads", "segment_size", "lengths", "pairs", "vocab_size", "mqar_steps",
            "needle_steps", "lrs", "needle_lrs", "seeds", "tokens_per_batch")
    return {k: getattr(grid, k) for k in keys}


def write_report(results: Path, grid, markdown: Path) -> None:
    runs = load_runs(results)
    tasks = [t for t in ("mqar", "needle") if any(r["task"] == t for r in runs)]
    png = markdown.with_suffix(".png")
    has_plot = bool(tasks) and plot(runs, tasks, png)
    block = f"{START}\n{results_markdown(runs, grid, png.name if has_plot else None)}{END}"
    text = markdown.read_text() if markdown.exists() else f"# Recall evaluation\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n{START}\n{END}\n"
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(before + block + after)
