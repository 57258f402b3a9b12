"""What to expect from gpt_llama.py running small open models on a laptop-class CPU: load time, memory, tokens/s.

    python bench/real_models.py [--models smollm2-135m,qwen2.5-0.5b,llama-3.2-1b] [--dtype float32,bfloat16]
                                [--threads 2] [--turns N] [--prompt 128] [--new-tokens 32]

The checkpoints cannot be downloaded here, so each model is built with random weights of the exact
shapes of its released config.json. Every field of those files that shapes the model or its decoding
is written out in MODELS below (transformers' config defaults are not relied on, and the config it
builds is checked field by field against them), and the saved folder gets that config.json as
released (rope_theta, rope_scaling at the top level), which both loaders then read:
- SmolLM2-135M (HuggingFaceTB/SmolLM2-135M): LlamaForCausalLM, hidden 576, 30 layers, 9 heads, 3 KV
  heads, intermediate 1536, vocab 49152, tied embeddings, rope_theta 1e5, context 8192, eps 1e-5;
- Qwen2.5-0.5B (Qwen/Qwen2.5-0.5B): Qwen2ForCausalLM (biases on q, k, v), hidden 896, 24 layers, 14
  heads, 2 KV heads, intermediate 4864, vocab 151936, tied, rope_theta 1e6, context 32768, eps 1e-6,
  no sliding window;
- Llama 3.2 1B (meta-llama/Llama-3.2-1B): LlamaForCausalLM, hidden 2048, 16 layers, 32 heads, 8 KV
  heads, intermediate 8192, vocab 128256, tied, rope_theta 5e5 with Llama 3 RoPE scaling (factor 32,
  low_freq_factor 1, high_freq_factor 4, original context 8192), context 131072, eps 1e-5.
The compute and the memory of a forward pass do not depend on the weights' values, so the timings
are those of the real models (only where greedy decoding stops could differ: here it never stops).

For each model and --dtype, one subprocess builds transformers' model with random weights in that
dtype and saves it with save_pretrained (safetensors), standing in for the download; a second, fresh
subprocess, so that memory peaks of different models never mix, then
1. loads it with gpt_llama.Model.from_pretrained(folder, dtype=...) and times that (from a warm page
   cache, the file having just been written). safetensors maps the file and, the dtype being the
   file's, nothing is copied: the load takes a fraction of a second and the weights are read in as
   the first call touches them. "peak RSS added" is therefore the peak resident memory (VmHWM) added
   by the load and a first call, over the process after its imports. (The released files are bf16:
   loading one in float32, from_pretrained's default, casts a copy, which this does not measure.)
2. loads transformers' AutoModelForCausalLM from the same folder in the same dtype (its load time and
   memory are printed below the table, the peak reset with /proc/self/clear_refs where allowed);
3. decodes greedily at batch 1 from the same random prompt of --prompt tokens, --new-tokens new
   tokens, ours (generate_stream, which generate wraps, with temperature=0) against transformers'
   generate(do_sample=False, max_new_tokens=n, min_new_tokens=n) with its default (sdpa) attention.
   Each call is split at its first new token: the prompt's pass (prefill tok/s = prompt / time to
   the first token) and the n - 1 decoding steps after it (decode tok/s = (n - 1) / their time).
   Then checks that both pick the same tokens: float32 must agree (the script exits with 1 if not);
   bf16 may round differently in places and is only reported.
After one warm-up call each (2 new tokens), the contenders take turns, who goes first alternating,
and each number is the best of --turns (3) turns: on shared cores noise only ever slows a run down.
All three models in both dtypes take about 7 minutes on 2 idle cores (a turn of the 1B model in
float32 takes ~25 s), the largest process peaking near 10 GiB (the 1B model in float32: 4.6 GiB of
weights, mapped by ours and by transformers side by side). On cores that other processes also use,
2 threads swing by 2-3x from one turn to the next (prefills of 18 and 59 tok/s at the same work have
been seen), and the best of the turns is no steady number: then try --threads 1, or more --turns.
"""

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

