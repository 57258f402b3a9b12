"""
Train any model file of this project: python train.py --model gpt_llama

The model file says what it needs (see README.md): TASK picks the data pipeline in data.py,
TRAIN_RECIPE the defaults below, Model.metrics() extra numbers to log. Nothing here knows a model by name.

The loop: AdamW (fused where the device has it; no weight decay on norms, biases and embeddings),
linear warmup then cosine decay to min_lr_ratio of the peak, gradient clipping and accumulation, bf16
autocast on CUDA, DDP under torchrun (gloo on CPU, nccl on CUDA).

Fine-tuning: --init DIR starts from the weights of a Hugging Face checkpoint folder (the model file
whose HF_ARCHITECTURES lists its architecture loads it) or of a folder train.py wrote, and uses that
folder's tokenizer instead of training one; the folder's config holds, but for the training context
(the recipe's max_seq_len unless --set) and a learning rate of INIT_LR unless --lr.

Length of the run: --max-steps fixes it (and then no time budget applies unless --time-budget is
given). Otherwise --time-budget seconds of wall time, counted from the start of this script and
including data preparation, evaluation, sampling and saving: the number of steps is estimated from
the measured step time, re-estimated every 10 steps, and training stops early enough for the final
evaluation. The cosine schedule decays over that estimate, which the checkpoint keeps for resuming.

Checkpoints go to --out (default out/<model>, or out/<model>-<name of --data>), written atomically:
model.safetensors (weights), config.json (model name and Config), the tokenizer, state.pt (optimizer,
step, schedule, RNG state, data position; torch.load(weights_only=True) reads it), metrics.jsonl and
loss.png (with matplotlib). The weights and the state carry a sha256 of their content, checked when
they are read, so a flipped byte is caught rather than trained on. Running the same command again
resumes from state.pt; the data order depends only on (seed, step), so a resumed run ends with the
same weights as an uninterrupted one. SIGINT and SIGTERM save and exit. A run that fails before its
first checkpoint removes what it wrote.

MFU is flops_per_token * tokens/s / peak FLOP/s of the devices. The peak is known only for the CUDA
GPUs in PEAK_BF16_FLOPS (dense bf16) or given by --peak-flops; otherwise MFU is shown as "-".
"""

import signal
import sys
import time

START = time.time()  # the time budget counts from here, so it covers importing torch too
INTERRUPTED = []
if __name__ == "__main__":
    # Ctrl-C while torch imports would raise inside its import machinery, print a traceback from
    # there and can leave a half-imported module behind; note the signal and stop once imports end.
    signal.signal(signal.SIGINT, lambda signum, frame: INTERRUPTED.append(signum))

import argparse  # noqa: E402
import ast  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

import data  # noqa: E402
from data import in_one_line  # noqa: E402

if __name__ == "__main__":
    if INTERRUPTED:
        print("\ninterrupted while starting; nothing was written", file=sys.stderr)
        sys.exit(130)
    signal.signal(signal.SIGINT, signal.default_int_handler)

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
# A pretrained model (--init) takes small steps: a learning rate made for random weights would undo
# what it knows in a few hundred steps. The rest of the recipe holds.
INIT_LR = 5e-5

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


def model_for_architecture(architecture):
    """The name of the model file whose HF_ARCHITECTURES lists architecture, read without importing every file."""
    for name in model_choices():
        for node in ast.parse((ROOT / f"{name}.py").read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "HF_ARCHITECTURES" for t in node.targets):
                if architecture in ast.literal_eval(node.value):
                    return name
    raise CliError(f"no model file loads the architecture {architecture}")


def read_folder_config(folder):
    """config.json of a checkpoint folder: train.py's ({"model", "config", ...}) or a Hugging Face one."""
    path = Path(folder) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read {path} ({e.strerror if isinstance(e, OSError) else e}); pass a Hugging Face "
                       "checkpoint folder or one that train.py wrote") from None
    if not isinstance(saved, dict):
        raise CliError(f"{path} is not a model's config; pass a Hugging Face checkpoint folder or one that train.py wrote")
    return saved


def folder_model(folder):
    """The model file of a checkpoint folder: the one train.py wrote it with, or the one that loads its architecture."""
    saved = read_folder_config(folder)
    if isinstance(saved.get("model"), str) and isinstance(saved.get("config"), dict):
        return saved["model"]
    architectures = saved.get("architectures") or ["(none)"]
    return model_for_architecture(architectures[0])


