"""
loss.png of a training run, drawn from its metrics.jsonl: python train.py --plot out/gpt_llama

One panel for the training and validation loss, then one for each other number the run logged:
each evaluation metric (bits per byte, perplexity; accuracies, with the per-question ones of an
image model beside its overall one), each summary metric of the model (a mixture of experts' load
balance) and each measure a pipeline gives of its steps (DPO's rewards/margins, ...), its held-out value
on the same panel. train.py draws it at the end of a run, and again when a finished run is rerun without one.
It needs matplotlib: pip install -e ".[plots]".
"""

import json
import math
from pathlib import Path

from llm_machinery.corpus import atomic_write

# What every step record holds; the rest of a record are the model's own metrics.
STEP_KEYS = {"step", "loss", "lr", "mfu", "time"}


def panels(records):
    """{title: {line label: [(step, value), ...]}} in drawing order, loss first."""
    out = {"loss": {}}
    for r in records:
        for key, value in r.items():
            if key == "step" or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if key == "loss":
                title, label = "loss", "train"
            elif key == "val_loss":
                title, label = "loss", "validation"
            elif "/" in key:  # a pipeline's measure of each step (TRL's rewards/margins, ...), its held-out value beside it
                title, label = key.removeprefix("val_"), "validation" if key.startswith("val_") else "train"
            elif key.startswith("val_"):
                name = key.removeprefix("val_")
                if name.startswith("accuracy"):  # val_accuracy_color and the like go beside val_accuracy
                    title, label = "accuracy", name.removeprefix("accuracy").strip("_") or "all"
                else:
                    title, label = name, name
            elif key in STEP_KEYS or key.endswith("_per_s") or any(c.isdigit() for c in key):
                continue  # speed, and indexed metrics (per layer, per expert), which would be dozens of lines
            else:
                title, label = key, key
            out.setdefault(title, {}).setdefault(label, []).append((r["step"], value))
    return {title: lines for title, lines in out.items() if lines}


def plot_run(out):
    """out/loss.png from out/metrics.jsonl; None, said on stdout, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed, so there is no loss.png (pip install -e ".[plots]")')
        return None
    out = Path(out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    drawn = panels(records)
    columns = min(3, len(drawn))
    rows = -(-len(drawn) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, drawn.items()):
        for label, points in lines.items():
            ax.plot(*zip(*points), "o-" if len(points) < 30 else "-", label=label, markersize=3, alpha=0.85)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    fig.suptitle(out.name)
    fig.tight_layout()
    atomic_write(out / "loss.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out / "loss.png"

