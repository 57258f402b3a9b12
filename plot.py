"""
loss.png of a training run, drawn from its metrics.jsonl: python plot.py out/gpt_llama

train.py draws it at the end of a run when matplotlib is installed (pip install -e ".[plots]").
"""

import json
import sys
from pathlib import Path

from corpus import atomic_write


def plot_run(out):
    """out/loss.png from out/metrics.jsonl; None, said on stdout, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so there is no loss.png (pip install -e \".[plots]\")")
        return None
    out = Path(out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(out.name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out / "loss.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out / "loss.png"


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "metrics.jsonl").is_file():
        print("usage: python plot.py RUN_FOLDER (a folder train.py wrote, holding metrics.jsonl)", file=sys.stderr)
        sys.exit(2)
    png = plot_run(sys.argv[1])
    if png:
        print(f"loss curve in {png}")