# The released config.json of each model, every field that shapes the model or its decoding (left out:
# nanotron's and Qwen's unused flags, such as rope_interleaved and use_mrope, both false). head_dim is
# written although SmolLM2's and Qwen2.5's files leave it implicit (hidden / heads = 64 in all three),
# and SmolLM2's mlp_bias although its file predates the field (False, as in Llama 3.2's).
MODELS = {
    "smollm2-135m": dict(
        name="SmolLM2-135M",
        config=dict(
            architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
            intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
            hidden_act="silu", max_position_embeddings=8192, initializer_range=0.041666666666666664,
            rms_norm_eps=1e-5, rope_theta=100000.0, rope_scaling=None, tie_word_embeddings=True,
            attention_bias=False, mlp_bias=False, attention_dropout=0.0, pretraining_tp=1, use_cache=True,
            bos_token_id=0, eos_token_id=0,
        ),
    ),
    "qwen2.5-0.5b": dict(
        name="Qwen2.5-0.5B",
        config=dict(
            architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
            intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
            hidden_act="silu", max_position_embeddings=32768, initializer_range=0.02, rms_norm_eps=1e-6,
            rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=True, use_sliding_window=False,
            sliding_window=32768, max_window_layers=24, attention_dropout=0.0, use_cache=True,
            bos_token_id=151643, eos_token_id=151643,
        ),
    ),
    "llama-3.2-1b": dict(
        name="Llama 3.2 1B",
        config=dict(
            architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=2048,
            intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
            hidden_act="silu", max_position_embeddings=131072, initializer_range=0.02, rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192, rope_type="llama3"),
            tie_word_embeddings=True, attention_bias=False, mlp_bias=False, attention_dropout=0.0, pretraining_tp=1,
            use_cache=True, bos_token_id=128000, eos_token_id=128001,
        ),
    ),
}
DTYPES = ("float32", "bfloat16")


def hf_config(key):
    """transformers' config of MODELS[key], checked field by field against the released values."""
    import transformers

    fields = dict(MODELS[key]["config"])
    cls = transformers.AutoConfig.for_model(fields["model_type"]).__class__
    config = cls.from_dict(fields)
    # transformers >= 5 folds rope_theta and rope_scaling into rope_parameters.
    rope = getattr(config, "rope_parameters", None) or {}
    expected_rope = dict(fields["rope_scaling"] or {}, rope_theta=fields["rope_theta"])
    expected_rope.setdefault("rope_type", "default")
    wrong = {k: rope.get(k) for k, v in expected_rope.items() if rope.get(k) != v}
    # Qwen2Config keeps sliding_window only where use_sliding_window is set (Qwen2.5's is not).
    ignored = {"rope_theta", "rope_scaling", "model_type"} | ({"sliding_window"} if "use_sliding_window" in fields
                                                              and not fields["use_sliding_window"] else set())
    for name, value in fields.items():
        if name not in ignored and getattr(config, name, None) != value:
            wrong[name] = getattr(config, name, None)
    if wrong:
        raise RuntimeError(f"transformers' {cls.__name__} did not keep the released values of {wrong}")
    return config