def load_folder(folder, module):
    """The model in a checkpoint folder, float32: train.py's (config.json and model.safetensors, checked
    against the digest it carries) or a Hugging Face one (Model.from_pretrained)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model, safe_open

    folder = Path(folder)
    saved = read_folder_config(folder)
    try:
        if isinstance(saved.get("config"), dict) and "model" in saved:
            model = module.Model(module.Config(**saved["config"]))
            with safe_open(folder / "model.safetensors", "pt") as f:
                metadata = f.metadata()
            load_model(model, folder / "model.safetensors")
            check_weights(model, folder / "model.safetensors", metadata)
            return model
        return module.Model.from_pretrained(folder)
    except CliError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, RuntimeError) as e:
        raise CliError(f"cannot load the model in {folder} ({type(e).__name__}: {in_one_line(e)}); it may be "
                       "corrupt, incomplete or written by another version of its model file") from None


TOKENIZER_FILES = ("tokenizer.tiktoken", "tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_init(folder, module, overrides, context=None):
    """(model, config, tokenizer) to fine-tune from --init: the folder's weights; its config with the
    --set fields changed, and the training context cut to context unless --set gives max_seq_len; and
    its tokenizer as data.py's pipelines take it: (tokenizer, a key of its files' content, the files to
    copy into the run's folder)."""
    source = load_folder(folder, module)
    if context and "max_seq_len" not in overrides:
        overrides = {**overrides, "max_seq_len": min(context, source.config.max_seq_len)}
    fields = {f.name for f in dataclasses.fields(module.Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise CliError(f"Config of {module.__name__} has no field {', '.join(unknown)}; its fields: {', '.join(sorted(fields))}")
    try:
        config = dataclasses.replace(source.config, **overrides)
        model = module.Model(config)
    except (ValueError, TypeError) as e:
        raise CliError(f"invalid config: {e}") from None
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError:
        raise CliError(f"--set {', '.join(sorted(overrides))} changes the shape of the weights in {folder}; with "
                       "--init only fields such as max_seq_len and dropout can change") from None
    try:
        tokenizer = data.load_tokenizer(folder)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot load the tokenizer in {folder} ({in_one_line(e)})") from None
    files = [Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]
    key = "init-" + hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()[:16]
    if tokenizer.n_vocab > config.vocab_size:
        raise CliError(f"the tokenizer in {folder} has {tokenizer.n_vocab} tokens but the model only {config.vocab_size}; "
                       "the folder's tokenizer is not the model's")
    return model, config, (tokenizer, key, files)


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
    pre.add_argument("--model", default=None)
    pre.add_argument("--init", default=None)
    known = pre.parse_known_args(argv)[0]
    name = known.model or DEFAULT_MODEL
    if known.init is not None:
        if not known.init.strip():
            raise CliError("--init must name a checkpoint folder")
        name = folder_model(known.init)
        if known.model not in (None, name):
            raise CliError(f"--init {known.init} holds a {name} model, not {known.model}; leave --model out with --init")
    recipe = dict(DEFAULTS)
    if name in choices:
        recipe.update(getattr(importlib.import_module(name), "TRAIN_RECIPE", {}))
    r = recipe
    if known.init is not None:
        recipe["lr"] = INIT_LR

    p = argparse.ArgumentParser(
        description="Train a model file of this project. Defaults come from the model's TRAIN_RECIPE "
        "(shown for --model %s); rerunning a command resumes from its --out folder." % name,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default=name, help=f"model file, one of: {', '.join(choices)}")
    p.add_argument("--data", default=None, help="text models: a .txt, .jsonl or .parquet file, a folder or glob of them, an http(s) URL, a Hugging Face dataset folder (save_to_disk) or hf:NAME (needs datasets) (default: the stdlib's pydoc_data.topics); image-text models: an image folder with metadata.jsonl (default: pictures of shapes)")
    p.add_argument("--text-field", default="text", help="text models: the field of a .jsonl line, or the column of a parquet file or dataset, that holds the text")
    p.add_argument("--clean", action="store_true", help="text models: normalize each document to NFC, remove control characters other than whitespace and drop exact-duplicate documents; says what it removed")
    p.add_argument("--out", default=None, help="output folder (default: out/<model> for the built-in data, out/<model>-<name of --data> otherwise)")
    p.add_argument("--fresh", action="store_true", help="start over even if --out holds a checkpoint")
    p.add_argument("--init", default=None, metavar="DIR", help="fine-tune: start from the weights in DIR (a Hugging Face "
                   f"checkpoint folder or one train.py wrote) and use its tokenizer; the learning rate defaults to {INIT_LR}, "
                   "the context to the recipe's max_seq_len")
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
    p.add_argument("--eval-tokens", type=int, default=r["eval_tokens"], help="validation tokens per evaluation of a text model, 0 for all")
    p.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints, 0 for only at the end")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines when stdout is not a terminal")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of torch; 0: torch's default, or 1 when the load average shows the cores busy with other jobs (threads that wait on each other then slow a step down many times)")
    p.add_argument("--workers", type=int, default=None, help="text models: processes that encode a streamed corpus into token shards (default: the cores)")
    p.add_argument("--loader-workers", type=int, default=None, help="DataLoader worker processes that prefetch batches (default: 2 on CUDA; 0 on CPU, where cutting a batch costs microseconds and a worker would take a core)")
    p.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of one device for MFU (default: known CUDA GPUs only)")
    p.add_argument("--sample-tokens", type=int, default=200, help="tokens of the sample printed at the end (image-text models: that many examples, at most 6), 0 for none")
    p.add_argument("--no-plot", action="store_true", help="skip loss.png")
    p.add_argument("--wandb", nargs="?", const="llms-from-scratch", default=None, metavar="PROJECT", help="log to Weights & Biases (needs wandb)")
    args = p.parse_args(argv)
    given = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--set expects KEY=VALUE, got {item!r}")
        given[key.strip()] = parse_value(value.strip())
    # From scratch, the recipe's config with --set on top; from --init, the folder's config with only
    # the training context (and --set) changed, since the other fields fix the weights' shapes.
    args.overrides = {**r["config"], **given} if args.init is None else given
    args.init_context = r["config"].get("max_seq_len")
    if args.time_budget is None:
        args.time_budget = 0 if args.max_steps is not None else r["time_budget"]
    check_flags(args)
    return args


# flag: (lowest, highest, what the range means); None leaves that side open. Each flag's value must
# also be finite, so that nan and inf, which argparse's float() accepts, never reach the optimizer.
FLAG_RANGES = {
    "batch_size": (1, None, "at least 1"),
    "grad_accum": (1, None, "at least 1"),
    "max_steps": (1, None, "at least 1"),
    "time_budget": (0, None, "0 (none) or a positive number of seconds"),
    "lr": (0, None, "a positive number such as 1e-3"),
    "min_lr_ratio": (0, 1, "between 0 and 1"),
    "warmup_steps": (0, None, "0 or more"),
    "weight_decay": (0, None, "0 or more"),
    "beta1": (0, 1, "in [0, 1)"),
    "beta2": (0, 1, "in [0, 1)"),
    "grad_clip": (0, None, "0 (none) or more"),
    "vocab_size": (256, 2**31 - 1, "at least 256, the byte tokens that every vocabulary starts with"),
    "seed": (0, 2**32 - 1, "between 0 and 2**32 - 1"),
    "eval_every": (0, None, "0 (only at the end) or more"),
    "eval_tokens": (0, None, "0 (all) or more"),
    "ckpt_every": (0, None, "0 (only at the end) or more"),
    "log_every": (1, None, "at least 1"),
    "threads": (0, None, "0 (automatic) or more"),
    "workers": (1, None, "1 or more"),
    "loader_workers": (0, None, "0 or more"),
    "peak_flops": (0, None, "a positive number of FLOP/s"),
    "sample_tokens": (0, None, "0 (no sample) or more"),
}
OPEN_AT_ZERO = {"lr", "peak_flops"}  # these must be above their lowest value, not equal to it
OPEN_AT_ONE = {"beta1", "beta2"}  # beta 1 would make Adam's moving averages never move


def check_flags(args):
    """Every numeric flag in range, before anything is read or written."""
    for flag, (low, high, allowed) in FLAG_RANGES.items():
        value = getattr(args, flag)
        if value is None:
            continue
        bad = not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high)
        bad = bad or (flag in OPEN_AT_ZERO and value == low) or (flag in OPEN_AT_ONE and value == high)
        if bad:
            raise CliError(f"--{flag.replace('_', '-')} must be {allowed}, got {value}")
    if not args.time_budget and args.max_steps is None:
        raise CliError("with --time-budget 0, give --max-steps, or the run would never end")
    if not args.text_field.strip():
        raise CliError("--text-field must name a field, such as text")


