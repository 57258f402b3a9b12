"""Peak memory and speed of a fine-tuning step at real models' shapes: full fine-tuning against LoRA,
and our LoRA (lora.py on gpt_llama.py) against peft's on the transformers model.

    python bench/lora.py [--models smollm2-135m,qwen2.5-0.5b] [--dtype float32,bfloat16] [--rank 16]
                         [--batch 1] [--seq 128] [--steps 5] [--turns 5] [--threads 1] [--no-train-py]

Each model is built by transformers with random weights of the exact shapes of its released config
(bench/real_models.py's MODELS) in each dtype, and saved; a step's compute and memory do not depend on
the weights' values. Then, for each contender, a fresh subprocess (so that memory peaks never mix) loads
the folder, runs --steps training steps on random tokens (forward, backward, AdamW, zero_grad) and
reports its peak RSS (VmHWM: everything the process ever held at once, torch and transformers
included, which a laptop has to have) and the tokens/s of its best step after the first:
- full: gpt_llama.Model.from_pretrained(dtype), every weight trains. In bf16 that is pure-bf16 AdamW,
  which train.py does not offer (it keeps float32 weights for full fine-tuning); shown for the memory.
- LoRA: the same model, lora.wrap(rank, alpha = 2 rank) on attention and MLP, the base frozen in
  dtype, the adapters in float32.
- peft: transformers' AutoModelForCausalLM.from_pretrained(dtype) with peft.get_peft_model and the
  same LoRA (q, k, v, o, gate, up, down projections); peft too keeps float32 adapters on a bf16 base.
AdamW is torch's, fused where it can be, as in train.py. Then one more subprocess loads our LoRA model
and peft's side by side and times their steps taking turns, each number the best of --turns: on
shared cores noise only ever slows a run down, and the side-by-side ratio is the comparison to trust:
the memory runs' tokens/s come from processes that ran minutes apart. --threads defaults to 1 because
on cores that other processes also use a second thread makes every timing swing by several times.
Finally (unless --no-train-py) train.py itself runs `--init <folder> --lora R --dtype bfloat16` for two
steps on the built-in corpus, with a BPE tokenizer trained here standing in for the model's, and the
peak RSS of that whole process (loading, training, evaluating, saving the merged float32 weights and
the adapters) is printed. Both models in both dtypes take about 8 minutes on 2 shared cores; the
largest process, full fine-tuning of Qwen2.5-0.5B in float32, peaks near 9 GiB.
"""

import argparse
import gc
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This file is bench/lora.py: the project's lora.py must come first on the path.
sys.path.insert(0, str(ROOT))
from real_models import MODELS, cpu_model, hf_config, memory_kb  # noqa: E402
from timing import adamw, best_times, quiet_transformers, timed  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
GIB = 1024**2  # kB per GiB
CONTENDERS = ("full", "lora", "peft")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save(key, dtype, folder):
    """Subprocess: transformers' model of MODELS[key] with random weights in dtype, saved to folder."""
    import torch

    transformers = quiet_transformers()
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_config(key), dtype=getattr(torch, dtype)).save_pretrained(folder)


def build(contender, folder, dtype, args):
    """(model, step function) of a contender, loaded from folder in dtype."""
    import torch

    g = torch.Generator().manual_seed(1)
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g)
    if contender == "peft":
        import peft

        transformers = quiet_transformers()
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=HF_TARGETS))

        def loss():
            # transformers shifts the labels itself: positions 0..T-1 predict 1..T, as ours below.
            return model(input_ids=ids, labels=ids, use_cache=False).loss
    else:
        import gpt_llama
        from llm_machinery import lora

        model = gpt_llama.Model.from_pretrained(folder, dtype=dtype)
        if contender == "lora":
            lora.wrap(model, args.rank)

        def loss():
            return model(ids[:, :-1], ids[:, 1:])[1]

    model.train()
    optimizer = adamw(lr=1e-4, params=[p for p in model.parameters() if p.requires_grad])

    def step():
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def measure(contender, key, dtype, folder, args):
    """Subprocess: peak RSS and tokens/s of one contender's training steps."""
    import torch

    torch.set_num_threads(args.threads)
    import gpt_llama  # noqa: F401  (imports out of the way of the memory baseline)
    from llm_machinery import lora  # noqa: F401

    if contender == "peft":
        import peft  # noqa: F401

        quiet_transformers()
    imported = memory_kb()["VmRSS"]
    model, step = build(contender, folder, dtype, args)
    times = [timed(step) for _ in range(args.steps)]
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"peak": memory_kb()["VmHWM"] / GIB, "imports": imported / GIB, "trained": trained,
            "params": sum(p.numel() for p in model.parameters()),
            "tokens_per_s": args.batch * args.seq / min(times[1:] or times)}


def side_by_side(key, dtype, folder, args):
    """Subprocess: our LoRA step against peft's, taking turns; tokens/s of each."""
    import torch

    torch.set_num_threads(args.threads)
    steps = [build(c, folder, dtype, args)[1] for c in ("lora", "peft")]
    gc.collect()
    best = best_times(steps, args.turns)
    return {"ours": args.batch * args.seq / best[0], "peft": args.batch * args.seq / best[1]}


