"""
Conversations to fine-tune a chat model on, as instruct models are taught to answer (supervised
fine-tuning, InstructGPT: Ouyang et al. 2022, arXiv:2203.02155): data.py's causal-LM pipeline for a
--data whose records are chats rather than text.

    python train.py --examples                       # examples/pydoc_chats.jsonl: questions on Python's docs
    python train.py --init out/gpt_llama --data examples/pydoc_chats.jsonl
    python sample.py out/gpt_llama-pydoc_chats --chat

Records, in a .jsonl file, a folder of them, parquet or a save_to_disk folder, in the format that
transformers and TRL use:
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": ..., "completion": ...}   text (a user message and its answer), or lists of messages
A source is conversations when its first record has messages, or prompt and completion, and no
--text-field (is_conversations); any other stays a text corpus.

The --init folder's chat format renders each conversation, as sample.py --chat renders it on the
fine-tuned folder (chat.ChatFormat), into token ids and finds the assistant's: each assistant message
and the end-of-turn token that ends it, not the system or user text nor the template's headers. Every
1 / val_fraction-th conversation is held out. A conversation keeps at most max_seq_len + 1 tokens: it
ends after its last assistant message that ends within them (what follows it is never scored), and one
whose first answer ends past them is dropped; the log counts both.

Batches, of B conversations of at most T + 1 tokens:
    {"idx": (B, T), "targets": (B, T), "loss_weight": ()}
idx the tokens but the last; targets the next token where it is the assistant's, else -100; T the longest
conversation of the micro-batch less one, the shorter ones padded at the end; loss_weight the scored
tokens. Padding, not packing: conversations packed into one row would need attention kept inside each
(a block-diagonal mask and positions that restart), which the model files do not take, while padding at
the end needs no mask, since a causal model's tokens never see the ones after them. A step takes
conversations of similar lengths (ConversationStream), which needs a third less padding and reaches a
loss sooner than steps of random ones (docs/results.md).

Validation: val_loss, the mean cross-entropy of the assistant's tokens of held-out conversations, and
the greedy answers to a few held-out questions beside their reference answers. The tokens of every
conversation are cached, keyed by the conversations, the tokenizer and the chat format.
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from llm_machinery import chat, corpus, runs
from llm_machinery.corpus import UserError

ROLES = ("system", "user", "assistant")
N_ANSWERS = 3  # held-out questions answered greedily at each evaluation
GROUP_STEPS = 16  # steps whose conversations are sorted by length together (docs/results.md)
LENGTH_JITTER = 16  # tokens of noise in that sort


def first_record(source, text_field="text"):
    """The first record of --data when it holds records (no .txt file among them) without text_field;
    else {}, as for text."""
    if source is None:
        return {}
    if not (source.startswith("hf:") or corpus.is_saved_dataset(Path(source).expanduser())):
        if any(p.suffix not in (".jsonl", ".parquet") for p in corpus.corpus_files(source)):
            return {}
    records = corpus.records(source)
    try:
        first = next(records, (None, {}))[1]
    finally:
        records.close()
    return {} if text_field in first else first


def is_conversations(source, text_field="text"):
    """Whether --data holds conversations: records of which the first has "messages", or "prompt" and
    "completion", and no text_field."""
    first = first_record(source, text_field)
    return "messages" in first or {"prompt", "completion"} <= first.keys()


def messages_of(record, where):
    """The messages of a record, checked: known roles, text, at least one assistant message, none empty.
    A prompt and completion in text are a user message and the assistant's answer."""
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        messages = [m for value, role in ((record["prompt"], "user"), (record["completion"], "assistant"))
                    for m in (value if isinstance(value, list) else [{"role": role, "content": value}])]
    else:
        raise UserError(f"{where} has no 'messages' (nor 'prompt' and 'completion'), which every record of "
                        "conversations needs")
    if not isinstance(messages, list):
        raise UserError(f"the 'messages' of {where} are not a list of messages")
    checked = []
    for number, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(f"message {number} of {where} has no 'content' holding text")
        if m.get("role") not in ROLES:
            raise UserError(f"message {number} of {where} has the role {m.get('role')!r}; the roles are system, user "
                            "and assistant")
        if m["role"] == "assistant" and not m["content"].strip():
            raise UserError(f"message {number} of {where} is an empty assistant message, which would teach the model to "
                            "say nothing")
        checked.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in checked):
        raise UserError(f"{where} has no assistant message, so nothing to learn from")
    return checked