def default_out(model, source):
    """out/<model> for the built-in data; out/<model>-<name> for --data, so that a run on other data
    never lands in (and is refused by) the folder of an earlier run."""
    if source is None:
        return Path("out") / model
    if source.startswith(("http://", "https://")):
        name = Path(source.split("?")[0].rstrip("/")).stem or source.split("/")[2]
    else:
        parts = [p for p in Path(source).expanduser().parts if not any(c in p for c in "*?[")]
        name = Path(parts[-1]).stem if parts else "data"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "data"
    return Path("out") / f"{model}-{name}"


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
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CliError("--device mps was asked for, but torch sees no Apple GPU")
    return device


def peak_flops(device, override):
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
    return None


def make_optimizer(model, args):
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


def format_eval(result):
    """'val loss 4.1093 | ppl 60.91 | bpb 1.6902' from {"val_loss": ..., "val_ppl": ..., "val_bpb": ...}."""
    return " | ".join(
        ("val loss" if k == "val_loss" else k.removeprefix("val_").replace("_", " ")) + f" {v:.4f}"
        for k, v in result.items()
    )


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


def content_digest(obj, h=None):
    """sha256 over a nested structure of dicts, lists, tensors and plain values, in a fixed order.

    Stored beside the weights and in the training state, and recomputed when they are read: a
    flipped byte inside a tensor leaves a file that loads, and only its content can tell.
    """
    top = h is None
    h = hashlib.sha256() if top else h
    if isinstance(obj, dict):
        h.update(b"{%d" % len(obj))
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            content_digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"[%d" % len(obj))
        for item in obj:
            content_digest(item, h)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    else:
        h.update(repr(obj).encode())
    return h.hexdigest() if top else None


