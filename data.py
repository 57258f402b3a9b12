"""
Data for train.py and sample.py: where a corpus comes from, how it becomes tokens, and the batch stream.

A model file names its pipeline with TASK; PIPELINES maps that name to the class that feeds it:
    causal_lm   text -> byte-level BPE (bpe.py) -> memory-mapped token file -> windows {idx, targets}

Every pipeline offers the same few methods, so train.py never needs to know which one it drives:
    model_config()       Config fields the data decides (the vocabulary size)
    check(config)        DataError unless both splits hold an example of the model's shape
    unit(config)         what the log counts, e.g. ("tokens", tokens per example)
    stream(config, ...)  an IterableDataset of batches, dicts passed as model(**batch)
    evaluate(...)        validation metrics, a dict of floats whose first key is val_loss
    eval_examples(...)   how many examples one evaluation reads, to plan a time budget
    demo(...)            a short sample to print at the end of training
    save(out_dir)        what sample.py needs besides the weights (the tokenizer)

Where things are cached ($LLMS_FROM_SCRATCH_CACHE, else $XDG_CACHE_HOME/llms-from-scratch, else
~/.cache/llms-from-scratch), each keyed by content so that a changed corpus never reads a stale file:
    downloads/<sha256 of the URL>.txt
    tokenizers/<sha256 of training text, vocabulary size, split pattern>/tokenizer.{tiktoken,json}
    tokens/<tokenizer key>-<sha256 of the split's text>.<uint16|uint32>
"""

import glob
import hashlib
import math
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info


class DataError(Exception):
    """Bad input, said in one sentence; the command-line scripts print it and exit with code 2."""


def cache_dir():
    if os.environ.get("LLMS_FROM_SCRATCH_CACHE"):
        return Path(os.environ["LLMS_FROM_SCRATCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llms-from-scratch"


def sha256(data):
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def atomic_write(path, write):
    """Call write(temp_path), then move the temp file onto path, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give them the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------- text


def default_corpus():
    """The built-in corpus: the Python documentation's topics that ship with the standard library."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def download(url):
    """Path of the cached copy of url, fetched on first use."""
    path = cache_dir() / "downloads" / f"{sha256(url)}.txt"
    if not path.exists():
        print(f"downloading {url} into {path}", file=sys.stderr)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                body = response.read()
        except (OSError, ValueError) as e:
            raise DataError(f"could not download {url} ({e}); check the URL or pass a local file") from None
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(body))
    return path


def corpus_files(source):
    """The files that make up a --data argument: a file, a directory of .txt files, a glob or a URL."""
    if source.startswith(("http://", "https://")):
        return [download(source)]
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"the directory {source} holds no .txt files; pass a text file, a folder of .txt files or a glob")
        return files
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p))
    if not files:
        raise DataError(f"no file matches --data {source}; pass a text file, a folder of .txt files, a glob or a URL")
    return files


def read_text(source=None):
    """The corpus as one string: the built-in one for None, else the files of source, joined."""
    if source is None:
        return default_corpus()
    texts = []
    for path in corpus_files(source):
        raw = path.read_bytes()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            warn(f"{path} is not valid UTF-8 (byte {e.start}); undecodable bytes were replaced with U+FFFD")
            texts.append(raw.decode("utf-8", errors="replace"))
    text = "\n\n".join(texts)
    if not text.strip():
        raise DataError(f"--data {source} is empty; pass a file with text in it")
    return text