# Fewer held-out conversations than this make a validation loss that says little; the log says so.
FEW_HELD_OUT = 10


def tokenize(found, rows_of, key, kind="conversations"):
    """(ids, scored, starts) of the records found, (where, record) pairs: the token rows that rows_of(record)
    gives ([(ids, scored)], one a conversation, two a preference pair), one after another, whether each
    token is scored, and where each row starts (one offset more than rows); cached under kind/key."""
    path = corpus.cache_dir() / kind / f"{key}.npz"
    if path.exists():
        with np.load(path) as cached:
            return cached["ids"], cached["scored"], cached["starts"]
    if len(found) > 1000:
        print(f"tokenizing {len(found):,} {kind}; cached in {path}", file=sys.stderr)
    ids, scored, starts = [], [], [0]
    for where, record in found:
        try:
            rows = rows_of(record)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        for i, s in rows:
            ids += i
            scored += s
            starts.append(len(ids))
    arrays = {"ids": np.array(ids, dtype=np.uint32), "scored": np.array(scored, dtype=bool),
              "starts": np.array(starts, dtype=np.int64)}

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    corpus.atomic_write(path, write)
    return arrays["ids"], arrays["scored"], arrays["starts"]


def fit(ids, scored, context):
    """The conversation (ids, scored) cut after its last run of the assistant's tokens that ends within
    context + 1 tokens; None when even the first ends past them."""
    ends = np.flatnonzero(scored & ~np.append(scored[1:], False)) + 1  # one past each run
    ends = ends[ends <= context + 1]
    return (ids[: ends[-1]], scored[: ends[-1]]) if len(ends) else None


def batch(rows):
    """{"idx", "targets", "loss_weight"} of rows (ids, scored), each padded at the end to the longest."""
    width = max(len(ids) for ids, _ in rows) - 1
    idx = np.zeros((len(rows), width), dtype=np.int64)
    targets = np.full((len(rows), width), -100, dtype=np.int64)
    for row, (ids, scored) in enumerate(rows):
        idx[row, : len(ids) - 1] = ids[:-1]
        targets[row, : len(ids) - 1] = np.where(scored[1:], ids[1:].astype(np.int64), -100)
    targets = torch.from_numpy(targets)
    return {"idx": torch.from_numpy(idx), "targets": targets, "loss_weight": (targets != -100).sum()}