def train_py(folder, args):
    """Subprocess: train.py --init folder --lora R --dtype bfloat16 for two steps; its peak RSS."""
    import train

    argv = ["--init", str(folder), "--out", str(Path(folder) / "run"), "--lora", str(args.rank), "--dtype", "bfloat16",
            "--max-steps", "2", "--batch-size", str(args.batch), "--set", f"max_seq_len={args.seq}",
            "--eval-tokens", str(args.batch * args.seq), "--sample-tokens", "0", "--no-plot", "--threads", str(args.threads)]
    code = train.main(argv)
    return {"code": code, "peak": memory_kb()["VmHWM"] / GIB}


def run_child(args, *hidden):
    """This script with a hidden flag in a fresh process; its last line of output, parsed as JSON."""
    command = [sys.executable, __file__, *hidden, "--threads", str(args.threads), "--rank", str(args.rank),
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--turns", str(args.turns)]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(command)} failed with exit status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def tokenizer_folder(folder):
    """A BPE tokenizer trained on the built-in corpus, saved in folder as Llama 3's tokenizer.model."""
    from pydoc_data.topics import topics

    import bpe

    tokenizer = bpe.train("\n\n".join(topics[k] for k in sorted(topics))[:200000], 1000)
    tokenizer.save(Path(folder) / "tok")
    shutil.copy(Path(folder) / "tok" / "tokenizer.tiktoken", Path(folder) / "tokenizer.model")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--dtype", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="steps of each memory run (tokens/s: the best after the first)")
    parser.add_argument("--turns", type=int, default=5, help="timed turns of each side-by-side contender")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-train-py", action="store_true", help="skip the end-to-end train.py run")
    parser.add_argument("--_save", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--_measure", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--_side", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--_train", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._save:
        save(*args._save)
        print("{}")
        return
    for flag, fn in ((args._measure, measure), (args._side, side_by_side), (args._train, train_py)):
        if flag:
            print(json.dumps(fn(*flag, args) if fn is not train_py else fn(flag[0], args)))
            return
    keys, dtypes = args.models.split(","), args.dtype.split(",")
    unknown = [k for k in keys if k not in MODELS] + [d for d in dtypes if d not in ("float32", "bfloat16")]
    if unknown:
        parser.error(f"unknown {unknown}")
    import torch

    start = time.perf_counter()
    print(f"torch {torch.__version__}, transformers {importlib.metadata.version('transformers')}, peft "
          f"{importlib.metadata.version('peft')}, {args.threads} thread(s), CPU: {cpu_model()} ({os.cpu_count()} "
          f"cores visible); random weights of the released shapes; batch {args.batch} x {args.seq} tokens, LoRA rank "
          f"{args.rank}, alpha {2 * args.rank}, on attention and MLP\n")
    print("| model | base dtype | method | trained parameters | peak RSS | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    names = {"full": "full fine-tuning", "lora": "LoRA, lora.py", "peft": "LoRA, peft on transformers"}
    speed, end_to_end = [], []
    for key in keys:
        for dtype in dtypes:
            with tempfile.TemporaryDirectory(prefix=f"lora-{key}-{dtype}-") as folder:
                run_child(args, "--_save", key, dtype, folder)
                os.sync()
                for contender in CONTENDERS:
                    r = run_child(args, "--_measure", contender, key, dtype, folder)
                    share = f"{r['trained'] / 1e6:,.1f}M ({100 * r['trained'] / r['params']:.2f}%)"
                    print(f"| {MODELS[key]['name']} | {dtype} | {names[contender]} | {share} | {r['peak']:.2f} GiB "
                          f"| {r['tokens_per_s']:,.0f} |", flush=True)
                s = run_child(args, "--_side", key, dtype, folder)
                speed.append(f"| {MODELS[key]['name']} | {dtype} | {s['ours']:,.0f} | {s['peft']:,.0f} | "
                             f"**{s['ours'] / s['peft']:.2f}x** |")
                if dtype == "bfloat16" and not args.no_train_py:
                    tokenizer_folder(folder)
                    with tempfile.TemporaryDirectory(prefix="cache-") as cache:
                        os.environ["LLMS_FROM_SCRATCH_CACHE"] = cache
                        t = run_child(args, "--_train", folder)
                    end_to_end.append(f"- {MODELS[key]['name']}: train.py --lora {args.rank} --dtype bfloat16 peaked at "
                                      f"{t['peak']:.2f} GiB resident (exit status {t['code']})")
    print(f"\nLoRA step side by side, best of {args.turns} turns each:\n")
    print("| model | base dtype | tokens/s lora.py | tokens/s peft | ours / peft |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(speed))
    if end_to_end:
        print("\nThe whole train.py process (loading, 2 steps, evaluation, saving merged weights and adapters):")
        print("\n".join(end_to_end))
    print(f"\nThe run took {(time.perf_counter() - start) / 60:.1f} min.")


if __name__ == "__main__":
    main()