def split_text(text, val_fraction=0.1):
    """The first (1 - val_fraction) of the characters for training, the rest for validation."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


# ------------------------------------------------------------------------------------------ tokens


def train_tokenizer(text, vocab_size, pattern=None):
    """A BPE tokenizer trained on text, or the cached one trained on the same text before."""
    import bpe

    pattern = pattern or bpe.CL100K_PATTERN
    key = f"{sha256(text)[:16]}-{vocab_size}-{sha256(pattern)[:8]}"
    path = cache_dir() / "tokenizers" / key
    if (path / "tokenizer.json").exists():
        return bpe.Tokenizer.load(path), key
    print(f"training a {vocab_size}-token BPE tokenizer on {len(text):,} characters; cached in {path}", file=sys.stderr)
    try:
        tokenizer = bpe.train(text, vocab_size, pattern=pattern)
    except ValueError as e:  # a vocabulary size bpe.py cannot train, said in its own words
        raise DataError(str(e)) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{key}."))
    tokenizer.save(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another process cached the same tokenizer first
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return tokenizer, key


def load_tokenizer(directory):
    import bpe

    return bpe.Tokenizer.load(directory)


def token_file(tokenizer, tokenizer_key, text):
    """text's tokens in a cached file of uint16 (or uint32 for vocabularies past 65,536), memory-mapped."""
    dtype = np.uint16 if tokenizer.n_vocab <= 2**16 else np.uint32
    path = cache_dir() / "tokens" / f"{tokenizer_key}-{sha256(text)[:16]}.{np.dtype(dtype).name}"
    if not path.exists():
        ids = np.asarray(tokenizer.encode_ordinary(text), dtype=dtype)
        atomic_write(path, lambda tmp: ids.tofile(tmp))
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


# ---------------------------------------------------------------------------------------- batches


class WindowStream(IterableDataset):
    """Endless batches of windows of seq_len + 1 tokens, in an order that depends only on (seed, step).

    Each epoch cuts the token file into windows at a random offset and shuffles them. A step takes
    world_size * grad_accum * batch_size windows in that order; micro-batch m of rank r gets the
    slice ((m * world_size) + r) * batch_size, so 2 ranks with batch B see what 1 rank with batch 2B
    sees. Item i of the stream is (step, micro) = divmod(i, grad_accum); DataLoader worker w of n
    makes items w, w + n, ... and the DataLoader hands them out in turn, so the order is kept.
    """

    def __init__(self, path, dtype, seq_len, batch_size, seed=0, start_step=0, rank=0, world_size=1, grad_accum=1):
        super().__init__()
        self.path, self.dtype, self.seq_len = path, dtype, seq_len
        self.batch_size, self.seed, self.start_step = batch_size, seed, start_step
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        n_tokens = os.path.getsize(path) // np.dtype(dtype).itemsize
        # Keep seq_len - 1 tokens of slack so that every epoch's random offset fits.
        self.n_windows = (n_tokens - 1 - (seq_len - 1)) // seq_len
        if self.n_windows < 1:
            raise DataError(
                f"the training split has {n_tokens} tokens, too few for windows of {seq_len}; "
                "use more text or a shorter context (--set max_seq_len=...)"
            )
        self._epochs = {}

    def epoch(self, e):
        """(offset, permutation of window indices) of epoch e."""
        if e not in self._epochs:
            rng = np.random.default_rng([self.seed, e])
            self._epochs = {e: (int(rng.integers(self.seq_len)), rng.permutation(self.n_windows))}
        return self._epochs[e]

    def starts(self, step, micro):
        """First token of each window of this rank's micro-batch at (step, micro)."""
        per_step = self.world_size * self.grad_accum * self.batch_size
        first = step * per_step + (micro * self.world_size + self.rank) * self.batch_size
        out = np.empty(self.batch_size, dtype=np.int64)
        for j, g in enumerate(range(first, first + self.batch_size)):
            e, i = divmod(g, self.n_windows)
            offset, perm = self.epoch(e)
            out[j] = offset + perm[i] * self.seq_len
        return out

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        span = np.arange(self.seq_len + 1)
        item = self.start_step * self.grad_accum + worker
        while True:
            step, micro = divmod(item, self.grad_accum)
            windows = torch.from_numpy(tokens[self.starts(step, micro)[:, None] + span].astype(np.int64))
            yield {"idx": windows[:, :-1], "targets": windows[:, 1:]}
            item += n_workers


# --------------------------------------------------------------------------------------- pipeline