class Conversations:
    """Chats for a causal LM, scored on the assistant's tokens: data.py's docstring lists the methods."""

    def __init__(self, source, tokenizer=None, folder=None, vocab_size=2048, val_fraction=0.1, validation_source=None):
        """tokenizer: (tokenizer, key, files) of the --init folder, whose chat format renders the
        conversations; None to train a tokenizer on the training conversations' text, with the built-in
        plain-text format. The conversations of validation_source are held out; without it, each
        conversation of source is, with probability val_fraction, by a hash of its content."""
        found = [(where, messages_of(record, where)) for where, record in corpus.records(source)]
        if not found:
            raise UserError(f"--data {source} holds no conversations")
        self.validation_source = validation_source
        if validation_source is None:
            self.held = [corpus.is_held_out(messages, val_fraction) for _, messages in found]
        else:
            held_out = [(where, messages_of(record, where)) for where, record in corpus.held_out_records(validation_source)]
            if not held_out:
                raise UserError(f"--validation-file {validation_source} holds no conversations")
            self.held = [False] * len(found) + [True] * len(held_out)
            found += held_out
        self.chats = [messages for _, messages in found]
        if tokenizer is None:
            text = "\n\n".join(m["content"] for c, held in zip(self.chats, self.held) if not held for m in c)
            self.tokenizer, key = corpus.train_tokenizer(text, vocab_size)
            self.tokenizer_files = None
        else:
            self.tokenizer, key, self.tokenizer_files = tokenizer
        self.format = chat.chat_format(folder, self.tokenizer)
        self.fingerprint = {"conversations_sha256": corpus.sha256(json.dumps([self.chats, self.held], sort_keys=True)),
                            "tokenizer": key,
                            "chat_format": corpus.sha256(f"{self.format.source}{sorted(self.format.end_ids)}")[:16]}
        key = corpus.sha256(json.dumps(self.fingerprint, sort_keys=True))[:32]
        ids, scored, starts = tokenize(found, lambda messages: [self.format.tokens(messages)], key)
        self.examples = [(ids[a:b], scored[a:b]) for a, b in zip(starts[:-1], starts[1:])]
        self.fitted = None
        if not any(self.held):
            raise UserError(f"none of the {len(found)} conversations of --data {source} fell among the "
                            f"{val_fraction:.0%} held out for validation (chosen by a hash of each one's content); "
                            "pass more, or conversations to validate on with --validation-file")

    @classmethod
    def from_options(cls, options, module, tokenizer=None):
        folder = getattr(options, "init", None)
        return cls(options.data, tokenizer, None if folder is None else Path(folder), options.vocab_size,
                   validation_source=getattr(options, "validation_file", None))

    def fit(self, context):
        """(training examples, validation (example, messages) pairs) that fit context + 1 tokens, and the
        counts of conversations cut and dropped to fit."""
        if self.fitted is None or self.fitted[0] != context:
            train, val, cut, dropped = [], [], 0, 0
            for example, messages, held in zip(self.examples, self.chats, self.held):
                kept = fit(*example, context)
                if kept is None:
                    dropped += 1
                    continue
                cut += bool(example[1][len(kept[0]):].any())  # an answer was left out
                (val if held else train).append((kept, messages) if held else kept)
            self.fitted = (context, train, val, cut, dropped)
        return self.fitted[1:]

    def describe(self):
        _, train, val, _, _ = self.fitted
        tokens = sum(len(ids) for ids, _ in train)
        scored = sum(int(s.sum()) for _, s in train)
        return (f"{len(train):,} training and {len(val):,} validation conversations ({tokens:,} training tokens, "
                f"{scored:,} of them the assistant's) in {self.format.name}, vocabulary {self.tokenizer.n_vocab}")

    def model_config(self):
        return {"vocab_size": self.tokenizer.n_vocab}

    def check(self, config):
        """UserError unless both splits keep a conversation; the notes on the log, once."""
        context = config.max_seq_len
        train, val, cut, dropped = self.fit(context)
        if not dist.is_initialized() or dist.get_rank() == 0:
            if self.format.note:
                print(f"note: {self.format.note}", file=sys.stderr)
            held = sum(self.held)
            if self.validation_source is None and held < FEW_HELD_OUT:
                print(f"{held} of {len(self.held)} conversations are held out for validation (chosen by a hash of each "
                      "one's content); a validation loss over so few is noisy: --validation-file FILE takes "
                      "conversations of your own to validate on", file=sys.stderr)
            if cut or dropped:
                print(f"note: {cut + dropped:,} of {len(self.examples):,} conversations run past the {context}-token "
                      f"context: {cut:,} end after their last answer that fits, {dropped:,} are dropped (their first "
                      "answer ends past it)", file=sys.stderr)
        for split, kept in (("training", train), ("validation", val)):
            if not kept:
                raise UserError(f"no {split} conversation has an answer that ends within the {context}-token context; "
                                "raise it (--set max_seq_len=...)")

    def unit(self, config):
        train = self.fit(config.max_seq_len)[0]
        return "tokens", round(sum(len(ids) - 1 for ids, _ in train) / len(train))

    def stream(self, config, batch_size, **kwargs):
        return ConversationStream(self.fit(config.max_seq_len)[0], batch_size, **kwargs)

    def eval_rows(self, config, max_tokens=None):
        """The held-out conversations one evaluation reads: all, or the first that hold max_tokens tokens."""
        rows, tokens = [], 0
        for example, _ in self.fit(config.max_seq_len)[1]:
            if max_tokens and tokens >= max_tokens:
                break
            rows.append(example)
            tokens += len(example[0]) - 1
        return rows

    def eval_examples(self, config, max_tokens=None):
        return len(self.eval_rows(config, max_tokens))

    @torch.no_grad()
    def evaluate(self, model, config, batch_size, device, autocast, max_tokens=None):
        """val_loss: the cross-entropy of the assistant's tokens of the held-out conversations, summed and
        divided by the number of those tokens; under DDP each rank takes every world_size-th batch and the sums are
        all-reduced. "answers": greedy answers to the first held-out questions, on the first rank."""
        rows = sorted(self.eval_rows(config, max_tokens), key=lambda row: len(row[0]))  # little padding
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        sums = torch.zeros(2, dtype=torch.float64)  # nats, scored tokens
        was_training = model.training
        model.eval()
        for start in range(rank * batch_size, len(rows), world * batch_size):
            b = batch(rows[start : start + batch_size])
            with autocast():
                logits, _ = model(b["idx"].to(device))
            targets = b["targets"].to(device)
            sums[0] += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
            sums[1] += b["loss_weight"].item()
        if dist.is_initialized():
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        result = {"val_loss": (sums[0] / sums[1]).item()}
        if rank == 0:
            with autocast():
                result["answers"] = "\n".join(self.answers(model, config, device, range(N_ANSWERS)))
        model.train(was_training)
        return result

    @torch.no_grad()
    def answers(self, model, config, device, picks, max_new_tokens=None):
        """'question' -> 'greedy answer' (reference 'answer'): the first assistant message of each picked
        held-out conversation, asked with the messages before it; an answer ends at an end-of-turn token,
        the room left in the context, max_new_tokens, or 16 tokens past the reference's length."""
        val = self.fit(config.max_seq_len)[1]
        lines = []
        for i in picks:
            if i >= len(val):
                break
            messages = val[i][1]
            k = next(j for j, m in enumerate(messages) if m["role"] == "assistant")
            ids = self.format.prompt(messages[:k])
            reference = messages[k]["content"]
            n = min(config.max_seq_len - len(ids),
                    max_new_tokens or len(self.tokenizer.encode_ordinary(reference)) + 16)
            if n < 1:  # a template that writes the question longer alone than in the conversation
                continue
            new = greedy_answer(model, self.format, ids, n, device)
            question = messages[k - 1]["content"] if k else ""
            lines.append(f"  {shorten(question)!r} -> {shorten(self.tokenizer.decode(new))!r} "
                         f"(reference {shorten(reference)!r})")
        return lines

    def demo(self, model, device, max_new_tokens=200, seed=0):
        """A few held-out questions, picked by seed, answered greedily beside their references."""
        return demo(self, model, device, max_new_tokens, seed)

    def save(self, out_dir):
        runs.save_tokenizer(out_dir, self.tokenizer, self.tokenizer_files)


