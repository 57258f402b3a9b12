"""
Train any model file of this project: python train.py --model gpt_llama

The model file says what it needs (see README.md): TASK picks the data pipeline in data.py,
TRAIN_RECIPE the defaults below, Model.metrics() extra numbers to log. Nothing here knows a model by name.

The loop: AdamW (fused where the device has it; no weight decay on norms, biases and embeddings),
linear warmup then cosine decay to min_lr_ratio of the peak, gradient clipping and accumulation, bf16
autocast on CUDA, DDP under torchrun (gloo on CPU, nccl on CUDA).

Length of the run: --max-steps fixes it (and then no time budget applies unless --time-budget is
given). Otherwise --time-budget seconds of wall time, counted from the start of this script and
including data preparation, evaluation, sampling and saving: the number of steps is estimated from
the measured step time, re-estimated every 10 steps, and training stops early enough for the final
evaluation. The cosine schedule decays over that estimate, which the checkpoint keeps for resuming.

Checkpoints go to --out (default out/<model>), written atomically: model.safetensors (weights),
config.json (model name and Config), the tokenizer, state.pt (optimizer, step, schedule, RNG state,
data position; torch.load(weights_only=True) reads it), metrics.jsonl and loss.png (with matplotlib).
Running the same command again resumes from state.pt; the data order depends only on (seed, step),
so a resumed run ends with the same weights as an uninterrupted one. SIGINT and SIGTERM save and exit.

MFU is flops_per_token * tokens/s / peak FLOP/s of the devices. The peak is known only for the CUDA
GPUs in PEAK_BF16_FLOPS (dense bf16) or given by --peak-flops; otherwise MFU is shown as "-".
"""

import time

START = time.time()  # the time budget counts from here, so it covers importing torch too

import argparse  # noqa: E402
import ast
import contextlib
import dataclasses
import importlib
import json
import math
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import data

ROOT = Path(__file__).resolve().parent

DEFAULT_MODEL = "gpt_llama"

# What train.py uses when a model file's TRAIN_RECIPE leaves a key out.
DEFAULTS = dict(
    config={},  # Config field overrides; config["max_seq_len"] is the training context
    vocab_size=2048,  # tokenizer vocabulary: 256 bytes + merges
    batch_size=16,  # sequences per micro-batch per process
    grad_accum=1,  # micro-batches per optimizer step
    lr=1e-3,  # peak learning rate
    min_lr_ratio=0.1,  # the cosine ends at lr * min_lr_ratio
    warmup_steps=50,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,
    time_budget=300,  # seconds of wall time for the whole run
    eval_every=100,  # steps between evaluations
    eval_tokens=32768,  # validation tokens per evaluation (whole windows; 0: all)
)

# Dense bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("RTX 4090", 165e12),
]


class CliError(Exception):
    """Bad input, said in one sentence; main() prints it and returns 2."""


# ------------------------------------------------------------------------------------ model files


def model_choices():
    """Files next to this script that define Model, Config and TASK at top level, found without importing them."""
    found = []
    for path in sorted(ROOT.glob("*.py")):
        try:
            tree = ast.parse(path.read_text())
        except (SyntaxError, UnicodeDecodeError):
            continue
        names = set()
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        if {"Model", "Config", "TASK"} <= names:
            found.append(path.stem)
    return found