class CausalLM:
    """Next-token prediction on text: BPE tokens, windows of the training split, bits per byte."""

    def __init__(self, source=None, vocab_size=2048, pattern=None, val_fraction=0.1):
        text = read_text(source)
        train_text, val_text = split_text(text, val_fraction)
        if not val_text.strip():
            raise DataError("the corpus is too short to hold out a validation split; pass more text")
        self.tokenizer, key = train_tokenizer(train_text, vocab_size, pattern)
        self.train_tokens = token_file(self.tokenizer, key, train_text)
        self.val_tokens = token_file(self.tokenizer, key, val_text)
        # UTF-8 bytes of every token, to turn a loss per token into bits per byte.
        self.token_bytes = torch.tensor([len(self.tokenizer.decode_bytes([i])) for i in range(self.tokenizer.n_vocab)])
        self.fingerprint = {"corpus_sha256": sha256(text), "tokenizer": key}

    def describe(self):
        return (
            f"{len(self.train_tokens):,} training and {len(self.val_tokens):,} validation tokens, "
            f"vocabulary {self.tokenizer.n_vocab}"
        )

    def model_config(self):
        return {"vocab_size": self.tokenizer.n_vocab}

    def check(self, config):
        seq_len = config.max_seq_len
        for split, tokens in (("training", self.train_tokens), ("validation", self.val_tokens)):
            if len(tokens) < seq_len + 1:
                raise DataError(
                    f"the {split} split has {len(tokens):,} tokens, too few for one window of {seq_len} + 1; "
                    "use more text or a shorter context (--set max_seq_len=...)"
                )

    def unit(self, config):
        return "tokens", config.max_seq_len

    def stream(self, config, batch_size, **kwargs):
        return WindowStream(self.train_tokens.filename, self.train_tokens.dtype, config.max_seq_len, batch_size, **kwargs)

    def eval_examples(self, config, max_tokens=None):
        n = (len(self.val_tokens) - 1) // config.max_seq_len
        return min(n, max(1, max_tokens // config.max_seq_len)) if max_tokens else n

    @torch.no_grad()
    def evaluate(self, model, config, batch_size, device, autocast, max_tokens=None):
        """Mean validation cross-entropy (nats per token), perplexity and bits per byte, over whole windows.

        Under DDP each rank takes every world_size-th window and the sums are all-reduced.
        """
        self.check(config)
        seq_len = config.max_seq_len
        n = self.eval_examples(config, max_tokens)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        mine = np.arange(rank, n, world)
        span = np.arange(seq_len + 1)
        sums = torch.zeros(3, dtype=torch.float64)  # loss * tokens, tokens, bytes
        was_training = model.training
        model.eval()
        for i in range(0, len(mine), batch_size):
            w = torch.from_numpy(self.val_tokens[mine[i : i + batch_size, None] * seq_len + span].astype(np.int64))
            x, y = w[:, :-1].to(device), w[:, 1:].to(device)
            # No targets: the model's own loss may add auxiliary terms (MoE balancing), and the
            # cross-entropy from the logits is all that bits per byte measures.
            with autocast():
                logits, _ = model(x)
            nats = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            sums += torch.tensor([nats, y.numel(), self.token_bytes[y.cpu()].sum().item()], dtype=torch.float64)
        model.train(was_training)
        if dist.is_initialized():
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        loss, tokens, n_bytes = sums.tolist()
        loss /= tokens
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": loss * tokens / (math.log(2) * n_bytes)}

    def demo(self, model, device, prompt="The", max_new_tokens=200, temperature=0.8, top_k=50, seed=0):
        ids = self.tokenizer.encode_ordinary(prompt)
        max_new_tokens = min(max_new_tokens, model.config.max_seq_len - len(ids))
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
        return self.tokenizer.decode(out[0].tolist())

    def save(self, out_dir):
        self.tokenizer.save(out_dir)


PIPELINES = {"causal_lm": CausalLM}


def pipeline(task, **kwargs):
    if task not in PIPELINES:
        raise DataError(f"no data pipeline for TASK {task!r}; data.py knows {', '.join(sorted(PIPELINES))}")
    return PIPELINES[task](**kwargs)
