"""
Preference pairs to tune a chat model on, by Direct Preference Optimization (Rafailov et al. 2023,
arXiv:2305.18290): given a prompt and two answers, one chosen and one rejected, the model learns to
prefer the first, with no reward model and no sampling. data.py's causal-LM pipeline for a --data of
pairs, after fine-tuning on conversations (conversations.py).

    python train.py --examples                       # examples/pydoc_prefs.jsonl: the docs' answer against another's
    python train.py --init out/gpt_llama-pydoc_chats --data examples/pydoc_prefs.jsonl
    python sample.py out/gpt_llama-pydoc_prefs --chat

Records, in a .jsonl file, a folder of them, parquet or a save_to_disk folder, in TRL's three preference
formats, told apart by the first record's fields (is_preferences: "chosen" and "rejected"):
    standard            {"prompt": "...", "chosen": "...", "rejected": "..."}: a user message and two answers
    conversational      {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    implicit prompt     {"chosen": [messages], "rejected": [messages]}: two whole conversations, whose
                        shared beginning is the prompt (as TRL's extract_prompt finds it)
The --init folder's chat format renders each prompt and answer, as SFT and sample.py --chat render them
(chat.ChatFormat); only the answer's tokens and the token that ends its turn are scored. A pair whose
answers are the same teaches nothing and is skipped; one whose prompt and longer answer run past
max_seq_len + 1 tokens is dropped; the log counts both. Pairs are held out by a hash of their content, as
conversations are, or taken from --validation-file.

The loss of a pair, where log pi(y|x) sums the log-probabilities of the answer's scored tokens:
    -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))
with beta from --beta (TRL's default, 0.1), averaged over the pairs of a batch. The reference is the
--init model. Full fine-tuning changes its weights, so its log-probabilities of every pair are computed
once, before the first step (prepare), and kept with the pair's tokens, as TRL's precompute_ref_log_probs
keeps them: memory holds one model. With --lora the frozen weights are the --init model's, so the
reference is the same model with its adapters switched off (lora.disabled), computed at each step with
no second copy of the weights. Both are the same function of the pair, the --init model's
log-probabilities without dropout, so both give the same loss, to rounding. As TRL's disable_dropout
does by default, the policy too runs without dropout (eval mode): otherwise its log-probabilities would
differ from the reference's by noise before the first step.

Metrics under TRL's names, on the progress line, in metrics.jsonl and on loss.png: rewards/chosen and
rewards/rejected (beta times the log-ratio of policy to reference, averaged over pairs),
rewards/accuracies (the share of pairs whose chosen reward is the higher), rewards/margins (chosen less
rejected reward), logps/chosen and logps/rejected; each evaluation gives them on the held-out pairs, and
the greedy answers to a few held-out prompts beside their chosen and rejected answers.

Batches, of B pairs: {"idx": (2B, T), "targets": (2B, T)}, the B chosen rows then the B rejected ones,
each the prompt and its answer, padded at the end (padding needs no mask in a causal model: no token
sees the ones after it); targets the next token where it is scored, else -100; and with the reference
precomputed, "ref": (2B,) its log-probabilities of the rows. Every batch holds B pairs and its loss is
their mean, so train.py's plain average over micro-batches and processes is the loss of one big batch.
"""

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llm_machinery import chat, conversations, corpus, lora, runs
from llm_machinery.conversations import shorten
from llm_machinery.corpus import UserError

DEFAULT_BETA = 0.1  # TRL's DPOConfig.beta

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


# ------------------------------------------------------------------------------------------ the loss


def sequence_logps(model, idx, targets):
    """(rows,) the summed log-probabilities of each row's scored tokens: targets other than -100."""
    logits, _ = model(idx)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")  # 0 where -100
    return -nll.view(targets.shape).sum(1)


def dpo_loss(logps, ref_logps, beta):
    """The mean DPO loss of a batch and TRL's metrics of it; logps and ref_logps (2B,) are the chosen
    rows' then the rejected rows' log-probabilities under the policy and the reference."""
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    margins = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(margins).mean()
    metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
               "rewards/accuracies": (margins > 0).float().mean(), "rewards/margins": margins.mean(),
               "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean()}
    return loss, {k: v.detach() for k, v in metrics.items()}