def memory_kb():
    """VmRSS, VmHWM (the peak of VmRSS), RssAnon and RssFile of this process, in kB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(status[k].split()[0]) for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def reset_peak():
    """Reset VmHWM to the current VmRSS; whether the kernel allowed it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def save(key, dtype, folder):
    """Subprocess: transformers' model of MODELS[key] with random weights in dtype, saved to folder."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(key), dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    # The config.json as released (transformers 5 would write rope_parameters, and layer_types for Qwen2), so
    # that both loaders read the file a download brings.
    released = dict(MODELS[key]["config"], torch_dtype=dtype)
    (Path(folder) / "config.json").write_text(json.dumps(released, indent=2) + "\n")


def measure(key, dtype, folder, args):
    """Subprocess: load ours and transformers' from folder, time their decoding; a dict for the JSON line."""
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    sys.path.insert(0, str(ROOT))
    import gpt_llama

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    config = MODELS[key]["config"]
    # Import what the loaders import (the modelling code, safetensors) before the baseline of memory.
    getattr(transformers, config["architectures"][0])
    importlib.import_module("safetensors.torch")
    torch_dtype = getattr(torch, dtype)
    gb = 1024**2  # kB per GiB

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config["vocab_size"], (1, args.prompt), generator=g)
    eos = config["eos_token_id"]
    models = {}

    def run_ours(n):
        """(time to the first new token, time of the n - 1 after it, the n new tokens)"""
        tokens, first = [], None
        start = time.perf_counter()
        for t in models["ours"].generate_stream(prompt, n, temperature=0):
            tokens.append(t)
            first = first or time.perf_counter()
        end = time.perf_counter()
        return first - start, end - first, torch.cat(tokens)

    class Clock(BaseStreamer):
        """When generate hands out each new token (its first put is the prompt)."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run_theirs(n):
        clock = Clock()
        start = time.perf_counter()
        out = models["theirs"].generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                        max_new_tokens=n, min_new_tokens=n, eos_token_id=eos, pad_token_id=eos,
                                        streamer=clock)
        end = time.perf_counter()
        first = clock.times[1]
        return first - start, end - first, out[0, prompt.size(1):]

    def load(name, loader, warm_up):
        """Load a model; its load time and the memory added by loading it and a first (warm-up) call.

        safetensors maps the file into memory, so the weights become resident as they are first read,
        and count as file-backed pages (RssFile), which the page cache shares, where no cast copies them.
        """
        gc.collect()
        resets = reset_peak()
        base = memory_kb()
        start = time.perf_counter()
        models[name] = loader().eval()
        seconds = time.perf_counter() - start
        warm_up(2)  # the prompt's shapes and one decoding step
        now = memory_kb()
        return {f"load_{name}": seconds, f"peak_{name}": (now["VmHWM"] - base["VmRSS"]) / gb if resets else None,
                f"resident_{name}": (now["VmRSS"] - base["VmRSS"]) / gb,
                f"file_{name}": (now["RssFile"] - base["RssFile"]) / gb}

    result = load("ours", lambda: gpt_llama.Model.from_pretrained(folder, dtype=torch_dtype), run_ours)
    result.update(load("theirs", lambda: transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype),
                       run_theirs))
    result["params"] = models["ours"].num_params()
    result["attn_theirs"] = models["theirs"].config._attn_implementation

    contenders = (run_ours, run_theirs)
    best = [[float("inf")] * 2 for _ in contenders]
    tokens = [[] for _ in contenders]
    seconds = [[] for _ in contenders]  # (prefill, decode) of each turn, for the JSON line only
    for turn in range(args.turns):
        for i in (0, 1) if turn % 2 == 0 else (1, 0):  # who goes first alternates
            run = contenders[i]
            prefill, decode, new = run(args.new_tokens)
            best[i] = [min(best[i][0], prefill), min(best[i][1], decode)]
            tokens[i].append(new)
            seconds[i].append((round(prefill, 3), round(decode, 3)))
    n = args.new_tokens
    result.update(
        turns=args.turns, seconds_ours=seconds[0], seconds_theirs=seconds[1],
        prefill_ours=args.prompt / best[0][0], prefill_theirs=args.prompt / best[1][0],
        decode_ours=(n - 1) / best[0][1], decode_theirs=(n - 1) / best[1][1],
        # Leading tokens on which every turn of both agrees (n: all).
        agree=min(leading_agreement(tokens[0][0], t) for t in tokens[0] + tokens[1]),
        eos_ours=bool((torch.cat(tokens[0]) == eos).any()),
    )
    return result


def leading_agreement(a, b):
    """How many leading entries of the 1-d tensors a and b are equal."""
    differ = (a != b).nonzero()
    return int(differ[0]) if len(differ) else len(a)


def gib(x):
    return "-" if x is None else f"{x:.2f} GiB"


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def run_child(flag, key, dtype, folder, args):
    """Run this script with a hidden flag in a fresh process; its last line of output, parsed as JSON."""
    command = [sys.executable, __file__, flag, key, dtype, str(folder), "--threads", str(args.threads),
               "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens)]
    command += ["--turns", str(args.turns)]
    out = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(command)} failed with exit status {out.returncode}")
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--dtype", default=",".join(DTYPES), help="comma-separated: float32, bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--turns", type=int, default=3, help="timed turns of each contender")
    parser.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--_save", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._save:
        save(*args._save)
        return
    if args._measure:
        print(json.dumps(measure(*args._measure, args)))
        return

    keys, dtypes = args.models.split(","), args.dtype.split(",")
    unknown = [k for k in keys if k not in MODELS] + [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown {unknown}; models: {', '.join(MODELS)}; dtypes: {', '.join(DTYPES)}")
    if args.new_tokens < 2 or args.prompt < 1 or args.threads < 1 or args.turns < 1:
        parser.error("need --new-tokens >= 2 and --prompt, --threads, --turns >= 1")
    import torch

    run_start = time.perf_counter()
    print(f"torch {torch.__version__}, transformers {importlib.metadata.version('transformers')}, "
          f"{args.threads} thread(s), CPU: {cpu_model()} ({os.cpu_count()} cores visible); random weights of the "
          f"released shapes; batch 1, prompt {args.prompt} tokens, {args.new_tokens} new tokens, greedy\n")
    print("| model | dtype | parameters | load s | peak RSS added | prefill tok/s ours | prefill tok/s transformers "
          "| decode tok/s ours | decode tok/s transformers | decode ours / transformers | tokens agree |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    notes, failed = [], False
    for key in keys:
        for dtype in dtypes:
            with tempfile.TemporaryDirectory(prefix=f"{key}-{dtype}-") as folder:
                start = time.perf_counter()
                run_child("--_save", key, dtype, folder, args)
                os.sync()  # the download is on disk: no writeback of it competes with the timings
                saved = time.perf_counter() - start
                size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 1024**3
                r = run_child("--_measure", key, dtype, folder, args)
            n = args.new_tokens
            agree = "yes" if r["agree"] == n else f"**no**: first {r['agree']} of {n}"
            failed |= dtype == "float32" and r["agree"] < n
            name = MODELS[key]["name"]
            print(f"| {name} | {dtype} | {r['params'] / 1e6:,.0f}M | {r['load_ours']:.1f} | {gib(r['peak_ours'])} "
                  f"| {r['prefill_ours']:,.0f} | {r['prefill_theirs']:,.0f} | {r['decode_ours']:.1f} "
                  f"| {r['decode_theirs']:.1f} | **{r['decode_ours'] / r['decode_theirs']:.2f}x** | {agree} |",
                  flush=True)
            notes.append(
                f"- {name} {dtype}: {size:.2f} GiB of safetensors (built, saved and synced in {saved:.0f} s). After loading "
                f"and a first call, ours holds {gib(r['resident_ours'])} more ({gib(r['file_ours'])} of it the "
                f"mapped file); transformers ({r['attn_theirs']} attention) loads in {r['load_theirs']:.1f} s, "
                f"peaks at {gib(r['peak_theirs'])} more and holds {gib(r['resident_theirs'])} more "
                f"({gib(r['file_theirs'])} mapped). Best of {r['turns']} turns."
                + (" Ours picked the eos token, which min_new_tokens forbids transformers." if r["eos_ours"] else ""))
            gc.collect()
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # kB on Linux
    print("\nload s: gpt_llama.Model.from_pretrained; peak RSS added: by loading it and its first call, over the "
          "process after its imports.\n" + "\n".join(notes))
    print(f"\nThe run took {(time.perf_counter() - run_start) / 60:.1f} min; its largest subprocess peaked at "
          f"{largest:.1f} GiB resident.")
    if failed:
        sys.exit("float32 greedy tokens differ between ours and transformers")


if __name__ == "__main__":
    main()
