"""
train.py's command line: every flag, its default and its range, side by side.

A flag's default comes from the model file's TRAIN_RECIPE, else from DEFAULTS below; --init DIR
fine-tunes the model in DIR, whose config then holds but for the training context, and --lora R with it
trains low-rank adapters instead of its weights (lora.py). A value out of range is refused by the
flag's argparse type in one sentence ("--lr must be a positive number such as 1e-3, got nan"), before
anything is read or written; nan and inf never reach the optimizer.
"""

import argparse
import ast
import importlib
import math

from llm_machinery import preferences, runs
from llm_machinery.corpus import UserError

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
# LoRA's adapters start from zero and carry a small share of the weights: they take larger steps (the
# QLoRA paper, https://arxiv.org/abs/2305.14314, used 1e-4 to 2e-4).
LORA_LR = 2e-4
# Preference tuning (DPO) moves a model that already answers by the log-ratio to itself: at the learning
# rate of SFT, the built-in example's chosen answers lost 70 nats of log-probability in five minutes and
# the answers their words; at a tenth of it, they stay readable. (TRL's default is 1e-6.)
DPO_LR = 5e-6
DPO_LORA_LR = 2e-5


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def ranged(kind, allowed, ok):
    """An argparse type: text read as kind (int or float), finite and ok(value), else the flag must be
    allowed. nan and inf, which float() accepts, never reach the optimizer."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value

    return parse


def named(what):
    """An argparse type for a flag that must name something: not blank."""

    def parse(text):
        if not text.strip():
            raise argparse.ArgumentTypeError(f"must name {what}")
        return text

    return parse


COUNT = ranged(int, "at least 1", lambda v: v >= 1)
EVERY = ranged(int, "0 (only at the end) or more", lambda v: v >= 0)
POSITIVE = ranged(float, "a positive number such as 1e-3", lambda v: v > 0)
FRACTION = ranged(float, "between 0 and 1", lambda v: 0 <= v <= 1)
BETA = ranged(float, "in [0, 1)", lambda v: 0 <= v < 1)
NON_NEGATIVE = ranged(float, "0 or more", lambda v: v >= 0)


def names(text):
    """An argparse type: comma-separated names, none blank, as a tuple."""
    found = tuple(name.strip() for name in text.split(","))
    if not all(found):
        raise argparse.ArgumentTypeError(f"must be comma-separated names such as wq,wv, got {text!r}")
    return found


def preference_pairs(source, text_field):
    """Whether --data holds preference pairs; a source that cannot be read is for the pipeline to say."""
    from llm_machinery import preferences

    try:
        return source is not None and preferences.is_preferences(source, text_field)
    except UserError:
        return False


def parse_args(argv):
    pre = argparse.ArgumentParser(add_help=False)
    choices = runs.model_choices()
    pre.add_argument("--model", default=None)
    pre.add_argument("--init", default=None)
    pre.add_argument("--lora", nargs="?", default=None)  # "?": a missing value is for the full parser to say
    pre.add_argument("--data", default=None)
    pre.add_argument("--text-field", default="text")
    known = pre.parse_known_args(argv)[0]
    name = known.model or DEFAULT_MODEL
    if known.init is not None:
        if not known.init.strip():
            raise UserError("--init must name a checkpoint folder")
        name = runs.folder_model(known.init)
        if known.model not in (None, name):
            raise UserError(f"--init {known.init} holds a {name} model, not {known.model}; leave --model out with --init")
    recipe = dict(DEFAULTS)
    if name in choices:
        recipe.update(getattr(importlib.import_module(name), "TRAIN_RECIPE", {}))
    r = recipe
    if known.init is not None:
        recipe["lr"] = INIT_LR if known.lora is None else LORA_LR
        if preference_pairs(known.data, known.text_field):
            recipe["lr"] = DPO_LR if known.lora is None else DPO_LORA_LR

    p = runs.ArgumentParser(prog="train.py",
        description="Train a model file of this project. Defaults come from the model's TRAIN_RECIPE "
        "(shown for --model %s); rerunning a command resumes from its --out folder." % name,
        formatter_class=runs.HelpFormatter,
    )
    p.add_argument("--model", default=name, help=f"model file, one of: {', '.join(choices)}")
    p.add_argument("--data", default=None, help="text models: a .txt, .jsonl or .parquet file (.jsonl, parquet and datasets whose records hold \"messages\", or \"prompt\" and \"completion\", are conversations: the loss is on the answers; records with \"chosen\" and \"rejected\" are preference pairs, tuned by DPO), a folder or glob of them, an http(s) URL, a Hugging Face dataset folder (save_to_disk) or hf:NAME (needs datasets) (default: the stdlib's pydoc_data.topics); image-text models: an image folder with metadata.jsonl (default: pictures of shapes)")
    p.add_argument("--validation-file", type=named("a file of held-out records"), default=None, metavar="PATH", help="conversations and preference pairs: held-out records to "
                   "validate on, in the form of --data (default: the 10%% of --data chosen by a hash of each record's "
                   "content, whatever their order)")
    p.add_argument("--text-field", type=named("a field, such as text"), default="text", help="text models: the field of a .jsonl line, or the column of a parquet file or dataset, that holds the text")
    p.add_argument("--clean", action="store_true", help="text models: normalize each document to NFC, remove control characters other than whitespace and drop exact-duplicate documents; says what it removed")
    p.add_argument("--out", default=None, help="output folder (default: out/<model> for the built-in data, out/<model>-<name of --data> otherwise)")
    p.add_argument("--fresh", action="store_true", help="start over even if --out holds a checkpoint")
    p.add_argument("--init", default=None, metavar="DIR", help="fine-tune: start from the weights in DIR (a Hugging Face "
                   f"checkpoint folder or one train.py wrote) and use its tokenizer; the learning rate defaults to {INIT_LR} "
                   f"({DPO_LR} for preference pairs), "
                   "the context to the recipe's max_seq_len")
    p.add_argument("--lora", type=ranged(int, "a positive rank such as 16", lambda v: v >= 1), default=None, metavar="R",
                   help="with --init: train low-rank adapters of rank R (LoRA, see lora.py), the model's own weights frozen; "
                   "model.safetensors gets the merged weights, adapter_model.safetensors and adapter_config.json the "
                   f"adapters alone, as peft saves them; the learning rate defaults to {LORA_LR}")
    p.add_argument("--lora-alpha", type=ranged(float, "a positive number such as 32", lambda v: v > 0), default=None,
                   help="LoRA's alpha: the adapters' output is scaled by alpha / R (default: 2R)")
    p.add_argument("--lora-targets", type=names, default=None, metavar="NAMES", help="the linear layers LoRA adapts, by "
                   "the model file's names: wq,wk,wv,wo (attention) and w1,w2,w3 (MLP) in gpt_llama (default: all of "
                   "the blocks', attention and MLP)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="with --lora: the dtype of "
                   "the frozen weights; bfloat16 halves their memory (the adapters stay float32)")
    p.add_argument("--beta", type=ranged(float, "a positive number such as 0.1", lambda v: v > 0), default=None,
                   help="preference pairs (DPO, preferences.py): how far the model may move from the --init model, the "
                   f"beta of the loss -log sigmoid(beta * margin) (default: TRL's, {preferences.DEFAULT_BETA})")
    p.add_argument("--max-steps", type=COUNT, default=None, help="optimizer steps; fixes the schedule length and turns the time budget off unless --time-budget is given")
    p.add_argument("--time-budget", type=ranged(float, "0 (none) or a positive number of seconds", lambda v: v >= 0), default=None, help=f"seconds of wall time for the whole run, 0 for none (default: {r['time_budget']} unless --max-steps)")
    p.add_argument("--batch-size", type=COUNT, default=r["batch_size"], help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=COUNT, default=r["grad_accum"], help="micro-batches per optimizer step")
    p.add_argument("--lr", type=POSITIVE, default=r["lr"], help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=FRACTION, default=r["min_lr_ratio"], help="final learning rate as a fraction of the peak")
    p.add_argument("--warmup-steps", type=ranged(int, "0 or more", lambda v: v >= 0), default=r["warmup_steps"], help="linear warmup steps")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=r["weight_decay"], help="AdamW weight decay of matrices")
    # beta 1 would make Adam's moving averages never move
    p.add_argument("--beta1", type=BETA, default=r["beta1"], help="AdamW beta1")
    p.add_argument("--beta2", type=BETA, default=r["beta2"], help="AdamW beta2")
    p.add_argument("--grad-clip", type=ranged(float, "0 (none) or more", lambda v: v >= 0), default=r["grad_clip"], help="gradient norm clip, 0 for none")
    p.add_argument("--vocab-size", type=ranged(int, "at least 256, the byte tokens that every vocabulary starts with", lambda v: 256 <= v < 2**31), default=r["vocab_size"], help="tokenizer vocabulary size (256 bytes + merges)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"override a Config field, repeatable (recipe: {r['config']})")
    p.add_argument("--seed", type=ranged(int, "between 0 and 2**32 - 1", lambda v: 0 <= v < 2**32), default=0, help="seed of the weights and the data order")
    p.add_argument("--eval-every", type=EVERY, default=r["eval_every"], help="steps between evaluations, 0 for only at the end")
    p.add_argument("--eval-tokens", type=ranged(int, "0 (all) or more", lambda v: v >= 0), default=r["eval_tokens"], help="validation tokens per evaluation of a text model, 0 for all")
    p.add_argument("--ckpt-every", type=EVERY, default=500, help="steps between checkpoints, 0 for only at the end")
    p.add_argument("--log-every", type=COUNT, default=10, help="steps between log lines when stdout is not a terminal")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--threads", type=ranged(int, "0 (automatic) or more", lambda v: v >= 0), default=0, help="CPU threads of torch, kept for the whole run; 0: measured as the run goes (threads.py): from torch's default (1 when the load average shows the cores busy), half as many are tried for a few steps at the start and whenever steps slow down several times, as when another process takes a core (the threads of a step wait for each other), and kept if faster; more are tried again later")
    p.add_argument("--workers", type=COUNT, default=None, help="text models: processes that encode a streamed corpus into token shards (default: the cores)")
    p.add_argument("--loader-workers", type=ranged(int, "0 or more", lambda v: v >= 0), default=None, help="DataLoader worker processes that prefetch batches (default: 2 on CUDA; 0 on CPU, where cutting a batch costs microseconds and a worker would take a core)")
    p.add_argument("--peak-flops", type=ranged(float, "a positive number of FLOP/s", lambda v: v > 0), default=None, help="peak FLOP/s of one device for MFU (default: known CUDA GPUs only)")
    p.add_argument("--sample-tokens", type=ranged(int, "0 (no sample) or more", lambda v: v >= 0), default=200, help="tokens of the sample printed at the end (image-text models: that many examples, at most 6), 0 for none")
    p.add_argument("--no-plot", action="store_true", help="skip loss.png")
    p.add_argument("--wandb", nargs="?", const="llms-from-scratch", default=None, metavar="PROJECT", help="log to Weights & Biases (needs wandb)")
    p.add_argument("--examples", nargs="?", type=named("a folder"), const="examples", default=None, metavar="FOLDER", help="train nothing; write "
                   "the README's example data into FOLDER (default: examples): texts/ (the built-in corpus as .txt files), "
                   "pictures/ (a picture of each colour and shape), pydoc_chats.jsonl (conversations to fine-tune on) and "
                   "pydoc_prefs.jsonl (preference pairs to tune the result on)")
    p.add_argument("--plot", type=named("a run folder"), default=None, metavar="RUN", help="train nothing; draw RUN/loss.png again from RUN/metrics.jsonl "
                   "(needs the plots extra)")
    args = p.parse_args(argv)
    given = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        given[key.strip()] = parse_value(value.strip())
    # From scratch, the recipe's config with --set on top; from --init, the folder's config with only
    # the training context (and --set) changed, since the other fields fix the weights' shapes.
    args.overrides = {**r["config"], **given} if args.init is None else given
    args.init_context = r["config"].get("max_seq_len")
    if args.lora is not None and args.init is None:
        raise UserError("--lora adapts a pretrained model: give --init DIR (a model trained from scratch has nothing to adapt)")
    if args.lora is None:
        for flag in ("--lora-alpha", "--lora-targets"):
            if getattr(args, flag[2:].replace("-", "_")) is not None:
                raise UserError(f"{flag} applies only with --lora R")
        if args.dtype != "float32":
            raise UserError("--dtype bfloat16 applies only with --lora R: full fine-tuning keeps float32 weights, "
                            "which AdamW's small updates need")
    elif args.lora_alpha is None:
        args.lora_alpha = 2 * args.lora
    if args.time_budget is None:
        args.time_budget = 0 if args.max_steps is not None else r["time_budget"]
    if not args.time_budget and args.max_steps is None:
        raise UserError("with --time-budget 0, give --max-steps, or the run would never end")
    return args