def unwrapped(model):
    """The model inside DDP's and torch.compile's wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


@contextlib.contextmanager
def eval_mode(model):
    """Within it, model runs without dropout (eval mode); its mode is restored after."""
    model = unwrapped(model)
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def reference_logps(model, idx, targets):
    """The reference's log-probabilities of the rows: the model with its adapters switched off, no dropout."""
    raw = unwrapped(model)
    with lora.disabled(raw), eval_mode(raw):
        return sequence_logps(raw, idx, targets)


def batch_loss(model, batch, beta):
    """(the mean DPO loss of a batch's pairs, TRL's metrics of them), the reference's log-probabilities
    taken from the batch ("ref") or computed with the model's adapters off."""
    ref = batch.get("ref")
    if ref is None:
        ref = reference_logps(model, batch["idx"], batch["targets"])
    with eval_mode(model):
        logps = sequence_logps(model, batch["idx"], batch["targets"])
    return dpo_loss(logps, ref, beta)


# ------------------------------------------------------------------------------------------ the data


def is_preferences(source, text_field="text"):
    """Whether --data holds preference pairs: records of which the first has "chosen" or "rejected"
    (pair_of then says which one it lacks), and no text_field."""
    return bool({"chosen", "rejected"} & conversations.first_record(source, text_field).keys())


def as_messages(value, role, where, field):
    """A field of a record as messages: text is one message of role, a list is messages already."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise UserError(f"the '{field}' of {where} is neither text nor a list of messages")


def pair_of(record, where):
    """(prompt, chosen, rejected) messages of a record in any of the three formats, checked; the answers
    are each one or more messages ending in the assistant's."""
    for field in ("chosen", "rejected"):
        if field not in record:
            raise UserError(f"{where} has no '{field}', which every preference pair needs")
    if "prompt" in record:
        prompt = as_messages(record["prompt"], "user", where, "prompt")
        chosen, rejected = (as_messages(record[f], "assistant", where, f) for f in ("chosen", "rejected"))
    else:
        if not (isinstance(record["chosen"], list) and isinstance(record["rejected"], list)):
            raise UserError(f"{where} has no 'prompt', so its 'chosen' and 'rejected' must be whole conversations "
                            "(lists of messages) that share their beginning")
        shared = 0
        while (shared < min(len(record["chosen"]), len(record["rejected"]))
               and record["chosen"][shared] == record["rejected"][shared]):
            shared += 1
        prompt, chosen, rejected = record["chosen"][:shared], record["chosen"][shared:], record["rejected"][shared:]
    for field, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or not isinstance(answer[-1], dict) or answer[-1].get("role") != "assistant":
            raise UserError(f"the '{field}' answer of {where} does not end in an assistant message")
    checked = conversations.messages_of({"messages": prompt + chosen}, where)
    prompt_checked = checked[: len(prompt)]
    rejected_checked = conversations.messages_of({"messages": prompt + rejected}, where)[len(prompt):]
    return prompt_checked, checked[len(prompt):], rejected_checked


def answer_tokens(chat_format, prompt, answer):
    """(ids, scored) of the prompt and an answer, rendered whole, with only the answer's tokens (the
    assistant's, and the tokens ending their turns) scored, and cut after its last scored token: what
    follows is never scored, and no earlier token sees it."""
    asked = chat_format.prompt(prompt)
    ids, scored = chat_format.tokens(prompt + answer)
    if ids[: len(asked)] != asked:
        raise UserError(f"{chat_format.name} writes a prompt one way alone and another way before its answer, so the "
                        "answer's tokens cannot be told apart")
    scored = [False] * len(asked) + scored[len(asked):]
    end = max(i for i, s in enumerate(scored) if s) + 1
    return ids[:end], scored[:end]


def batch(examples):
    """{"idx", "targets"} of pairs ((chosen ids, scored), (rejected ids, scored), ref), the chosen rows
    first, and "ref" (2B,) when the pairs carry the reference's log-probabilities."""
    rows = [e[0] for e in examples] + [e[1] for e in examples]
    b = conversations.batch(rows)
    b.pop("loss_weight")
    if examples[0][2] is not None:
        b["ref"] = torch.tensor([e[2][0] for e in examples] + [e[2][1] for e in examples], dtype=torch.float32)
    return b


