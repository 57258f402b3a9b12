"""
What train.py talks to: the data pipeline that feeds a model file, and the one for text models, which
cuts windows of tokens from the corpus that corpus.py prepares and scores them in bits per byte.

A model file names its pipeline with TASK; PIPELINES maps that name to a class, and
pipeline(module, options) makes the one module's TASK names from train.py's options:
    causal_lm   text -> byte-level BPE (bpe.py) -> token files or shards (corpus.py) -> windows of
                max_seq_len tokens {"idx": (B, T), "targets": (B, T)}, the targets shifted by one (here);
                or conversations, records of chat messages (conversations.py) -> {"idx", "targets",
                "loss_weight"}, a conversation a row, where only the assistant's tokens are scored;
                or preference pairs (preferences.py) -> {"idx", "targets"[, "ref"]}, the chosen then the
                rejected answers, for DPO
    image_text  pictures of shapes, or an image folder with captions (images.py) -> {"pixel_values":
                (B, 3, S, S), "input_ids": (B, max_seq_len)}, captions padded to a fixed length
    prefix_lm   pictures of shapes with questions, or an image folder with prefixes and suffixes
                (images.py) -> {"pixel_values", "input_ids": (B, T), "prefix_len": (B,), "targets": (B, T),
                "loss_weight"}, where only the suffix is scored

Every pipeline offers the same methods, and train.py calls nothing else, so it never needs to know
which one it drives:
    from_options(options, module, tokenizer=None)
        classmethod: the pipeline made from train.py's options, an argparse Namespace (data,
        vocab_size, text_field, clean, workers, ...) of which each pipeline reads what it needs;
        module is the model file (an image pipeline makes pixels with its preprocess(image,
        image_size)); tokenizer is a pretrained model's (tokenizer, key of its files, files) to use
        instead of training one (train.py --init), for the pipelines whose constructor takes one
        (takes_tokenizer)
    describe()                       one line about the data for the log
    fingerprint                      a dict naming the data (corpus or images, tokenizer) that a
                                     resumed run must find unchanged
    model_config()                   Config fields the data decides (the vocabulary size)
    check(config)                    UserError unless both splits hold an example of the model's shape
    unit(config)                     what the log counts, e.g. ("tokens", tokens per example)
    stream(config, batch_size, seed=0, start_step=0, rank=0, world_size=1, grad_accum=1)
        an IterableDataset of endless batches in an order fixed by (seed, step). Item i is micro-batch
        i % grad_accum of step start_step + i // grad_accum; of the world_size * grad_accum *
        batch_size examples of a step, micro-batch m of rank r holds the batch_size from
        (m * world_size + r) * batch_size on, so 2 ranks of batch B see what 1 rank of batch 2B sees
    evaluate(model, config, batch_size, device, autocast, max_tokens=None)
        validation metrics, a dict of floats whose first key is val_loss; under DDP every rank takes
        its share and the sums are all-reduced, so the numbers are those of one process; a key
        "answers" holds no number but text that train.py shows under them (answers to held-out questions)
    eval_examples(config, max_tokens=None)   how many examples one evaluation reads, to plan a time budget
    demo(model, device, max_new_tokens, seed)   a short sample to print at the end of training
    save(out_dir)                    what sample.py needs besides the weights (the tokenizer)
and may offer two more, which train.py calls where they exist:
    prepare(model, device, batch_size, autocast)
        once, with the model as --init or the model file builds it, before a checkpoint is loaded into
        it or a step is taken: what the pipeline needs of the starting model (preferences.py: the
        reference's log-probabilities of every pair)
    loss(model, batch) -> (loss, metrics)
        the micro-batch's loss, which train.py then computes with this instead of model(**batch), and a
        dict of 0-d tensors about it (rewards/margins, ...), each a mean over the micro-batch: train.py
        averages them over the step as it averages the loss, and logs them beside it

A batch is a dict that train.py hands to the model as model(**batch), or to the pipeline's loss, its
tensors moved to the device. Two keys are more than tensors of examples:
    loss_weight  where the loss is a mean over a varying number of tokens (the answers of prefix-LM
                 and conversation batches), that number; train.py takes it out and weighs each
                 micro-batch's mean by its share of the step's tokens over every micro-batch and
                 process, so that accumulation and DDP train as one big batch does
    gather       True in an image-text batch when several processes train: the model then scores
                 every image against the captions of all processes, as one batch of them all would
"""

import inspect
import math
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from llm_machinery import conversations, corpus, images, preferences, runs
from llm_machinery.corpus import UserError


