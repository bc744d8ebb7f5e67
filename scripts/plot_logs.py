"""Loss and learning-rate curves of a training run, as PNG and SVG (light and dark variants).

    python scripts/plot_logs.py WORKDIR [--out DIR] [--smooth 0.9]

Reads WORKDIR/metrics.jsonl and writes loss-{light,dark}-mode.{png,svg} and
lr-{light,dark}-mode.{png,svg} to DIR (default WORKDIR/plots), like the figures of the
original's README.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

THEMES = {
    "light": {"fg": "#24292f", "grid": "#d0d7de", "line": "#0969da", "raw": "#8c959f"},
    "dark": {"fg": "#c9d1d9", "grid": "#30363d", "line": "#58a6ff", "raw": "#6e7681"},
}


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"expected {path} (written by training), found nothing; pass a training workdir")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"{path} is empty: the run has not logged a step yet")
    return records


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style exponential smoothing with bias correction."""
    out, acc = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def plot(steps, values, *, ylabel: str, theme: str, smooth: float, out: pathlib.Path, stem: str) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = THEMES[theme]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    fig.patch.set_alpha(0.0)
    ax.set_facecolor("none")
    if smooth > 0:
        ax.plot(steps, values, color=colors["raw"], linewidth=0.8, alpha=0.5)
        ax.plot(steps, ema(values, smooth), color=colors["line"], linewidth=1.6)
    else:
        ax.plot(steps, values, color=colors["line"], linewidth=1.6)
    ax.set_xlabel("step", color=colors["fg"])
    ax.set_ylabel(ylabel, color=colors["fg"])
    ax.tick_params(colors=colors["fg"])
    for spine in ax.spines.values():
        spine.set_color(colors["grid"])
    ax.grid(True, color=colors["grid"], linewidth=0.6)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        path = out / f"{stem}-{theme}-mode.{ext}"
        fig.savefig(path, dpi=150, transparent=True)
        paths.append(path)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="output folder (default WORKDIR/plots)")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA weight for the loss curve, 0 = none")
    args = parser.parse_args(argv)
    records = [r for r in read_metrics(args.workdir) if "loss" in r]  # training lines; eval lines carry eval/... figures
    out = args.out or args.workdir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    steps = np.asarray([r["step"] for r in records])
    paths = []
    for theme in THEMES:
        loss = np.asarray([float(r["loss"]) for r in records])
        lr = np.asarray([float(r["lr"]) for r in records])
        paths += plot(steps, loss, ylabel="loss", theme=theme, smooth=args.smooth, out=out, stem="loss")
        paths += plot(steps, lr, ylabel="learning rate", theme=theme, smooth=0.0, out=out, stem="lr")
    print("\n".join(str(p) for p in paths))
    return paths


if __name__ == "__main__":
    main()