class Preferences:
    """Preference pairs for a causal LM, tuned by DPO: data.py's docstring lists the methods, and the two
    that only this pipeline offers, prepare and loss."""

    def __init__(self, source, tokenizer, folder, beta=DEFAULT_BETA, val_fraction=0.1, validation_source=None):
        """tokenizer: (tokenizer, key, files) of the --init folder, whose chat format renders the pairs. The
        pairs of validation_source are held out; without it, each pair of source is, with probability
        val_fraction, by a hash of its content, as conversations are (corpus.is_held_out)."""
        found, same = self.read(corpus.records(source))
        if not found:
            raise UserError(f"--data {source} holds no preference pair whose answers differ"
                            + (f" (all {same} have the same chosen and rejected answer)" if same else ""))
        self.validation_source = validation_source
        if validation_source is None:
            self.held = [corpus.is_held_out(pair, val_fraction) for _, pair in found]
        else:
            held_out, skipped = self.read(corpus.held_out_records(validation_source))
            if not held_out:
                raise UserError(f"--validation-file {validation_source} holds no preference pair whose answers differ")
            self.held = [False] * len(found) + [True] * len(held_out)
            found, same = found + held_out, same + skipped
        if not any(self.held) or all(self.held):
            raise UserError(f"the {len(found)} pairs of --data {source} whose answers differ are too few to hold out "
                            f"{val_fraction:.0%} for validation (chosen by a hash of each one's content) and train on the "
                            "rest; pass more, or pairs to validate on with --validation-file")
        self.pairs, self.same, self.beta = [pair for _, pair in found], same, beta
        self.tokenizer, key, self.tokenizer_files = tokenizer
        self.format = chat.chat_format(folder, self.tokenizer)
        self.fingerprint = {"pairs_sha256": corpus.sha256(json.dumps([self.pairs, self.held], sort_keys=True)), "tokenizer": key,
                            "chat_format": corpus.sha256(f"{self.format.source}{sorted(self.format.end_ids)}")[:16],
                            "beta": beta}
        key = corpus.sha256(json.dumps(self.fingerprint, sort_keys=True))[:32]
        # Row 2i is pair i's chosen answer after its prompt, row 2i + 1 its rejected one.
        ids, scored, starts = conversations.tokenize(
            found, lambda pair: [answer_tokens(self.format, pair[0], answer) for answer in pair[1:]], key, "preferences")
        rows = [(ids[a:b], scored[a:b]) for a, b in zip(starts[:-1], starts[1:])]
        self.examples = list(zip(rows[0::2], rows[1::2]))
        self.ref = None  # the reference's (chosen, rejected) log-probabilities of every pair, once prepared
        self.fitted = None

    @staticmethod
    def read(records):
        """The (where, (prompt, chosen, rejected)) pairs of records whose answers differ, and how many do not."""
        found, same = [], 0
        for where, record in records:
            prompt, chosen, rejected = pair_of(record, where)
            if chosen == rejected:
                same += 1
            else:
                found.append((where, (prompt, chosen, rejected)))
        return found, same

    @classmethod
    def from_options(cls, options, module, tokenizer=None):
        if getattr(options, "init", None) is None or tokenizer is None:
            raise UserError("preference pairs tune a model that already answers: give --init DIR, such as a folder "
                            "fine-tuned on conversations (out/gpt_llama-pydoc_chats)")
        beta = DEFAULT_BETA if getattr(options, "beta", None) is None else options.beta
        return cls(options.data, tokenizer, Path(options.init), beta,
                   validation_source=getattr(options, "validation_file", None))

    def fit(self, context):
        """(training pairs, validation (pair, messages) couples), each pair ((chosen ids, scored),
        (rejected ids, scored), reference log-probabilities or None), of the pairs whose rows fit in
        context + 1 tokens; and the number dropped."""
        if self.fitted is None or self.fitted[0] != context:
            train, val, dropped = [], [], 0
            for i, (example, messages, held) in enumerate(zip(self.examples, self.pairs, self.held)):
                if max(len(example[0][0]), len(example[1][0])) > context + 1:
                    dropped += 1
                    continue
                pair = (*example, None if self.ref is None else self.ref[i])
                (val if held else train).append((pair, messages) if held else pair)
            self.fitted = (context, train, val, dropped)
        return self.fitted[1:]

    def describe(self):
        _, train, val, _ = self.fitted
        tokens = sum(len(c[0]) + len(r[0]) for c, r, _ in train)
        reference = "adapters off" if self.ref is None else "computed before the first step"
        return (f"{len(train):,} training and {len(val):,} validation preference pairs ({tokens:,} training tokens) "
                f"in {self.format.name}, DPO with beta {self.beta:g} (reference: {reference}), "
                f"vocabulary {self.tokenizer.n_vocab}")

    def model_config(self):
        return {"vocab_size": self.tokenizer.n_vocab}

    def check(self, config):
        """UserError unless both splits keep a pair; the notes on the log, once."""
        context = config.max_seq_len
        train, val, dropped = self.fit(context)
        if not dist.is_initialized() or dist.get_rank() == 0:
            if self.format.note:
                print(f"note: {self.format.note}", file=sys.stderr)
            if self.same:
                print(f"note: {self.same:,} of {len(self.pairs) + self.same:,} pairs are skipped: their chosen and "
                      "rejected answers are the same", file=sys.stderr)
            if dropped:
                print(f"note: {dropped:,} of {len(self.pairs):,} pairs are dropped: their prompt and longer answer run "
                      f"past the {context}-token context", file=sys.stderr)
        for split, kept in (("training", train), ("validation", val)):
            if not kept:
                raise UserError(f"no {split} pair fits the {context}-token context with both its answers; raise it "
                                "(--set max_seq_len=...)")

    def prepare(self, model, device, batch_size, autocast):
        """Before the first step, with the model as --init gives it: without adapters, the reference's
        log-probabilities of every pair that fits, computed once and kept with its tokens."""
        if lora.adapters(model):
            return
        context = model.config.max_seq_len
        ref = [None] * len(self.examples)
        fits = [i for i, (c, r) in enumerate(self.examples) if max(len(c[0]), len(r[0])) <= context + 1]
        for start in range(0, len(fits), batch_size):
            picked = fits[start : start + batch_size]
            b = batch([(*self.examples[i], None) for i in picked])
            with autocast():
                logps = reference_logps(model, b["idx"].to(device), b["targets"].to(device)).double().cpu()
            for j, i in enumerate(picked):
                ref[i] = (logps[j].item(), logps[len(picked) + j].item())
        self.ref, self.fitted = ref, None

    def loss(self, model, batch):
        """What train.py calls instead of model(**batch): batch_loss with this pipeline's beta."""
        return batch_loss(model, batch, self.beta)

    def unit(self, config):
        train = self.fit(config.max_seq_len)[0]
        return "tokens", round(sum(len(c[0]) + len(r[0]) - 2 for c, r, _ in train) / len(train))

    def stream(self, config, batch_size, **kwargs):
        return PairStream(self.fit(config.max_seq_len)[0], batch_size, **kwargs)

    def eval_rows(self, config, max_tokens=None):
        """The held-out pairs one evaluation reads: all, or the first that hold max_tokens tokens."""
        rows, tokens = [], 0
        for pair, _ in self.fit(config.max_seq_len)[1]:
            if max_tokens and tokens >= max_tokens:
                break
            rows.append(pair)
            tokens += len(pair[0][0]) + len(pair[1][0]) - 2
        return rows

    def eval_examples(self, config, max_tokens=None):
        return len(self.eval_rows(config, max_tokens))

    @torch.no_grad()
    def evaluate(self, model, config, batch_size, device, autocast, max_tokens=None):
        """val_loss and TRL's metrics on the held-out pairs, each a mean over pairs; under DDP each rank
        takes every world_size-th batch and the sums are all-reduced. "answers": greedy answers to the
        first held-out prompts beside their chosen and rejected answers, on the first rank."""
        rows = self.eval_rows(config, max_tokens)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        sums = torch.zeros(2 + len(METRICS), dtype=torch.float64)  # loss, metrics, pairs (each a sum over pairs)
        was_training = model.training
        model.eval()
        for start in range(rank * batch_size, len(rows), world * batch_size):
            picked = rows[start : start + batch_size]
            b = {k: v.to(device) for k, v in batch(picked).items()}
            with autocast():
                loss, metrics = self.loss(model, b)
            sums += torch.tensor([loss.item(), *(metrics[k].item() for k in METRICS), 1.0], dtype=torch.float64) * len(picked)
        if dist.is_initialized():
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        means = (sums[:-1] / sums[-1]).tolist()
        result = {"val_loss": means[0], **{f"val_{k}": v for k, v in zip(METRICS, means[1:])}}
        if rank == 0:
            with autocast():
                result["answers"] = "\n".join(self.answers(model, config, device, range(conversations.N_ANSWERS)))
        model.train(was_training)
        return result

    @torch.no_grad()
    def answers(self, model, config, device, picks, max_new_tokens=None):
        """'prompt' -> 'greedy answer' (chosen '...', rejected '...') of the picked held-out pairs; an answer
        ends at an end-of-turn token, the room left in the context, max_new_tokens, or 16 tokens past the
        chosen answer's length."""
        val = self.fit(config.max_seq_len)[1]
        lines = []
        for i in picks:
            if i >= len(val):
                break
            prompt, chosen, rejected = val[i][1]
            ids = self.format.prompt(prompt)
            n = min(config.max_seq_len - len(ids),
                    max_new_tokens or len(self.tokenizer.encode_ordinary(chosen[-1]["content"])) + 16)
            if n < 1:
                continue
            new = conversations.greedy_answer(model, self.format, ids, n, device)
            question = prompt[-1]["content"] if prompt else ""
            lines.append(f"  {shorten(question)!r} -> {shorten(self.tokenizer.decode(new))!r} "
                         f"(chosen {shorten(chosen[-1]['content'])!r}, rejected {shorten(rejected[-1]['content'])!r})")
        return lines

    def demo(self, model, device, max_new_tokens=200, seed=0):
        """A few held-out prompts, picked by seed, answered greedily beside their chosen and rejected answers."""
        return conversations.demo(self, model, device, max_new_tokens, seed)

    def save(self, out_dir):
        runs.save_tokenizer(out_dir, self.tokenizer, self.tokenizer_files)