# --------------------------------------------------------------------------------------- causal LM


class CausalLM:
    """Next-token prediction on text: BPE tokens, windows of the training split, bits per byte."""

    def __init__(self, source=None, vocab_size=2048, pattern=None, val_fraction=0.1, tokenizer=None,
                 text_field="text", clean=False, workers=None):
        """tokenizer: None to train one on the training split, or (tokenizer, key, files) to use that
        one, a pretrained model's: key names its token files in the cache, files are copied by save().

        A small corpus of .txt files (corpus.is_small_corpus) is split by characters and encoded whole;
        any other is streamed as documents (text_field names their text in .jsonl, parquet and
        datasets), cleaned if asked (corpus.Cleaner), split into whole documents and encoded by worker
        processes into shards, each document ending in <|endoftext|> (corpus.prepare_shards)."""
        self.tokenizer_files = None if tokenizer is None else tokenizer[2]
        if corpus.is_small_corpus(source) and not clean:
            self._read_whole(source, vocab_size, pattern, val_fraction, tokenizer)
        else:
            self._stream(source, vocab_size, pattern, val_fraction, tokenizer, text_field, clean, workers)
        # UTF-8 bytes of every token, to turn a loss per token into bits per byte.
        self.token_bytes = torch.tensor([len(self.tokenizer.decode_bytes([i])) for i in range(self.tokenizer.n_vocab)])
        if self.separator is not None:
            self.token_bytes[self.separator] = 0  # the end of a document is no text of the corpus

    @classmethod
    def from_options(cls, options, module, tokenizer=None):
        """The pipeline of --data: this one for text, conversations.Conversations for records of chats,
        preferences.Preferences for pairs of answers."""
        if preferences.is_preferences(options.data, options.text_field):
            return preferences.Preferences.from_options(options, module, tokenizer)
        if conversations.is_conversations(options.data, options.text_field):
            return conversations.Conversations.from_options(options, module, tokenizer)
        if getattr(options, "validation_file", None) is not None:  # refused before the corpus is read
            raise UserError(VALIDATION_FILE_APPLIES)
        return cls(options.data, options.vocab_size, tokenizer=tokenizer, text_field=options.text_field,
                   clean=options.clean, workers=options.workers)

    def _read_whole(self, source, vocab_size, pattern, val_fraction, tokenizer):
        text = corpus.read_text(source)
        train_text, val_text = corpus.split_text(text, val_fraction)
        if not val_text.strip():
            raise UserError("the corpus is too short to hold out a validation split; pass more text")
        if tokenizer is None:
            self.tokenizer, key = corpus.train_tokenizer(train_text, vocab_size, pattern)
        else:
            self.tokenizer, key, _ = tokenizer
        dtype = corpus.token_dtype(self.tokenizer)
        self.train_tokens, self.val_tokens = (
            corpus.TokenShards([tokens.filename] if isinstance(tokens, np.memmap) else [], dtype)
            for tokens in (corpus.token_file(self.tokenizer, key, train_text), corpus.token_file(self.tokenizer, key, val_text)))
        self.separator = None
        self.fingerprint = {"corpus_sha256": corpus.sha256(text), "tokenizer": key}

    def _stream(self, source, vocab_size, pattern, val_fraction, tokenizer, text_field, clean, workers):
        found = corpus.survey(source, text_field, clean, val_fraction)
        if found["cleaner"] is not None:
            print(found["cleaner"].report(), file=sys.stderr)
        if found["documents"] == 0:
            raise UserError(f"--data {source} is empty; pass a source with text in it")
        if int(found["documents"] * val_fraction) == 0:  # how many documents is_validation holds out
            raise UserError(f"--data {source} has {found['documents']} documents, too few to hold out a validation "
                            f"split of whole documents (one in every {1 / val_fraction:g}); pass more documents")
        if tokenizer is None:
            # Every stride-th training document, about TOKENIZER_SAMPLE_BYTES in all: see README.md.
            stride = max(1, -(-found["train_bytes"] // corpus.TOKENIZER_SAMPLE_BYTES))
            sample = corpus.tokenizer_sample(source, text_field, clean, val_fraction, stride, found["bytes"])
            self.tokenizer, key = corpus.train_tokenizer(sample, vocab_size, pattern, special_tokens=(corpus.ENDOFTEXT,),
                                                         content_key=f"{found['sha256'][:16]}-every{stride}")
        else:
            self.tokenizer, key, _ = tokenizer
        self.separator = corpus.separator_id(self.tokenizer)
        shards = corpus.prepare_shards(source, self.tokenizer, key, found, text_field, clean, val_fraction, workers)
        self.train_tokens, self.val_tokens = shards["train"], shards["val"]
        self.fingerprint = {"corpus_sha256": found["sha256"], "tokenizer": key}

    def describe(self):
        return (
            f"{len(self.train_tokens):,} training and {len(self.val_tokens):,} validation tokens, "
            f"vocabulary {self.tokenizer.n_vocab}"
            + ("" if self.separator is None else f" ({self.tokenizer.decode([self.separator])} ends each document)")
        )

    def model_config(self):
        return {"vocab_size": self.tokenizer.n_vocab}

    def check(self, config):
        seq_len = config.max_seq_len
        for split, tokens in (("training", self.train_tokens), ("validation", self.val_tokens)):
            if len(tokens) < seq_len + 1:
                raise UserError(
                    f"the {split} split has {len(tokens):,} tokens, too few for one window of {seq_len} + 1; "
                    "use more text or a shorter context (--set max_seq_len=...)"
                )

    def unit(self, config):
        return "tokens", config.max_seq_len

    def stream(self, config, batch_size, **kwargs):
        return WindowStream(self.train_tokens, config.max_seq_len, batch_size, **kwargs)

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
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, eos_id=self.separator)
        ids = out[0].tolist()
        return self.tokenizer.decode(ids[: ids.index(self.separator)] if self.separator in ids else ids)

    def save(self, out_dir):
        runs.save_tokenizer(out_dir, self.tokenizer, self.tokenizer_files)


class WindowStream(IterableDataset):
    """Endless batches of windows of seq_len + 1 tokens, in an order that depends only on (seed, step).

    tokens is a corpus.TokenShards: the windows run across shard boundaries as if the shards were one file.
    Each epoch cuts the tokens into windows at a random offset and shuffles them. A step takes
    world_size * grad_accum * batch_size windows in that order; micro-batch m of rank r gets the
    slice ((m * world_size) + r) * batch_size, so 2 ranks with batch B see what 1 rank with batch 2B
    sees. Item i of the stream is (step, micro) = divmod(i, grad_accum); DataLoader worker w of n
    makes items w, w + n, ... and the DataLoader hands them out in turn, so the order is kept.
    """

    def __init__(self, tokens, seq_len, batch_size, seed=0, start_step=0, rank=0, world_size=1, grad_accum=1):
        super().__init__()
        self.tokens, self.seq_len = tokens, seq_len
        self.batch_size, self.seed, self.start_step = batch_size, seed, start_step
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        n_tokens = len(tokens)
        # Keep seq_len - 1 tokens of slack so that every epoch's random offset fits.
        self.n_windows = (n_tokens - 1 - (seq_len - 1)) // seq_len
        if self.n_windows < 1:
            raise UserError(
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
        span = np.arange(self.seq_len + 1)
        item = self.start_step * self.grad_accum + worker
        while True:
            step, micro = divmod(item, self.grad_accum)
            windows = torch.from_numpy(self.tokens[self.starts(step, micro)[:, None] + span].astype(np.int64))
            yield {"idx": windows[:, :-1], "targets": windows[:, 1:]}
            item += n_workers


# ---------------------------------------------------------------------------------------- registry


VALIDATION_FILE_APPLIES = ("--validation-file applies to conversations: a text corpus or an image folder holds out "
                           "its own share of the data")
PIPELINES = {"causal_lm": CausalLM, "image_text": images.ImageText, "prefix_lm": images.PrefixLM}


def takes_tokenizer(task):
    """Whether the pipeline of task can use a given tokenizer (train.py --init) instead of training one."""
    return task in PIPELINES and "tokenizer" in inspect.signature(PIPELINES[task]).parameters


def pipeline(module, options, tokenizer=None):
    """The pipeline that feeds the model file module, the one its TASK names, made from train.py's options."""
    task = getattr(module, "TASK", None)
    if task not in PIPELINES:
        raise UserError(f"no data pipeline for TASK {task!r}; data.py knows {', '.join(sorted(PIPELINES))}")
    made = PIPELINES[task].from_options(options, module, tokenizer)
    if getattr(options, "validation_file", None) is not None and getattr(made, "validation_source", None) is None:
        raise UserError(VALIDATION_FILE_APPLIES)
    if getattr(options, "beta", None) is not None and not isinstance(made, preferences.Preferences):
        raise UserError("--beta applies only to preference pairs (records with 'chosen' and 'rejected')")
    return made
