"""
The sweep that chose gpt_llama.py's TRAIN_RECIPE: train each candidate recipe for the same wall-time
budget on the built-in corpus and compare validation bits per byte (lower is better).

    python bench/sweep.py --budget 300                 # every candidate, 5 minutes each
    python bench/sweep.py --budget 100 --only base,wide  # a quick look at a few
    python bench/sweep.py --budget 300 --table bench/sweep_gpt_llama.md   # append the table there

Each run is `python train.py --model gpt_llama --time-budget B --fresh ...`, so the budget covers the
same things as the default run (startup, evaluation, saving) except tokenizer training: the tokenizers
of all vocabulary sizes are trained and cached before the first timed run. Timings on a shared
machine are noisy: the table records the budget, the date, the load average and the tokens/s each
run reached, so that a reader can judge.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def llama(dim, n_layers, ctx, heads=4, kv=2):
    """Config overrides of a LLaMA-style model: head size dim / heads, SwiGLU width about 8/3 dim."""
    return dict(dim=dim, n_layers=n_layers, n_heads=heads, n_kv_heads=kv, ffn_dim=int(8 * dim / 3 / 8) * 8, max_seq_len=ctx)


# name: (Config overrides, other train.py flags). Everything not named comes from TRAIN_RECIPE.
CANDIDATES = {
    "d128-L4-c128-b8": (llama(128, 4, 128), dict(vocab_size=2048, batch_size=8, lr=3e-3)),
    "d128-L4-c128-b16": (llama(128, 4, 128), dict(vocab_size=2048, batch_size=16, lr=3e-3)),
    "d128-L4-c256-b4": (llama(128, 4, 256), dict(vocab_size=2048, batch_size=4, lr=3e-3)),
    "d128-L2-c128-b8": (llama(128, 2, 128), dict(vocab_size=2048, batch_size=8, lr=3e-3)),
    "d128-L6-c128-b8": (llama(128, 6, 128), dict(vocab_size=2048, batch_size=8, lr=3e-3)),
    "d192-L4-c128-b8": (llama(192, 4, 128, heads=6), dict(vocab_size=2048, batch_size=8, lr=3e-3)),
    "d256-L3-c128-b8": (llama(256, 3, 128), dict(vocab_size=2048, batch_size=8, lr=2e-3)),
    "d128-L4-c128-b8-v1k": (llama(128, 4, 128), dict(vocab_size=1024, batch_size=8, lr=3e-3)),
    "d128-L4-c128-b8-v4k": (llama(128, 4, 128), dict(vocab_size=4096, batch_size=8, lr=3e-3)),
    "d128-L4-c128-b8-lr1.5e-3": (llama(128, 4, 128), dict(vocab_size=2048, batch_size=8, lr=1.5e-3)),
    # Second round, around the lower learning rate and small batch that led the first; the first
    # entry repeats a first-round run to show the noise between two runs of one recipe.
    "d128-L4-c128-b8-lr1.5e-3-again": (llama(128, 4, 128), dict(vocab_size=2048, batch_size=8, lr=1.5e-3)),
    "d128-L4-c128-b8-lr1e-3": (llama(128, 4, 128), dict(vocab_size=2048, batch_size=8, lr=1e-3)),
    "d128-L4-c128-b4-lr1.5e-3": (llama(128, 4, 128), dict(vocab_size=2048, batch_size=4, lr=1.5e-3)),
    "d128-L2-c128-b8-lr1.5e-3": (llama(128, 2, 128), dict(vocab_size=2048, batch_size=8, lr=1.5e-3)),
    "d128-L3-c128-b8-lr1.5e-3": (llama(128, 3, 128), dict(vocab_size=2048, batch_size=8, lr=1.5e-3)),
    "d192-L3-c128-b8-lr1.5e-3": (llama(192, 3, 128, heads=6), dict(vocab_size=2048, batch_size=8, lr=1.5e-3)),
    # Third round, at the full 300 s: with ~115k training tokens, a run of several epochs overfits
    # (the d128-L3 run's validation loss rose after step 1000), so try dropout.
    "d192-L3-c128-b8-lr1.5e-3-drop0.1": (llama(192, 3, 128, heads=6) | dict(dropout=0.1), dict(vocab_size=2048, batch_size=8, lr=1.5e-3)),
    "d192-L3-c128-b8-lr1.5e-3-drop0.2": (llama(192, 3, 128, heads=6) | dict(dropout=0.2), dict(vocab_size=2048, batch_size=8, lr=1.5e-3)),
}


ROUND_2 = list(CANDIDATES).index("d128-L4-c128-b8-lr1.5e-3-again")
ROUND_3 = list(CANDIDATES).index("d192-L3-c128-b8-lr1.5e-3-drop0.1")

# Left out of a plain run: too slow to learn much in a few minutes on two shared cores.
SKIP = {"d128-L6-c128-b8", "d256-L3-c128-b8"}

# Shared by every candidate: a short warmup, as the runs take only a few hundred steps.
COMMON = dict(warmup_steps=20)


def flags(config, other):
    out = []
    other = {**COMMON, **other}
    for key, value in config.items():
        out += ["--set", f"{key}={value}"]
    for key, value in other.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def run(name, budget, workdir, extra):
    config, other = CANDIDATES[name]
    out = workdir / name
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", "gpt_llama", "--time-budget", str(budget), "--fresh",
           "--out", str(out), "--sample-tokens", "0", "--no-plot", *flags(config, other), *extra]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return {"name": name, "error": proc.returncode}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val_bpb" in r][-1]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    params = next((line.split(":")[1].split("M")[0].strip() for line in proc.stdout.splitlines() if "M parameters" in line), "?")
    return {"name": name, "params_M": params, "steps": final["step"], "tok_s": sum(speeds) / max(1, len(speeds)),
            "val_loss": final["val_loss"], "val_bpb": final["val_bpb"], "wall": wall,
            "recipe": {**config, **other}}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budget", type=float, default=300, help="seconds of wall time per run")
    p.add_argument("--only", default=None, help="comma-separated candidate names (default: all but SKIP)")
    p.add_argument("--round", type=int, default=None, help="only the candidates of this round (1, 2 or 3)")
    p.add_argument("--workdir", default="/tmp/llms-from-scratch-sweep", help="where the runs write")
    p.add_argument("--table", default=None, help="append the markdown table to this file")
    p.add_argument("extra", nargs="*", help="more train.py flags for every run, after --")
    args = p.parse_args()
    names = args.only.split(",") if args.only else [n for n in CANDIDATES if n not in SKIP]
    if args.round:
        starts = [0, ROUND_2, ROUND_3, len(CANDIDATES)]
        names = [n for n in names if starts[args.round - 1] <= list(CANDIDATES).index(n) < starts[args.round]]

    sys.path.insert(0, str(ROOT))
    from llm_machinery import data

    for vocab in sorted({CANDIDATES[n][1]["vocab_size"] for n in names}):
        data.CausalLM(None, vocab_size=vocab)  # train and cache outside the timed runs

    load_before = os.getloadavg()[0]
    rows = []
    for name in names:
        r = run(name, args.budget, Path(args.workdir), args.extra)
        rows.append(r)
        print(json.dumps(r), flush=True)
    header = (f"\n### budget {args.budget:g} s per run, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{os.cpu_count()} cores shared with other jobs (load average {load_before:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end)\n\n"
              "| run | recipe | params (M) | steps | tokens/s | val loss | val bpb | wall (s) |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- |\n")
    lines = []
    for r in sorted(rows, key=lambda r: r.get("val_bpb", 99)):
        if "error" in r:
            lines.append(f"| {r['name']} | failed (exit {r['error']}) | | | | | | |")
            continue
        recipe = ", ".join(f"{k}={v}" for k, v in r["recipe"].items() if k not in ("n_heads", "n_kv_heads"))
        lines.append(f"| {r['name']} | {recipe} | {r['params_M']} | {r['steps']} | {r['tok_s']:.0f} | "
                     f"{r['val_loss']:.4f} | **{r['val_bpb']:.4f}** | {r['wall']:.0f} |")
    table = header + "\n".join(lines) + "\n"
    print(table)
    if args.table:
        with open(args.table, "a") as f:
            f.write(table)


if __name__ == "__main__":
    main()
