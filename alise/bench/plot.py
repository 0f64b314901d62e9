"""Plots for the serving benchmarks (normalized latency against request rate, one line per policy), and the
per-point medians of a repeated sweep they draw."""
from __future__ import annotations

import statistics
from pathlib import Path

COLORS = {"fcfs": "tab:blue", "alise": "tab:red", "oracle": "tab:green"}
MARKERS = {"fcfs": "o", "alise": "s", "oracle": "^"}
LABELS = {"fcfs": "FCFS (vLLM)", "alise": "ALISE", "oracle": "Oracle (true lengths)"}


def median_rows(results: list[dict]) -> list[dict]:
    """One row per (policy, rate) of a sweep's runs (several per point when it was repeated): the median normalized
    latency, its lowest and highest, the median preemption count, and whether every run kept up with its arrivals
    (none stopped past saturation or flagged not ``sustained``)."""
    out = []
    for key in dict.fromkeys((r["policy"], r["rate"]) for r in results):
        rows = [r for r in results if (r["policy"], r["rate"]) == key]
        lat = [r["normalized_latency"] for r in rows]
        out.append({"policy": key[0], "rate": key[1], "normalized_latency": statistics.median(lat),
                    "min_normalized_latency": min(lat), "max_normalized_latency": max(lat),
                    "num_preemptions": statistics.median(r.get("num_preemptions", 0) for r in rows),
                    "sustained": not any(r.get("saturated") or not r.get("sustained", True) for r in rows),
                    "repeats": len(rows)})
    return out


def plot_sweep(report: dict, path: str | Path, title: str | None = None) -> Path:
    """Normalized latency (s/token) vs request rate (req/s) from a ``sim`` / ``serve`` JSON report.

    The paper's figure style: one line per policy, the latency bounds as dashed horizontal lines. Runs that did
    not keep up with their arrivals, or were stopped early past saturation (their value is then a lower bound,
    clipped to the top of the axis), are drawn hollow. A repeated sweep (rows tagged ``repeat``) draws each rate's
    median over the repeats and shades the band from the lowest to the highest; a point is hollow when any repeat
    fell behind.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    results = report["results"]
    bounds = report.get("bounds", [])
    top = 1.3 * max(bounds) if bounds else None
    order = {"fcfs": 0, "alise": 1, "oracle": 2}
    repeated = any(r.get("repeat", 0) > 0 for r in results)
    clip = (lambda y: min(y, top)) if top else (lambda y: y)
    points = median_rows(results)
    for policy in sorted(dict.fromkeys(r["policy"] for r in points), key=lambda p: order.get(p, 9)):
        rows = sorted((r for r in points if r["policy"] == policy), key=lambda r: r["rate"])
        xs = [r["rate"] for r in rows]
        ys = [clip(r["normalized_latency"]) for r in rows]
        color, marker = COLORS.get(policy), MARKERS.get(policy, "o")
        line, = ax.plot(xs, ys, color=color, marker=marker, label=LABELS.get(policy, policy), linewidth=1.8,
                        markersize=5)
        color = line.get_color()      # a name without a colour of its own (a system: vllm) keeps its line's
        if repeated:     # the median of the repeats, and the band from their lowest to their highest
            ax.fill_between(xs, [clip(r["min_normalized_latency"]) for r in rows],
                            [clip(r["max_normalized_latency"]) for r in rows], color=color, alpha=0.15, linewidth=0)
        sat = [(x, y) for x, y, r in zip(xs, ys, rows) if not r["sustained"]]
        if sat:
            ax.plot(*zip(*sat), linestyle="none", marker=marker, markersize=8, markerfacecolor="white",
                    color=color)
    for b in bounds:
        ax.axhline(b, color="gray", linestyle="--", linewidth=0.8)
        ax.text(ax.get_xlim()[0], b, f" {b:.3g}", va="bottom", ha="left", fontsize=7, color="gray")
    if top:
        ax.set_ylim(0, top)
    ax.set_xlabel("Request rate (req/s)")
    ax.set_ylabel("Normalized latency (s/token)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    ax.set_title(title or report.get("title", ""), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
