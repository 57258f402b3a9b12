"""Peak memory and speed of a DPO step (preferences.py on gpt_llama.py) against TRL's DPOTrainer on the
transformers model, at a real model's shape.

    python bench/dpo.py [--model smollm2-135m] [--pairs 2] [--prompt 32] [--answer 32] [--steps 4] [--turns 4]
                        [--rank 16] [--threads 1]

transformers builds the model with random weights of the released config's exact shapes (bench/
real_models.py's MODELS), saved in float32 and in bf16; a step's compute and memory do not depend on the
weights' values. Each batch holds --pairs pairs of random tokens: a prompt of --prompt tokens, then a
chosen and a rejected answer of --answer tokens each (TRL appends its eos to each). Two setups, each
contender in a fresh subprocess (so that memory peaks never mix) that loads its model, runs --steps DPO
steps (forward of chosen and rejected rows, the reference, backward, AdamW, zero_grad) and reports its
peak RSS (VmHWM) and the pairs/s of its best step after the first:
- LoRA on a bf16 base (rank R, alpha 2R, attention and MLP projections): the reference is the same
  model with its adapters switched off, computed at each step; ours lora.disabled, TRL's a peft_config.
- full fine-tuning in float32, one model in memory: the reference's log-probabilities precomputed before
  the first step; ours Preferences.prepare's, TRL's precompute_ref_log_probs. TRL's default, a second
  model as the reference (ref_model), is measured too.
TRL's step is its compute_loss on the collated batch (its fused LM head, which never builds the logits),
backward and torch's AdamW, as ours, so the Trainer's own loop (logging, accelerate) is not counted. Then
our LoRA step and TRL's take turns in one more process, each the best of --turns: on shared cores
noise only ever slows a run down, and the side-by-side ratio is the comparison to trust.
"""

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from real_models import MODELS, cpu_model, hf_config, memory_kb  # noqa: E402
from timing import adamw, best_times, quiet_transformers, timed  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
GIB = 1024**2  # kB per GiB
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETA = 0.1


def save(key, dtype, folder):
    """Subprocess: transformers' model of MODELS[key] with random weights in dtype, saved to folder."""
    import torch

    transformers = quiet_transformers()
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_config(key), dtype=getattr(torch, dtype)).save_pretrained(folder)


def random_pairs(vocab, args):
    """(prompt, chosen, rejected) token lists of each pair, ids from 2 on (0 pads, 1 is TRL's eos)."""
    import torch

    g = torch.Generator().manual_seed(1)
    return [[torch.randint(2, vocab, (n,), generator=g).tolist() for n in (args.prompt, args.answer, args.answer)]
            for _ in range(args.pairs)]


