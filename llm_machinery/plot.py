"""
loss.png of a training run, drawn from its metrics.jsonl: python train.py --plot out/gpt_llama

One panel for the training and validation loss, then one for each other number the run logged:
each evaluation metric (bits per byte, perplexity; accuracies, with the per-question ones of an
image model beside its overall one), each summary metric of the model (a mixture of experts' load
balance) and each measure a pipeline gives of its steps (DPO's rewards/margins, ...), with its held-out
value on the same panel. Every panel says in words what it shows, with its unit and a legend that tells
training batches from validation; a metric that never changed is said once in the figure's title
instead of drawn flat. A model file names its own metrics in METRICS ({name: (title, unit)}); the
pipelines' names are below. train.py draws it at the end of a run, and again when a finished run is
rerun without one. It needs matplotlib: pip install -e ".[plots]".
"""

import importlib
import json
import math
from pathlib import Path

from llm_machinery.corpus import atomic_write

# What every step record holds; the rest of a record are the model's own metrics.
STEP_KEYS = {"step", "loss", "lr", "mfu", "time"}
# What the pipelines log (data.py, images.py, conversations.py, preferences.py), as panel titles and units.
EVALUATIONS = {
    "loss": ("loss: what training minimises", "nats"),
    "ppl": ("perplexity of validation text", "e ** (nats per token)"),
    "bpb": ("bits per byte of validation text", "bits per byte"),
    "accuracy": ("accuracy on validation examples", "share right"),
    "rewards/chosen": ("reward of the chosen answers, beta (log p - log p_ref)", "nats x beta"),
    "rewards/rejected": ("reward of the rejected answers, beta (log p - log p_ref)", "nats x beta"),
    "rewards/accuracies": ("pairs whose chosen answer has the higher reward", "share"),
    "rewards/margins": ("reward margin: chosen minus rejected", "nats x beta"),
    "logps/chosen": ("log-probability of the chosen answers", "nats"),
    "logps/rejected": ("log-probability of the rejected answers", "nats"),
}


def panels(records):
    """{panel: {line label: [(step, value), ...]}} in drawing order, loss first, and {panel: value} of
    the metrics that never changed. Training batches' numbers are labelled "training", evaluations'
    "validation" (a per-question accuracy "validation: <question>")."""
    out = {"loss": {}}
    for r in records:
        for key, value in r.items():
            if key == "step" or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            if key == "loss":
                panel, label = "loss", "training"
            elif "/" in key:  # a pipeline's measure of each step (TRL's rewards/margins, ...), its held-out value beside it
                panel, label = key.removeprefix("val_"), "validation" if key.startswith("val_") else "training"
            elif key.startswith("val_"):
                name = key.removeprefix("val_")
                panel = "accuracy" if name.startswith("accuracy") else name
                question = name.removeprefix("accuracy").strip("_") if panel == "accuracy" else ""
                label = f"validation: {question}" if question else "validation"
            elif key in STEP_KEYS or key.endswith("_per_s") or any(c.isdigit() for c in key):
                continue  # speed, and indexed metrics (per layer, per expert), which would be dozens of lines
            else:
                panel, label = key, "training"
            out.setdefault(panel, {}).setdefault(label, []).append((r["step"], value))
    drawn, constant = {}, {}
    for panel, lines in out.items():
        values = {v for points in lines.values() for _, v in points}
        if panel != "loss" and len(values) == 1 and sum(map(len, lines.values())) > 1:
            constant[panel] = values.pop()
        elif lines:
            drawn[panel] = lines
    return drawn, constant


def described(panel, metrics):
    """(title, unit) of a panel: the model file's METRICS, else the evaluations', else its own name."""
    return metrics.get(panel) or EVALUATIONS.get(panel) or (panel, "")


def model_metrics(out):
    """METRICS of the model file that trained the run in out, {} where it names none or is not found."""
    try:
        name = json.loads((out / "config.json").read_text())["model"]
        return dict(getattr(importlib.import_module(name), "METRICS", {}))
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        return {}


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
    metrics = model_metrics(out)
    drawn, constant = panels(records)
    columns = min(3, len(drawn))
    rows = -(-len(drawn) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, drawn.items()):
        title, unit = described(panel, metrics)
        for label, points in lines.items():
            ax.plot(*zip(*points), "o-" if len(points) < 30 else "-", label=label, markersize=3, alpha=0.85)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(unit, fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    heading = out.name
    if constant:
        same = "; ".join(f"{described(p, metrics)[0]} {value:g}" for p, value in constant.items())
        heading += f"\nthe same all through the run: {same}"
    fig.suptitle(heading, fontsize=11)
    fig.tight_layout()
    atomic_write(out / "loss.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out / "loss.png"