def greedy_answer(model, chat_format, ids, n, device):
    """The ids model writes greedily after the prompt ids, up to n of them or an end-of-turn token."""
    new = []
    for token in model.generate_stream(torch.tensor([ids], device=device), n, temperature=0):
        if int(token[0]) in chat_format.end_ids:
            break
        new.append(int(token[0]))
    return new


def demo(pipe, model, device, max_new_tokens, seed):
    """pipe.answers to N_ANSWERS of its held-out records, picked by seed, in one text."""
    n_val = len(pipe.fit(model.config.max_seq_len)[1])
    picks = np.random.default_rng(seed).permutation(n_val)[:N_ANSWERS].tolist()
    was_training = model.training
    model.eval()
    lines = pipe.answers(model, model.config, device, picks, max_new_tokens)
    model.train(was_training)
    return "\n".join(lines)


def shorten(text, width=80):
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


class ConversationStream(IterableDataset):
    """Endless batches of conversations, in an order that depends only on (seed, step).

    Each epoch shuffles the conversations, and the run reads them one epoch after another; every
    GROUP_STEPS steps' worth of them is then sorted by length and cut into steps, taken in random order,
    so that a step's conversations are of similar lengths and need little padding. A step's
    conversations are shared among ranks and micro-batches as data.WindowStream shares its windows, so a
    resumed run and DDP see what one uninterrupted process sees."""

    def __init__(self, examples, batch_size, seed=0, start_step=0, rank=0, world_size=1, grad_accum=1):
        super().__init__()
        self.examples, self.batch_size, self.seed, self.start_step = examples, batch_size, seed, start_step
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.per_step = world_size * grad_accum * batch_size
        self._epochs, self._group = {}, (None, None)

    def length(self, example):
        return len(example[0])

    def collate(self, examples):
        return batch(examples)

    def shuffled(self, g):
        """The g-th conversation of the run, epoch after shuffled epoch."""
        e, i = divmod(g, len(self.examples))
        if e not in self._epochs:
            if len(self._epochs) > 2:  # a group takes from two epochs, more only when they are tiny
                self._epochs.clear()
            self._epochs[e] = np.random.default_rng([self.seed, e]).permutation(len(self.examples))
        return self._epochs[e][i]

    def example(self, g):
        """The g-th example of the run: of its group of GROUP_STEPS steps, sorted by length give or take
        LENGTH_JITTER tokens, so that conversations of about the same length stay in random order."""
        size = GROUP_STEPS * self.per_step
        group, j = divmod(g, size)
        if self._group[0] != group:
            rng = np.random.default_rng([self.seed, group, 1])
            picked = [self.shuffled(group * size + i) for i in range(size)]
            lengths = [self.length(self.examples[k]) for k in picked] + rng.uniform(0, LENGTH_JITTER, size)
            picked = [picked[i] for i in np.argsort(lengths, kind="stable")]
            self._group = (group, [picked[s * self.per_step + i] for s in rng.permutation(GROUP_STEPS)
                                   for i in range(self.per_step)])
        return self.examples[self._group[1][j]]

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        item = self.start_step * self.grad_accum + worker
        while True:
            step, micro = divmod(item, self.grad_accum)
            first = step * self.per_step + (micro * self.world_size + self.rank) * self.batch_size
            yield self.collate([self.example(g) for g in range(first, first + self.batch_size)])
            item += n_workers