def build_ours(folder, dtype, lora_rank, args):
    """Our model and DPO step: the pairs' rows as preferences.batch makes them, ending in the eos TRL adds."""
    import numpy as np

    import gpt_llama
    from llm_machinery import lora, preferences

    model = gpt_llama.Model.from_pretrained(folder, dtype=dtype)
    if lora_rank:
        lora.wrap(model, lora_rank)
    examples = []
    for prompt, chosen, rejected in random_pairs(model.config.vocab_size, args):
        rows = [(np.array(prompt + a + [1]), np.array([False] * len(prompt) + [True] * (len(a) + 1))) for a in (chosen, rejected)]
        examples.append((*rows, None))
    batch = preferences.batch(examples)
    if not lora_rank:  # the reference's log-probabilities, once, before the first step
        ref = preferences.reference_logps(model, batch["idx"], batch["targets"])
        batch["ref"] = ref
    model.train()
    optimizer = adamw(lr=1e-5, params=[p for p in model.parameters() if p.requires_grad])

    def step():
        loss, _ = preferences.batch_loss(model, batch, BETA)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def word_tokenizer(vocab):
    """A tokenizer whose word "t{i}" is id i, but for <pad> (0) and </s> (1): TRL tokenizes text, and random
    ids are written as such words. (Special tokens are found inside words: an eos called t1 would split t123.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers

    transformers = quiet_transformers()
    words = {"<pad>": 0, "</s>": 1, **{f"t{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def build_trl(folder, dtype, lora_rank, args, reference="precompute"):
    """TRL's DPOTrainer on the same pairs (as text of words that its tokenizer reads back as the same ids)
    and its DPO step; reference: "precompute", "ref_model" or, with lora_rank, adapters off."""
    import datasets
    import torch
    import trl

    transformers = quiet_transformers()
    dtype = getattr(torch, dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = word_tokenizer(model.config.vocab_size)
    text = [{"prompt": " ".join(f"t{i}" for i in p), "chosen": " " + " ".join(f"t{i}" for i in c),
             "rejected": " " + " ".join(f"t{i}" for i in r)} for p, c, r in random_pairs(model.config.vocab_size, args)]
    kwargs = {}
    if lora_rank:
        import peft

        kwargs["peft_config"] = peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=HF_TARGETS)
    elif reference == "ref_model":
        kwargs["ref_model"] = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    with tempfile.TemporaryDirectory() as out:
        config = trl.DPOConfig(output_dir=out, report_to=[], use_cpu=True, bf16=False, beta=BETA,
                               per_device_train_batch_size=len(text), precompute_ref_log_probs=reference == "precompute"
                               and not lora_rank, disable_dropout=True, max_length=None)
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(text),
                                 processing_class=tokenizer, **kwargs)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(text))])
    assert batch["input_ids"].shape[1] == args.prompt + args.answer + 1, batch["input_ids"].shape
    trainer.model.train()
    optimizer = adamw(lr=1e-5, params=[p for p in trainer.model.parameters() if p.requires_grad])

    def step():
        trainer.compute_loss(trainer.model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return trainer.model, step


CONTENDERS = {  # name: (setup, base dtype, builder, its keyword arguments)
    "ours-lora": ("LoRA, bf16 base", "bfloat16", build_ours, {"lora": True}),
    "trl-lora": ("LoRA, bf16 base", "bfloat16", build_trl, {"lora": True}),
    "ours-full": ("full, float32", "float32", build_ours, {}),
    "trl-full": ("full, float32", "float32", build_trl, {}),
    "trl-full-ref": ("full, float32", "float32", build_trl, {"reference": "ref_model"}),
}
NAMES = {"ours-lora": "preferences.py, adapters off", "trl-lora": "TRL DPOTrainer + peft, adapters off",
         "ours-full": "preferences.py, reference precomputed", "trl-full": "TRL DPOTrainer, precompute_ref_log_probs",
         "trl-full-ref": "TRL DPOTrainer, ref_model (its default)"}


def build(name, folder, args):
    _, _, builder, kwargs = CONTENDERS[name]
    kwargs = dict(kwargs)
    rank = args.rank if kwargs.pop("lora", False) else 0
    return builder(folder, CONTENDERS[name][1], rank, args, **kwargs)


def measure(name, folder, args):
    """Subprocess: peak RSS and pairs/s of one contender's steps."""
    import torch

    torch.set_num_threads(args.threads)
    model, step = build(name, folder, args)
    times = [timed(step) for _ in range(args.steps)]
    return {"peak": memory_kb()["VmHWM"] / GIB, "pairs_per_s": args.pairs / min(times[1:] or times),
            "trained": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def side_by_side(folder, args):
    """Subprocess: our LoRA step and TRL's, taking turns; pairs/s of each."""
    import torch

    torch.set_num_threads(args.threads)
    steps = [build(name, folder, args)[1] for name in ("ours-lora", "trl-lora")]
    gc.collect()
    best = best_times(steps, args.turns)
    return {"ours": args.pairs / best[0], "trl": args.pairs / best[1]}


def run_child(args, *hidden):
    command = [sys.executable, __file__, *hidden, "--threads", str(args.threads), "--rank", str(args.rank),
               "--pairs", str(args.pairs), "--prompt", str(args.prompt), "--answer", str(args.answer),
               "--steps", str(args.steps), "--turns", str(args.turns)]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(command)} failed with exit status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(MODELS))
    parser.add_argument("--pairs", type=int, default=2, help="pairs per batch")
    parser.add_argument("--prompt", type=int, default=32, help="tokens of each prompt")
    parser.add_argument("--answer", type=int, default=32, help="tokens of each answer")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="steps of each memory run (speed: the best after the first)")
    parser.add_argument("--turns", type=int, default=4, help="timed turns of each side-by-side contender")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--_save", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_side", nargs=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._save:
        save(*args._save)
        print("{}")
        return
    if args._measure:
        print(json.dumps(measure(*args._measure, args)))
        return
    if args._side:
        print(json.dumps(side_by_side(args._side[0], args)))
        return
    import torch

    start = time.perf_counter()
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("transformers", "trl", "peft"))
    print(f"torch {torch.__version__}, {versions}, {args.threads} thread(s), CPU: {cpu_model()}; "
          f"{MODELS[args.model]['name']}'s shape with random weights; {args.pairs} pairs a batch, prompts of "
          f"{args.prompt} tokens, answers of {args.answer} + 1; LoRA rank {args.rank}, alpha {2 * args.rank}\n")
    print("| setup | contender | trained parameters | peak RSS | pairs/s |")
    print("| --- | --- | --- | --- | --- |", flush=True)
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as root:
        folders = {}
        for dtype in ("bfloat16", "float32"):
            folders[dtype] = Path(root) / dtype
            run_child(args, "--_save", args.model, dtype, str(folders[dtype]))
        for name, (setup, dtype, _, _) in CONTENDERS.items():
            r = run_child(args, "--_measure", name, str(folders[dtype]))
            print(f"| {setup} | {NAMES[name]} | {r['trained'] / 1e6:,.1f}M | {r['peak']:.2f} GiB | {r['pairs_per_s']:.2f} |",
                  flush=True)
        s = run_child(args, "--_side", str(folders["bfloat16"]))
    print(f"\nLoRA DPO step side by side, best of {args.turns} turns each: preferences.py {s['ours']:.2f} pairs/s, "
          f"TRL {s['trl']:.2f} pairs/s, **{s['ours'] / s['trl']:.2f}x**")
    print(f"\nThe run took {(time.perf_counter() - start) / 60:.1f} min.")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
