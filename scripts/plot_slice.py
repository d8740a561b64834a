"""The side-by-side table and plot of issue 17 from the rows ``bench_slice.py`` keeps.

Reads ``docs/results/data/slicegpt-side-by-side.json`` (a list of rows: model, method,
fraction, params, text, ppl, ...), prints one markdown table (every row at a parameter target:
SliceGPT and gradfree's methods at the same share of parameters removed, with times and peak
memory) and writes one PNG of held-out perplexity against parameters, a panel per model and
text, a curve per method::

    .venv/bin/python scripts/plot_slice.py --calibration news \
        --out docs/results/slicegpt-side-by-side.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from gradfree.base.plots import pyplot

TEXTS = ("news", "tourguide")
STYLE = {
    "slicegpt": "s-",
    "slicegpt-head-sliced": "s--",
    "gradfree-global": "o:",
    "gradfree-global-ls": "o--",
    "gradfree-prune-ls": "^-",
    "gradfree-prune-ls-heads": "v-",
}


def load(path: Path, calibration: str) -> list[dict[str, Any]]:
    rows = json.loads(path.read_text())
    return [r for r in rows if r["calibration"] in (calibration, "-")]


def table(rows: list[dict[str, Any]]) -> str:
    """One line per (model, target, method) at a parameter target, both texts side by side."""
    dense = {(r["model"], r["text"]): r["ppl"] for r in rows if r["method"] == "dense"}
    at: dict[tuple[str, float, str], dict[str, Any]] = defaultdict(dict)
    for r in rows:
        if "target_param_fraction" in r:
            key = (r["model"], float(r["target_param_fraction"]), r["method"])
            at[key][r["text"]] = r
    lines = [
        "| model | params removed (target) | method | params | news ppl | tour-guide ppl | "
        "fit (s) | peak RSS (GiB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for model in sorted({k[0] for k in at}):
        lines.append(
            f"| {model} | dense | – | – | {dense.get((model, 'news'), float('nan')):.2f} | "
            f"{dense.get((model, 'tourguide'), float('nan')):.2f} | – | – |"
        )
        for (m, target, method), by_text in sorted(at.items()):
            if m != model:
                continue
            r = next(iter(by_text.values()))
            ppl = {t: by_text[t]["ppl"] if t in by_text else float("nan") for t in TEXTS}
            lines.append(
                f"| {model} | {target:.0%} | {method} | {r['params'] / 1e6:.1f}M "
                f"({r['param_fraction_removed']:.1%}) | {ppl['news']:.2f} | "
                f"{ppl['tourguide']:.2f} | {r['seconds']:.0f} | {r.get('peak_rss_gib', 0):.2f} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    models = sorted({r["model"] for r in rows if r["method"] != "dense"})
    plt = pyplot()
    fig, axes = plt.subplots(
        len(models), len(TEXTS), figsize=(11, 3.6 * len(models)), squeeze=False
    )
    try:
        for i, model in enumerate(models):
            for j, text in enumerate(TEXTS):
                ax = axes[i][j]
                mine = [r for r in rows if r["model"] == model and r["text"] == text]
                series: dict[str, list[tuple[float, float]]] = defaultdict(list)
                for r in mine:
                    if r["method"] == "dense":
                        ax.axhline(r["ppl"], color="grey", lw=0.8, ls="--")
                        ax.plot([r["params"] / 1e6], [r["ppl"]], "k*", label="dense")
                        continue
                    series[r["method"]].append((r["params"] / 1e6, r["ppl"]))
                for method, pts in sorted(series.items()):
                    pts = sorted(set(pts))
                    ax.plot(
                        [p for p, _ in pts],
                        [y for _, y in pts],
                        STYLE.get(method, "o-"),
                        label=method,
                        markersize=4,
                    )
                ax.set_yscale("log")
                ax.set(
                    title=f"{model}: held-out {text}",
                    xlabel="parameters (M)",
                    ylabel="perplexity",
                )
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="docs/results/data/slicegpt-side-by-side.json")
    ap.add_argument("--calibration", default="news")
    ap.add_argument("--out", default="docs/results/slicegpt-side-by-side.png")
    args = ap.parse_args()
    rows = load(Path(args.json), args.calibration)
    print(table(rows))
    print(plot(rows, Path(args.out)))


if __name__ == "__main__":
    main()