class PairStream(conversations.ConversationStream):
    """Endless batches of pairs, in an order that depends only on (seed, step): the conversations' stream,
    which shares a step among ranks and micro-batches and puts pairs of similar lengths together."""

    def length(self, example):
        return max(len(example[0][0]), len(example[1][0]))

    def collate(self, examples):
        return batch(examples)


# ------------------------------------------------------------------------------ the built-in example


def pydoc_prefs():
    """Pairs made from the built-in conversations (conversations.pydoc_chats): each first question, with
    its system prompt if any; chosen, the documentation's answer, its first sentences; rejected, the
    follow-up answer of the next entry that has one, in the same voice and as plausible, but about a
    neighbouring subject and from the middle of its text. A follow-up is never a chosen answer: had the
    rejected answers been other entries' first ones, each held-out pair's chosen answer would be
    rejected in a training pair, and the held-out pairs would measure how well that was learnt."""
    chats = [[m for m in c["messages"] if m["role"] != "system"] for c in conversations.pydoc_chats()]
    firsts = [c["messages"] for c in conversations.pydoc_chats()]
    follow_ups = [i for i, c in enumerate(chats) if len(c) > 2]
    pairs = []
    for i, messages in enumerate(firsts):
        k = next(j for j, m in enumerate(messages) if m["role"] == "assistant")
        j = next((j for j in follow_ups if j > i), follow_ups[0])
        pairs.append({"prompt": messages[:k], "chosen": [messages[k]], "rejected": [chats[j][3]]})
    return pairs


def write_prefs(path):
    """The built-in preference pairs as jsonl (train.py --examples), to tune on with --data."""
    pairs = pydoc_prefs()
    corpus.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(p) + "\n" for p in pairs)))
    return f"{len(pairs)} preference pairs in {path}"
