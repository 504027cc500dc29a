"""`mmkit plot METRICS.jsonl OUT.png [--key loss] [--smooth N] [--log]`: a training curve as a PNG.

Draws the raw values (thin) and a trailing moving average over N logged steps (thick). A step logged
twice (a resumed run redoes the steps after its last checkpoint) counts once, with its last value.
Example: `mmkit plot outputs/demo/metrics.jsonl outputs/demo/loss.png --smooth 20`.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("metrics", help="JSONL metrics file written by training (--metrics-file)")
    p.add_argument("out", help="PNG file to write")
    p.add_argument("--key", default="loss", help="which metric to plot (default: loss)")
    p.add_argument("--smooth", type=int, default=0, help="moving-average window in logged steps (0 = auto)")
    p.add_argument("--log", action="store_true", help="logarithmic y axis")


def run(a) -> int:
    out = plot_metrics(a.metrics, a.out, key=a.key, smooth=a.smooth, log_scale=a.log)
    print(f"wrote {out}")
    return 0


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values. Example: `moving_average([1, 3, 5], 2)` -> `[1.0, 2.0, 4.0]`."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_metrics(
    jsonl: str | Path, png: str | Path, key: str = "loss", smooth: int = 0, log_scale: bool = False
) -> Path:
    """Plot `key` against step from a metrics JSONL file into `png`; returns the PNG path.

    `smooth` = moving-average window (0 = about a tenth of the points). Raises ValueError if no line has `key`.
    Example: `plot_metrics("outputs/demo/metrics.jsonl", "outputs/demo/loss.png")`.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    from mmkit.train.metrics import read_metrics

    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise FileNotFoundError(f"plot: no metrics file {str(jsonl)!r}; train with --metrics-file PATH first")
    recs = [r for r in read_metrics(jsonl) if isinstance(r.get(key), int | float)]
    if not recs:
        raise ValueError(
            f"plot: {jsonl} has no numeric {key!r} values; try --key loss (or grad_norm, lr, ...)"
        )
    steps = [r["step"] for r in recs]
    values = [float(r[key]) for r in recs]
    window = smooth if smooth > 0 else max(1, len(values) // 10)

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    raw_alpha = 0.35 if window > 1 else 1.0  # the raw curve is the only one without smoothing
    ax.plot(steps, values, lw=0.8, alpha=raw_alpha, color="tab:blue", label=f"{key} (raw)")
    if window > 1:
        ax.plot(
            steps, moving_average(values, window), lw=2.0, color="tab:blue", label=f"{key} (mean of {window})"
        )
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"{key}: {values[0]:.4g} -> {values[-1]:.4g} over {steps[-1]} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png