def import_model(name):
    choices = model_choices()
    if name not in choices:
        raise CliError(f"unknown model {name!r}; choose one of: {', '.join(choices)}")
    return importlib.import_module(name)


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def build_config(module, overrides):
    fields = {f.name for f in dataclasses.fields(module.Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise CliError(f"Config of {module.__name__} has no field {', '.join(unknown)}; its fields: {', '.join(sorted(fields))}")
    try:
        return module.Config(**overrides)
    except (ValueError, TypeError) as e:
        raise CliError(f"invalid config: {e}") from None


# ------------------------------------------------------------------------------------------ flags


class HelpFormatter(argparse.HelpFormatter):
    """Shows each default once: where the help text does not already say it, and not for None or off."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return f"{action.help} (default: %(default)s)"


def parse_args(argv):
    pre = argparse.ArgumentParser(add_help=False)
    choices = model_choices()
    pre.add_argument("--model", default=DEFAULT_MODEL)
    name = pre.parse_known_args(argv)[0].model
    recipe = dict(DEFAULTS)
    if name in choices:
        recipe.update(getattr(importlib.import_module(name), "TRAIN_RECIPE", {}))
    r = recipe

    p = argparse.ArgumentParser(
        description="Train a model file of this project. Defaults come from the model's TRAIN_RECIPE "
        "(shown for --model %s); rerunning a command resumes from its --out folder." % name,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default=name, help=f"model file, one of: {', '.join(choices)}")
    p.add_argument("--data", default=None, help="text file, folder of .txt files, glob or http(s) URL (default: the stdlib's pydoc_data.topics)")
    p.add_argument("--out", default=None, help="output folder (default: out/<model>)")
    p.add_argument("--fresh", action="store_true", help="start over even if --out holds a checkpoint")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps; fixes the schedule length and turns the time budget off unless --time-budget is given")
    p.add_argument("--time-budget", type=float, default=None, help=f"seconds of wall time for the whole run, 0 for none (default: {r['time_budget']} unless --max-steps)")
    p.add_argument("--batch-size", type=int, default=r["batch_size"], help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=r["grad_accum"], help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=r["lr"], help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=r["min_lr_ratio"], help="final learning rate as a fraction of the peak")
    p.add_argument("--warmup-steps", type=int, default=r["warmup_steps"], help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=r["weight_decay"], help="AdamW weight decay of matrices")
    p.add_argument("--beta1", type=float, default=r["beta1"], help="AdamW beta1")
    p.add_argument("--beta2", type=float, default=r["beta2"], help="AdamW beta2")
    p.add_argument("--grad-clip", type=float, default=r["grad_clip"], help="gradient norm clip, 0 for none")
    p.add_argument("--vocab-size", type=int, default=r["vocab_size"], help="tokenizer vocabulary size (256 bytes + merges)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"override a Config field, repeatable (recipe: {r['config']})")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")
    p.add_argument("--eval-every", type=int, default=r["eval_every"], help="steps between evaluations, 0 for only at the end")
    p.add_argument("--eval-tokens", type=int, default=r["eval_tokens"], help="validation tokens per evaluation, 0 for all")
    p.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints (one is always written at the end)")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines when stdout is not a terminal")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of torch; 0: torch's default, or 1 when the load average shows the cores busy with other jobs (threads that wait on each other then slow a step down many times)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes that prefetch batches (default: 2 on CUDA; 0 on CPU, where cutting a batch costs microseconds and a worker would take a core)")
    p.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of one device for MFU (default: known CUDA GPUs only)")
    p.add_argument("--sample-tokens", type=int, default=200, help="tokens of the sample printed at the end, 0 for none")
    p.add_argument("--no-plot", action="store_true", help="skip loss.png")
    p.add_argument("--wandb", nargs="?", const="llms-from-scratch", default=None, metavar="PROJECT", help="log to Weights & Biases (needs wandb)")
    args = p.parse_args(argv)
    overrides = dict(r["config"])
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = parse_value(value.strip())
    args.overrides = overrides
    if args.time_budget is None:
        args.time_budget = 0 if args.max_steps is not None else r["time_budget"]
    if not args.time_budget and args.max_steps is None:
        raise CliError("with --time-budget 0, give --max-steps, or the run would never end")
    for flag in ("batch_size", "grad_accum", "max_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be at least 1")
    return args


# ------------------------------------------------------------------------------------ training


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was asked for, but torch sees no CUDA GPU")
    return device


def peak_flops(device, override):
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
    return None


def make_optimizer(model, args, device):
    """AdamW; matrices decay, norms, biases and embeddings (tied or not) do not."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, **kwargs)


def lr_at(step, args, total_steps):
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio at total_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if total_steps is None:
        return args.lr
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def format_seconds(s):
    s = max(0, int(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """A single updating line on a terminal, plain lines every log_every steps otherwise."""

    def __init__(self, log_every, enabled):
        self.tty, self.log_every, self.enabled, self.width = sys.stdout.isatty(), log_every, enabled, 0

    def update(self, step, text):
        if not self.enabled:
            return
        if self.tty:
            line = text.ljust(self.width)
            self.width = len(text)
            print("\r" + line, end="", flush=True)
        elif step % self.log_every == 0:
            print(text, flush=True)

    def print(self, text):
        if self.enabled:
            if self.tty and self.width:
                print()
                self.width = 0
            print(text, flush=True)


# ------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(out, model, optimizer, config, name, task, state):
    """model.safetensors, config.json and state.pt, each written to a temp file and moved into place."""
    from safetensors.torch import save_model

    step = str(state["step"])
    data.atomic_write(out / "model.safetensors", lambda tmp: save_model(model, tmp, metadata={"step": step}))
    config_json = json.dumps({"model": name, "task": task, "config": dataclasses.asdict(config)}, indent=2)
    data.atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(config_json + "\n"))
    state = {**state, "optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()}}
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    data.atomic_write(out / "state.pt", lambda tmp: torch.save(state, tmp))


def load_checkpoint(out, model, config, name, fingerprint):
    """The training state in out, after checking it belongs to this run and loading the weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model, safe_open

    try:
        state = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways; all mean the same here
        raise CliError(f"the checkpoint {out / 'state.pt'} is corrupt or truncated ({type(e).__name__}); delete it or pass --fresh") from None
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise CliError(f"{out / 'state.pt'} is not a training state of train.py; delete it or pass --fresh")
    mine = dataclasses.asdict(config)
    if state.get("model") != name or state["config"] != mine:
        diff = [f"{k} {state['config'].get(k)} vs {mine[k]}" for k in mine if state["config"].get(k) != mine[k]]
        what = f"model {state.get('model')}" if state.get("model") != name else "a config with " + ", ".join(diff)
        raise CliError(f"{out} holds a checkpoint of {what}; use another --out, the same settings, or --fresh")
    if state.get("data") and state["data"].get("fingerprint") != fingerprint:
        raise CliError(f"{out} holds a checkpoint trained on other data or another tokenizer; use another --out or --fresh")
    try:
        with safe_open(out / "model.safetensors", "pt") as f:
            weights_step = (f.metadata() or {}).get("step")
        load_model(model, out / "model.safetensors")
    except (OSError, SafetensorError, RuntimeError) as e:
        raise CliError(f"the weights {out / 'model.safetensors'} are missing, corrupt or truncated ({type(e).__name__}); delete state.pt or pass --fresh") from None
    if weights_step != str(state["step"]):
        raise CliError(f"{out} holds weights of step {weights_step} but a training state of step {state['step']}; delete state.pt or pass --fresh")
    return state


def trim_metrics(path, step):
    """Drop records after step (written by a run that died after its last checkpoint)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        data.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))


def plot_losses(out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so there is no loss.png (pip install matplotlib)")
        return None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(out.name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    data.atomic_write(out / "loss.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out / "loss.png"


# ------------------------------------------------------------------------------------------ main


def train(args):
    module = import_model(args.model)
    task = getattr(module, "TASK")
    out = Path(args.out or Path("out") / args.model)

    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = pick_device(args.device)
    threads = args.threads
    if not threads and device.type == "cpu" and not ddp and os.getloadavg()[0] >= (os.cpu_count() or 1):
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    if ddp:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    main_rank = rank == 0
    log = print if main_rank else (lambda *a, **k: None)

    # Everything that can be wrong with the input is checked before anything is written.
    wandb = None
    if args.wandb and main_rank:
        try:
            import wandb
        except ImportError:
            raise CliError("--wandb needs the wandb package; install it with pip install wandb") from None
    if ddp and not main_rank:
        dist.barrier()  # rank 0 trains and caches the tokenizer and token files first
    pipe = data.pipeline(task, source=args.data, vocab_size=args.vocab_size)
    if ddp and main_rank:
        dist.barrier()
    config = build_config(module, {**args.overrides, **pipe.model_config()})
    torch.manual_seed(args.seed)
    try:
        model = module.Model(config)
    except ValueError as e:
        raise CliError(f"invalid config: {e}") from None
    seq_len = config.max_seq_len
    state = None
    if (out / "state.pt").exists() and not args.fresh:
        state = load_checkpoint(out, model, config, args.model, pipe.fingerprint)
        if state.get("finished") and (args.max_steps is None or args.max_steps <= state["step"]):
            log(f"{out} already holds a finished run of {state['step']} steps; pass --fresh to train again or a larger --max-steps to go on")
            return 0
    if main_rank:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise CliError(f"cannot write to the output folder {out} ({e.strerror or e}); pick another --out") from None

    model.to(device)
    optimizer = make_optimizer(model, args, device)
    step, total_steps, elapsed_before = 0, args.max_steps, 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed_before = state["step"], state.get("elapsed", 0.0)
        total_steps = args.max_steps if args.max_steps is not None else state.get("total_steps")
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        log(f"resuming {out} at step {step}")
    else:
        torch.manual_seed(args.seed + rank)  # weights are equal on all ranks; dropout differs
    if rank != 0 and state is not None:  # the checkpoint holds rank 0's RNG state only
        torch.manual_seed(args.seed + rank + 7919 * step)
    if main_rank:
        if state is None:
            (out / "metrics.jsonl").write_text("")
        else:
            trim_metrics(out / "metrics.jsonl", step)
        pipe.save(out)

    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    )
    stream = pipe.stream(
        seq_len, args.batch_size, seed=args.seed, start_step=step, rank=rank, world_size=world, grad_accum=args.grad_accum
    )
    workers = args.workers if args.workers is not None else (2 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        # Its own generator: the default one would take a number from the global RNG, which
        # dropout uses, and shift a resumed run's random stream by one draw.
        generator=torch.Generator().manual_seed(args.seed),
    )
    batches = iter(loader)

    tokens_per_step = world * args.grad_accum * args.batch_size * seq_len
    flops = getattr(raw_model, "flops_per_token", None)
    flops = flops() if flops else None
    peak = peak_flops(device, args.peak_flops)
    n_params = raw_model.num_params() if hasattr(raw_model, "num_params") else sum(p.numel() for p in raw_model.parameters())
    log(f"{args.model}: {n_params / 1e6:.2f}M parameters, {pipe.describe()}, context {seq_len}, "
        f"{tokens_per_step:,} tokens per step on {world} x {device.type}"
        + (f" ({torch.get_num_threads()} CPU threads)" if device.type == "cpu" else ""))
    if wandb is not None:
        wandb.init(project=args.wandb, config={**vars(args), "config": dataclasses.asdict(config)})

    def record(entry):
        if main_rank:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            if wandb is not None:
                wandb.log(entry, step=entry["step"])

    def evaluate():
        t = time.time()
        result = pipe.evaluate(raw_model, seq_len, args.batch_size, device, autocast, max_tokens=args.eval_tokens)
        return result, time.time() - t

    def checkpoint(finished=False):
        if main_rank:
            save_checkpoint(out, raw_model, optimizer, config, args.model, task, {
                "step": step, "total_steps": total_steps, "elapsed": elapsed(), "finished": finished,
                "model": args.model, "config": dataclasses.asdict(config),
                "data": {"seed": args.seed, "step": step, "fingerprint": pipe.fingerprint},
            })
        if ddp:
            dist.barrier()

    def elapsed():
        return elapsed_before + time.time() - START

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    budget = args.time_budget
    reserve = 5.0 + (3.0 if args.sample_tokens else 0.0)  # final save, plot, sample and a margin
    eval_seconds, n_evals = 0.0, 0
    progress = Progress(args.log_every, main_rank)
    run_start_step, run_start_time = step, time.time()
    window_time, window_step = time.time(), step

    def eval_estimate(train_seconds_per_step):
        """Seconds of one evaluation: measured, or guessed as a forward pass at three times training speed."""
        if n_evals:
            return eval_seconds / n_evals
        return min(args.eval_tokens or 10**9, len(getattr(pipe, "val_tokens", ()))) * train_seconds_per_step / tokens_per_step / 3

    model.train()
    first_step_time = None  # the first step pays for warming up allocators and caches; time from after it
    while True:
        done = step - run_start_step
        per_step = (time.time() - first_step_time - eval_seconds) / (done - 1) if done > 1 else 0.0
        if budget and args.max_steps is None and done >= 6 and (done % 10 == 6 or step >= (total_steps or 0)):
            # The schedule's length from the time left, counting the evaluations still to come;
            # refreshed every 10 steps, and at the planned end in case the machine sped up.
            per_step_all = per_step + (eval_estimate(per_step) / args.eval_every if args.eval_every else 0.0)
            left = budget - elapsed() - reserve - eval_estimate(per_step)
            total_steps = step + max(0, int(left / per_step_all))
        if total_steps is not None and step >= total_steps:
            break
        lr = lr_at(step, args, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            sync = micro == args.grad_accum - 1 or not ddp
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast():
                _, loss = model(**batch)
            (loss / args.grad_accum).backward()
            loss_sum += loss.detach().float()
        # Stop when one more step would run into the time kept for the final evaluation and saving.
        over_time = bool(budget) and elapsed() + per_step > budget - reserve - eval_estimate(per_step)
        # One small all-reduce per step carries the loss, a non-finite flag and a stop request, so that
        # every rank takes the same decision; reading it back is the step's one wait for the device.
        step_loss = loss_sum.item() / args.grad_accum
        flags = torch.tensor(
            [step_loss, float(not math.isfinite(step_loss)), float(stop["signal"] is not None or over_time)],
            dtype=torch.float64, device=device,
        )
        if ddp:
            dist.all_reduce(flags)
        loss_total, non_finite, stop_requested = flags.tolist()
        if non_finite:
            progress.print("")
            kept = "no checkpoint was written"
            if (out / "state.pt").exists():
                kept = f"the last good checkpoint (step {torch.load(out / 'state.pt', weights_only=True)['step']}) in {out} is kept"
            raise CliError(f"the loss became {step_loss:.4g} at step {step + 1}, so training stopped; {kept}; try a lower --lr")
        last_loss = loss_total / world
        if args.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if first_step_time is None:
            first_step_time = time.time()

        if step % args.log_every == 0 or progress.tty or step == total_steps:
            now = time.time()
            tok_s = tokens_per_step * (step - window_step) / max(1e-9, now - window_time)
            mfu = flops * tok_s / (peak * world) if flops and peak else None
            if total_steps:
                eta = (total_steps - step) * (now - run_start_time - eval_seconds) / max(1, step - run_start_step)
            else:
                eta = budget - elapsed()
            extra = raw_model.metrics() if hasattr(raw_model, "metrics") else {}
            text = (f"step {step}/{total_steps or '?'} | loss {last_loss:.4f} | lr {lr:.2e} | {tok_s / 1e3:.1f}k tok/s | "
                    f"MFU {f'{100 * mfu:.1f}%' if mfu is not None else '-'} | ETA {format_seconds(eta)}")
            # Summary metrics go on the line; indexed ones (per layer, per expert: names with digits)
            # only to metrics.jsonl and W&B.
            text += "".join(f" | {k} {v:.3g}" for k, v in extra.items() if not any(c.isdigit() for c in k))
            progress.update(step, text)
            if step % args.log_every == 0:
                record({"step": step, "loss": last_loss, "lr": lr, "tokens_per_s": tok_s, "mfu": mfu,
                        "time": elapsed(), **{k: float(v) for k, v in extra.items()}})
                window_time, window_step = now, step
        final = (total_steps is not None and step >= total_steps) or stop_requested
        if args.eval_every and step % args.eval_every == 0 and not final:
            last_eval, seconds = evaluate()
            eval_seconds, n_evals = eval_seconds + seconds, n_evals + 1
            progress.print(f"step {step} | val loss {last_eval['val_loss']:.4f} | ppl {last_eval['val_ppl']:.2f} | bpb {last_eval['val_bpb']:.4f}")
            record({"step": step, **last_eval})
        if stop["signal"] is not None:
            checkpoint()
            progress.print(f"stopped by {signal.Signals(stop['signal']).name} at step {step}; checkpoint saved in {out}; run the same command to resume")
            return 0
        if stop_requested:
            break
        if args.ckpt_every and step % args.ckpt_every == 0:
            checkpoint()

    total_steps = step
    progress.print("")
    last_eval, _ = evaluate()
    record({"step": step, **last_eval})
    checkpoint(finished=True)
    log(f"step {step} | val loss {last_eval['val_loss']:.4f} | ppl {last_eval['val_ppl']:.2f} | bpb {last_eval['val_bpb']:.4f} | "
        f"{format_seconds(elapsed())} | weights in {out / 'model.safetensors'}")
    if main_rank and args.sample_tokens and hasattr(pipe, "demo"):
        log("sample:\n" + pipe.demo(raw_model, device, max_new_tokens=args.sample_tokens, seed=args.seed))
    if main_rank and not args.no_plot:
        png = plot_losses(out)
        if png:
            log(f"loss curve in {png}")
    if wandb is not None:
        wandb.finish()
    return 0


def main(argv=None):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        return train(args)
    except (CliError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