# ------------------------------------------------------------------------------ the built-in example

SYSTEM = "You answer questions about Python from its documentation."
ASK = ("Tell me about {}.", "What should I know about {}?", "Explain {}.", "What can you tell me about {}?")
GO_ON = ("Go on.", "Tell me more.", "And then?")


def sentences(paragraph, limit):
    """The first sentences of a paragraph, its lines joined, up to limit characters (at least one), of
    which the last does not end in a colon (it introduces an example left out)."""
    out = []
    for sentence in re.split(r"(?<=[.!?:])\s+(?=[A-Z\"*])", " ".join(paragraph.split())):
        if out and len(" ".join(out)) + 1 + len(sentence) > limit:
            break
        out.append(sentence)
    if out[-1].endswith(":"):
        out = out[:-1] if len(out) > 1 else [out[0][:-1] + "."]
    return " ".join(out)


def prose(block):
    """The paragraphs of a block of documentation that are prose, not code, grammar or lists."""
    return [p for p in block.split("\n\n") if not p.startswith((" ", "*", "-")) and len(p) > 40
            and re.search(r"[.:]$", p.strip()) and not re.search(r"::=|>>>", p)]


def pydoc_chats(limit=240):
    """Conversations made from the Python documentation's topics that ship with the standard library:
    a question on each topic, section and documented method, answered with the first sentences of its
    text, and, where its text goes on, a follow-up answered with the next; some with a system prompt."""
    from pydoc_data.topics import topics

    items = []  # (subject, paragraphs)
    for key in sorted(topics):
        text = topics[key]
        for title, body in re.findall(r"(?m)^([^\n]+)\n[*=-]{3,}\n(.*?)(?=^[^\n]+\n[*=-]{3,}\n|\Z)", text, re.S):
            items.append((title.strip(), prose(body)))
        for name, body in re.findall(r"(?m)^([a-z_]+\.[A-Za-z_]+)\(.*\)\n\n((?:   .*\n|\n)+)", text):
            items.append((f"{name}()", prose(re.sub(r"(?m)^   ", "", body))))
    chats, asked = [], set()
    for i, (subject, paragraphs) in enumerate(items):
        # Title Case to a phrase, but for names; a section that several topics hold is asked about once.
        subject = re.sub(r"\b(?!(Python|None|NotImplemented|Ellipsis)\b)[A-Z][a-z]+\b", lambda m: m.group().lower(),
                         subject)
        if not paragraphs or subject in asked:
            continue
        asked.add(subject)
        messages = [{"role": "system", "content": SYSTEM}] if i % 4 == 3 else []
        messages += [{"role": "user", "content": ASK[i % len(ASK)].format(subject)},
                     {"role": "assistant", "content": sentences(paragraphs[0], limit)}]
        if i % 3 == 0 and len(paragraphs) > 1:
            messages += [{"role": "user", "content": GO_ON[i % len(GO_ON)]},
                         {"role": "assistant", "content": sentences(paragraphs[1], limit)}]
        chats.append({"messages": messages})
    return chats


def write_chats(path):
    """The built-in conversations as jsonl (train.py --examples), to fine-tune on with --data."""
    chats = pydoc_chats()
    corpus.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(c) + "\n" for c in chats)))
    return f"{len(chats)} conversations in {path}"