def weights_digest(model):
    return content_digest(model.state_dict())


def check_weights(model, path, metadata):
    """Raise ValueError when the weights just loaded from path differ from the digest saved with them."""
    saved = (metadata or {}).get("sha256")
    if saved is not None and saved != weights_digest(model):
        raise ValueError(f"the content of {path} does not match its checksum, so the file was damaged after it was written")


def save_checkpoint(out, model, optimizer, config, name, task, state):
    """model.safetensors, config.json and state.pt, each written to a temp file and moved into place."""
    from safetensors.torch import save_model

    metadata = {"step": str(state["step"]), "sha256": weights_digest(model)}
    data.atomic_write(out / "model.safetensors", lambda tmp: save_model(model, tmp, metadata=metadata))
    config_json = json.dumps({"model": name, "task": task, "config": dataclasses.asdict(config)}, indent=2)
    data.atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(config_json + "\n"))
    state = {**state, "optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()}}
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    state["sha256"] = content_digest(state)
    data.atomic_write(out / "state.pt", lambda tmp: torch.save(state, tmp))


def read_state(out):
    """The training state in out/state.pt, checked against its own checksum."""
    path = out / "state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways; all mean the same here
        raise CliError(f"the checkpoint {path} is corrupt or truncated ({type(e).__name__}); delete it or pass --fresh") from None
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise CliError(f"{path} is not a training state of train.py; delete it or pass --fresh")
    saved = state.pop("sha256", None)
    if saved is not None and saved != content_digest(state):
        raise CliError(f"the checkpoint {path} is corrupt: its content does not match its checksum; delete it or pass --fresh")
    return state


def load_checkpoint(out, model, config, name, fingerprint, run):
    """The training state in out, after checking it belongs to this run and loading the weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model, safe_open

    state = read_state(out)
    mine = dataclasses.asdict(config)
    if state.get("model") != name or state["config"] != mine:
        diff = [f"{k} {state['config'].get(k)} vs {mine[k]}" for k in mine if state["config"].get(k) != mine[k]]
        what = f"model {state.get('model')}" if state.get("model") != name else "a config with " + ", ".join(diff)
        raise CliError(f"{out} holds a checkpoint of {what}; use another --out, the same settings, or --fresh")
    if state.get("data") and state["data"].get("fingerprint") != fingerprint:
        raise CliError(f"{out} holds a checkpoint trained on other data or another tokenizer; use another --out or --fresh")
    # The data order and the meaning of a step depend on these; a run resumed with others would
    # quietly become another run (torchrun on a single-process folder, say).
    saved_run = state.get("run", run)
    if saved_run != run:
        diff = ", ".join(f"{k.replace('_', ' ')} {saved_run.get(k)} (now {run[k]})" for k in run if saved_run.get(k) != run[k])
        raise CliError(f"{out} holds a run with {diff}; use another --out, the same settings, or --fresh")
    path = out / "model.safetensors"
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        load_model(model, path)
        check_weights(model, path, metadata)
    except (OSError, SafetensorError, RuntimeError, ValueError) as e:
        raise CliError(f"the weights {path} are missing, corrupt or truncated ({in_one_line(e)}); delete state.pt or pass --fresh") from None
    if metadata.get("step") != str(state["step"]):
        raise CliError(f"{out} holds weights of step {metadata.get('step')} but a training state of step {state['step']}; delete state.pt or pass --fresh")
    return state


def trim_metrics(path, step):
    """Drop records after step (written by a run that died after its last checkpoint)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        data.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))


