"""Benchmarks of moe.py.

    python bench/moe.py speed [--repeats 5]
    python bench/moe.py quality [--budget 60]

speed: tokens/s of a training forward + backward, moe.Model against transformers' MixtralForCausalLM
on the same config and weights, in one run: against its default experts implementation, "grouped_mm"
(sorted by expert like ours; on CPU it loops over the experts with one matmul each, as we do), and
against its "eager" one (a boolean mask and a gather per expert). Two shapes: Mixtral's (8 experts, top 2,
wide experts) and a fine-grained one (32 narrow experts, top 4, as in DeepSeekMoE). Each number is the
best of --repeats timings, ours and theirs taking turns, because the cores are shared and noise only
slows a run down. Target: >= 1.5x transformers.

quality: MoE against a dense gpt_llama.py model with the same active parameters per token, and MoE
without any balancing, each trained by `python train.py` for the same --budget seconds of wall time on
the default corpus. Prints a table of validation loss, bits per byte and the experts' coefficient of
variation (from the last logged training step). Every run uses one thread (--threads 1). The default
60 s keeps four runs within the shared machine's patience; such short runs on cores shared with other
jobs are noisy (the steps column shows how much work each run got) and cannot rank close recipes.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import moe  # noqa: E402

SHAPES = {
    "mixtral-like": dict(n_experts=8, top_k=2, expert_dim=512),
    "fine-grained": dict(n_experts=32, top_k=4, expert_dim=128),
}


def best_time(fn, repeats, clock=time.perf_counter):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def speed(args):
    import transformers

    torch.set_num_threads(args.threads)
    # With one thread, the process's CPU time is the time it would take on an idle core; wall time on
    # a shared machine mostly measures the neighbours.
    clock = time.process_time if args.threads == 1 else time.perf_counter
    vocab, batch, context = 2048, 8, 256
    print(f"forward + backward, batch {batch} x {context} tokens, float32, torch threads {torch.get_num_threads()}, "
          f"{'CPU' if args.threads == 1 else 'wall'} time, load average {os.getloadavg()[0]:.1f}")
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        hf_config = transformers.MixtralConfig(
            vocab_size=vocab, hidden_size=256, intermediate_size=shape["expert_dim"], num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, num_local_experts=shape["n_experts"],
            num_experts_per_tok=shape["top_k"], max_position_embeddings=context, attn_implementation="sdpa",
        )
        theirs = transformers.MixtralForCausalLM(hf_config).train()
        with tempfile.TemporaryDirectory() as folder:
            theirs.save_pretrained(folder)
            ours = moe.Model.from_pretrained(folder).train()
        ours.config.z_loss_coef = 0.0  # transformers has no z-loss; both add the balancing loss
        idx = torch.randint(0, vocab, (batch, context))

        def step_ours():
            ours(idx, idx)[1].backward()

        def step_theirs(implementation):
            theirs.set_experts_implementation(implementation)
            theirs(idx, labels=idx, output_router_logits=True).loss.backward()

        times = {"ours": [], "grouped_mm": [], "eager": []}
        for _ in range(args.repeats):  # take turns so that a burst of load hits all
            times["ours"].append(best_time(step_ours, 1, clock))
            times["grouped_mm"].append(best_time(lambda: step_theirs("grouped_mm"), 1, clock))
            times["eager"].append(best_time(lambda: step_theirs("eager"), 1, clock))
        tps = {k: idx.numel() / min(v) for k, v in times.items()}
        print(f"{name:13s} {ours.num_params() / 1e6:5.2f}M params ({ours.num_params(active=True) / 1e6:.2f}M active) | "
              f"ours {tps['ours']:5.0f} tok/s | transformers grouped_mm (default) {tps['grouped_mm']:5.0f} tok/s, "
              f"eager {tps['eager']:5.0f} tok/s | ratio {tps['ours'] / tps['grouped_mm']:.2f}x the default, "
              f"{tps['ours'] / tps['eager']:.2f}x eager")


def train_run(name, model, sets, budget, workdir):
    out = workdir / name
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", model, "--time-budget", str(budget), "--fresh",
           "--out", str(out), "--sample-tokens", "0", "--no-plot", "--log-every", "5", "--threads", "1"]
    # Both models get moe.py's batch, learning rate, warmup and tokenizer, so only the layers differ.
    r = moe.TRAIN_RECIPE
    cmd += ["--batch-size", str(r["batch_size"]), "--lr", str(r["lr"]), "--warmup-steps", str(r["warmup_steps"]),
            "--vocab-size", str(r["vocab_size"])]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name}: train.py failed:\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [r for r in records if "val_bpb" in r][-1]
    logged = [r for r in records if "loss" in r]
    speeds = [r["tokens_per_s"] for r in logged]
    return dict(name=name, steps=final["step"], val_loss=final["val_loss"], val_bpb=final["val_bpb"],
                tok_s=sum(speeds) / max(1, len(speeds)),
                cv=logged[-1].get("cv") if logged else None, maxvio=logged[-1].get("maxvio") if logged else None,
                wall=time.time() - start)


def quality(args):
    recipe = moe.TRAIN_RECIPE["config"]
    c = moe.Config(**recipe)
    # The dense model's SwiGLU is as wide as the k routed experts (and the shared ones) together.
    dense_ffn = c.top_k * c.expert_dim + c.n_shared_experts * c.shared_expert_dim
    dense = {k: recipe[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "dropout") if k in recipe}
    runs = [
        ("moe (recipe)", "moe", {}),
        ("moe, no aux loss, no bias", "moe", dict(aux_loss_coef=0.0, bias_update_rate=0.0)),
        ("moe, aux loss only", "moe", dict(bias_update_rate=0.0)),
        (f"dense gpt_llama ffn {dense_ffn}", "gpt_llama", dict(dense, ffn_dim=dense_ffn)),
    ]
    load = os.getloadavg()[0]
    print(f"{args.budget:.0f} s of wall time per run, load average {load:.1f} on {os.cpu_count()} cores; "
          f"moe recipe {recipe}")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, model, sets in runs:
            rows.append(train_run(name, model, sets, args.budget, Path(workdir)))
            r = rows[-1]
            cv = "-" if r["cv"] is None else f"{r['cv']:.2f}"
            maxvio = "-" if r["maxvio"] is None else f"{r['maxvio']:.2f}"
            print(f"| {name:30s} | {r['steps']:5d} steps | {r['tok_s']:5.0f} tok/s | val loss {r['val_loss']:.4f} | "
                  f"bpb {r['val_bpb']:.4f} | cv {cv:>4s} | maxvio {maxvio:>4s} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["speed", "quality"], nargs="?", default="speed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for speed (default 1: on shared "
                        "cores a second thread mostly waits for the first, which swamps the comparison)")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of wall time per training run")
    args = parser.parse_args()
    speed(args) if args.what == "speed" else quality(args)


if __name__ == "__main__":
    main()