RUN_FILES = ("state.pt", "model.safetensors", "config.json", "metrics.jsonl", "loss.png")


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
    ax.set_ylabel("loss")
    ax.set_title(out.name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    data.atomic_write(out / "loss.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out / "loss.png"


# ------------------------------------------------------------------------------------------ the run


class Run:
    """Everything one training run holds; the pieces the loop in train() calls.

    Construction checks every input and builds the data, the model and the optimizer, resuming from
    --out when it holds a checkpoint. It writes nothing (the output folder is only probed): the first
    files appear in start(), and discard() removes them if the run fails before its first checkpoint.
    """

    def __init__(self, args):
        self.args = args
        self.module = import_model(args.model)
        self.task = self.module.TASK
        self.out = Path(args.out) if args.out else default_out(args.model, args.data)
        self._distributed()
        self._data_and_model()
        self.state = None
        if (self.out / "state.pt").exists() and not args.fresh:
            self.state = load_checkpoint(self.out, self.model, self.config, args.model, self.pipe.fingerprint, self.run_settings())
        self.already_finished = bool(self.state and self.state.get("finished")
                                     and (args.max_steps is None or args.max_steps <= self.state["step"]))
        if self.already_finished:
            return
        self._prepare_output()
        self._optimizer_and_state()
        self._loader()

    # -- setup

    def _distributed(self):
        args = self.args
        self.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = pick_device(args.device)
        threads = args.threads
        if not threads and self.device.type == "cpu" and not self.ddp and os.getloadavg()[0] >= (os.cpu_count() or 1):
            threads = 1
        if threads:
            torch.set_num_threads(threads)
        if self.ddp:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.ddp else (0, 1)
        self.main_rank = self.rank == 0
        self.log = print if self.main_rank else (lambda *a, **k: None)
        self.wandb = None
        if args.wandb and self.main_rank:
            try:
                import wandb
            except ImportError:
                raise CliError("--wandb needs the wandb package; install it with pip install wandb") from None
            self.wandb = wandb

    def _data_and_model(self):
        args = self.args
        init = None
        if args.init is not None:
            init = load_init(args.init, self.module, args.overrides, args.init_context)
            if not data.takes_tokenizer(self.task):
                raise CliError(f"--init fine-tunes models whose data is text; the {self.task} pipeline of "
                               f"{args.model} trains its own tokenizer")
        if self.ddp and not self.main_rank:
            dist.barrier()  # rank 0 trains and caches the tokenizer and token files first
        extra = {} if init is None else {"tokenizer": init[2]}
        if self.task == "causal_lm":
            extra.update(text_field=args.text_field, clean=args.clean, workers=args.workers)
        self.pipe = data.pipeline(self.task, self.module, source=args.data, vocab_size=args.vocab_size, **extra)
        if self.ddp and self.main_rank:
            dist.barrier()
        if init is None:
            self.config = build_config(self.module, {**args.overrides, **self.pipe.model_config()})
        else:
            self.config = init[1]
        self.pipe.check(self.config)  # both splits hold at least one example of the model's shape
        torch.manual_seed(args.seed)
        if init is not None:
            self.model = init[0]
            return
        try:
            self.model = self.module.Model(self.config)
        except ValueError as e:
            raise CliError(f"invalid config: {e}") from None

    def run_settings(self):
        """What fixes the data order and the size of a step; a resumed run must keep them."""
        a = self.args
        settings = {"processes": self.world, "batch_size": a.batch_size, "grad_accum": a.grad_accum, "seed": a.seed}
        if a.init is not None:  # where the weights came from; a run resumed from other ones is another run
            settings["init"] = str(Path(a.init).resolve())
        return settings

    def _prepare_output(self):
        """Check that out can be written, leaving it as it was."""
        self.saved = False  # whether this run has written a checkpoint
        self.created_root = None  # the first folder of out's path that this run creates
        if not self.main_rank:
            return
        missing = [p for p in [self.out, *self.out.parents] if not p.exists()]
        self.created_root = missing[-1] if missing else None
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise CliError(f"cannot write to the output folder {self.out} ({e.strerror or e}); pick another --out") from None
        finally:
            if self.created_root is not None and self.created_root.is_dir():
                shutil.rmtree(self.created_root)

    def _optimizer_and_state(self):
        args, state = self.args, self.state
        self.model.to(self.device)
        self.optimizer = make_optimizer(self.model, args)
        self.step, self.total_steps, self.elapsed_before = 0, args.max_steps, 0.0
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.elapsed_before = state["step"], state.get("elapsed", 0.0)
            self.total_steps = args.max_steps if args.max_steps is not None else state.get("total_steps")
            torch.set_rng_state(state["rng"]["torch"])
            if "cuda" in state["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
            self.log(f"resuming {self.out} at step {self.step}")
        else:
            torch.manual_seed(args.seed + self.rank)  # weights are equal on all ranks; dropout differs
        if self.rank != 0 and state is not None:  # the checkpoint holds rank 0's RNG state only
            torch.manual_seed(args.seed + self.rank + 7919 * self.step)

    def _loader(self):
        args, device = self.args, self.device
        self.raw_model = self.model
        if args.compile:
            self.model = torch.compile(self.model)
        if self.ddp:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
        )
        stream = self.pipe.stream(self.config, args.batch_size, seed=args.seed, start_step=self.step, rank=self.rank,
                                  world_size=self.world, grad_accum=args.grad_accum)
        workers = args.loader_workers if args.loader_workers is not None else (2 if device.type == "cuda" else 0)
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
            # Its own generator: the default one would take a number from the global RNG, which
            # dropout uses, and shift a resumed run's random stream by one draw.
            generator=torch.Generator().manual_seed(args.seed),
        )
        self.batches = iter(loader)
        self.examples_per_step = self.world * args.grad_accum * args.batch_size
        self.unit, per_example = self.pipe.unit(self.config)
        self.units_per_step = self.examples_per_step * per_example
        flops = getattr(self.raw_model, "flops_per_token", None)
        self.flops = flops() if flops else None
        self.peak = peak_flops(device, args.peak_flops)
        self.budget = args.time_budget
        self.reserve = 5.0 + (3.0 if args.sample_tokens else 0.0)  # final save, plot, sample and a margin
        self.eval_seconds, self.n_evals = 0.0, 0
        self.progress = Progress(args.log_every, self.main_rank)
        self.run_start_step, self.run_start_time = self.step, time.time()
        self.window_time, self.window_step = time.time(), self.step
        self.first_step_time = None  # the first step pays for warming up allocators and caches; time from after it
        self.per_step = 0.0
        self.signal = None

    def start(self):
        """The first writes: with --fresh, the old run goes (its state first); then the metrics file
        and the tokenizer."""
        raw, args = self.raw_model, self.args
        if self.main_rank:
            self.before = set()
            self.out.mkdir(parents=True, exist_ok=True)
            if args.fresh:
                for name in RUN_FILES:
                    (self.out / name).unlink(missing_ok=True)
            self.before = set(self.out.iterdir())
            if self.state is None:
                (self.out / "metrics.jsonl").write_text("")
            else:
                trim_metrics(self.out / "metrics.jsonl", self.step)
            self.pipe.save(self.out)
        n_params = raw.num_params() if hasattr(raw, "num_params") else sum(p.numel() for p in raw.parameters())
        self.log(f"{args.model}: {n_params / 1e6:.2f}M parameters, {self.pipe.describe()}, "
                 f"{self.units_per_step:,} {self.unit} per step on {self.world} x {self.device.type}"
                 + (f" ({torch.get_num_threads()} CPU threads)" if self.device.type == "cpu" else ""))
        if self.wandb is not None:
            self.wandb.init(project=args.wandb, config={**vars(args), "config": dataclasses.asdict(self.config)})

        def on_signal(signum, frame):
            self.signal = signum

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        self.model.train()

    # -- the pieces of the loop

    def elapsed(self):
        return self.elapsed_before + time.time() - START

    def eval_estimate(self):
        """Seconds of one evaluation: measured, or guessed as a forward pass at three times training speed."""
        if self.n_evals:
            return self.eval_seconds / self.n_evals
        examples = self.pipe.eval_examples(self.config, self.args.eval_tokens)
        return examples * self.per_step / self.examples_per_step / 3

    def plan(self):
        """Refresh the schedule's length from the time left, counting the evaluations still to come:
        every 10 steps, and at the planned end in case the machine sped up. True when the run is over."""
        args = self.args
        done = self.step - self.run_start_step
        if done > 1:
            self.per_step = (time.time() - self.first_step_time - self.eval_seconds) / (done - 1)
        if self.budget and args.max_steps is None and done >= 6 and (done % 10 == 6 or self.step >= (self.total_steps or 0)):
            per_step_all = self.per_step + (self.eval_estimate() / args.eval_every if args.eval_every else 0.0)
            left = self.budget - self.elapsed() - self.reserve - self.eval_estimate()
            self.total_steps = self.step + max(0, int(left / per_step_all))
        return self.total_steps is not None and self.step >= self.total_steps

    def train_step(self):
        """One optimizer step over grad_accum micro-batches; True when every rank should stop after it."""
        args, model = self.args, self.model
        self.lr = lr_at(self.step, args, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        micro_batches = [next(self.batches) for _ in range(args.grad_accum)]
        # A model's loss is a mean over its micro-batch. Where micro-batches score different numbers of
        # tokens (answers of different lengths), the pipeline says how many in loss_weight, and each mean
        # counts by its share of the whole step, over every micro-batch and process: the step is then
        # that of one big batch. DDP averages the gradients over processes, hence the factor world.
        scales = [1 / args.grad_accum] * args.grad_accum
        if "loss_weight" in micro_batches[0]:  # then in every batch of every rank: they run the same pipeline
            weights = torch.stack([b.pop("loss_weight") for b in micro_batches]).double()
            total = weights.sum().to(self.device)
            if self.ddp:
                dist.all_reduce(total)
            scales = (weights * self.world / total.cpu()).tolist()
        loss_sum = torch.zeros((), device=self.device)
        for micro, (batch, scale) in enumerate(zip(micro_batches, scales)):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            sync = micro == args.grad_accum - 1 or not self.ddp
            with (contextlib.nullcontext() if sync else model.no_sync()), self.autocast():
                _, loss = model(**batch)
            (loss * scale).backward()
            loss_sum += loss.detach().float() * scale
        # Stop when one more step would run into the time kept for the final evaluation and saving.
        over_time = bool(self.budget) and self.elapsed() + self.per_step > self.budget - self.reserve - self.eval_estimate()
        # One small all-reduce per step carries the loss, a non-finite flag and a stop request, so that
        # every rank takes the same decision; reading it back is the step's one wait for the device.
        step_loss = loss_sum.item() / self.world
        flags = torch.tensor(
            [step_loss, float(not math.isfinite(step_loss)), float(self.signal is not None or over_time)],
            dtype=torch.float64, device=self.device,
        )
        if self.ddp:
            dist.all_reduce(flags)
        loss_total, non_finite, stop_requested = flags.tolist()
        if non_finite:
            self.progress.print("")
            kept = "no checkpoint was written"
            if self.saved or self.state is not None:
                kept = f"the last good checkpoint (step {read_state(self.out)['step']}) in {self.out} is kept"
            raise CliError(f"the loss became {step_loss:.4g} at step {self.step + 1}, so training stopped; {kept}; try a lower --lr")
        self.loss = loss_total
        if args.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.first_step_time is None:
            self.first_step_time = time.time()
        return bool(stop_requested)

    def report(self):
        """The progress line, and a metrics record every log_every steps."""
        args, step = self.args, self.step
        if not (step % args.log_every == 0 or self.progress.tty or step == self.total_steps):
            return
        now = time.time()
        rate = self.units_per_step * (step - self.window_step) / max(1e-9, now - self.window_time)
        mfu = self.flops * rate / (self.peak * self.world) if self.flops and self.peak else None
        if self.total_steps:
            eta = (self.total_steps - step) * (now - self.run_start_time - self.eval_seconds) / max(1, step - self.run_start_step)
        else:
            eta = self.budget - self.elapsed()
        extra = self.raw_model.metrics() if hasattr(self.raw_model, "metrics") else {}
        speed = f"{rate / 1e3:.1f}k" if rate >= 1000 else f"{rate:.0f}"
        text = (f"step {step}/{self.total_steps or '?'} | loss {self.loss:.4f} | lr {self.lr:.2e} | "
                f"{speed} {self.unit}/s | MFU {f'{100 * mfu:.1f}%' if mfu is not None else '-'} | ETA {format_seconds(eta)}")
        # Summary metrics go on the line; indexed ones (per layer, per expert: names with digits)
        # only to metrics.jsonl and W&B.
        text += "".join(f" | {k} {v:.3g}" for k, v in extra.items() if not any(c.isdigit() for c in k))
        self.progress.update(step, text)
        if step % args.log_every == 0:
            self.record({"step": step, "loss": self.loss, "lr": self.lr, f"{self.unit}_per_s": rate, "mfu": mfu,
                         "time": self.elapsed(), **{k: float(v) for k, v in extra.items()}})
            self.window_time, self.window_step = now, step

    def record(self, entry):
        if self.main_rank:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            if self.wandb is not None:
                self.wandb.log(entry, step=entry["step"])

    def evaluate(self, announce=True):
        t = time.time()
        result = self.pipe.evaluate(self.raw_model, self.config, self.args.batch_size, self.device, self.autocast,
                                    max_tokens=self.args.eval_tokens)
        self.eval_seconds, self.n_evals = self.eval_seconds + time.time() - t, self.n_evals + 1
        self.record({"step": self.step, **result})
        if announce:
            self.progress.print(f"step {self.step} | {format_eval(result)}")
        return result

    def checkpoint(self, finished=False):
        if self.main_rank:
            save_checkpoint(self.out, self.raw_model, self.optimizer, self.config, self.args.model, self.task, {
                "step": self.step, "total_steps": self.total_steps, "elapsed": self.elapsed(), "finished": finished,
                "model": self.args.model, "config": dataclasses.asdict(self.config), "run": self.run_settings(),
                "data": {"seed": self.args.seed, "step": self.step, "fingerprint": self.pipe.fingerprint},
            })
            self.saved = True
        if self.ddp:
            dist.barrier()

    def due(self, every):
        return bool(every) and self.step % every == 0

    def finish(self):
        args = self.args
        self.total_steps = self.step
        self.progress.print("")
        result = self.evaluate(announce=False)
        self.checkpoint(finished=True)
        self.log(f"step {self.step} | {format_eval(result)} | {format_seconds(self.elapsed())} | "
                 f"weights in {self.out / 'model.safetensors'}")
        if self.main_rank and args.sample_tokens and hasattr(self.pipe, "demo"):
            self.log("sample:\n" + self.pipe.demo(self.raw_model, self.device, max_new_tokens=args.sample_tokens, seed=args.seed))
        if self.main_rank and not args.no_plot:
            png = plot_losses(self.out)
            if png:
                self.log(f"loss curve in {png}")
        if self.wandb is not None:
            self.wandb.finish()

    def discard(self):
        """After a failure before this run's first checkpoint: remove what it wrote, so that out is
        left as it was (or gone, if this run made it). A resumed run's folder stays resumable as is."""
        if not self.main_rank or self.saved or self.state is not None or not hasattr(self, "before"):
            return
        for path in (set(self.out.iterdir()) if self.out.is_dir() else set()) - self.before:
            path.unlink() if path.is_file() else shutil.rmtree(path, ignore_errors=True)
        root = self.created_root
        if root is not None and root.is_dir() and not any(p.is_file() for p in root.rglob("*")):
            shutil.rmtree(root)


def train(args):
    run = Run(args)
    if run.already_finished:
        run.log(f"{run.out} already holds a finished run of {run.state['step']} steps; "
                "pass --fresh to train again or a larger --max-steps to go on")
        return 0
    try:
        run.start()
        while not run.plan():
            stop_requested = run.train_step()
            run.report()
            if run.due(args.eval_every) and not (stop_requested or run.step >= (run.total_steps or math.inf)):
                run.evaluate()
            if run.signal is not None:
                run.checkpoint()
                run.progress.print(f"stopped by {signal.Signals(run.signal).name} at step {run.step}; "
                                   f"checkpoint saved in {run.out}; run the same command to resume")
                return 0
            if stop_requested:
                break
            if run.due(args.ckpt_every):
                run.checkpoint()
        run.finish()
    except BaseException:
        run.discard()
        raise
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
            # The DDP wrapper sits in reference cycles, so train() returning does not free it. Left to
            # the interpreter's exit, it would be torn down after its process group, and gloo then
            # aborts the process now and then ("terminate called without an active exception").
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
