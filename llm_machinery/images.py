"""
Image data for train.py and sample.py: the image-text pipeline (ImageText) that feeds a contrastive
model such as siglip.py, the prefix-LM pipeline (PrefixLM) that feeds a vision-language model such as
paligemma.py, and the pictures they read: shapes drawn here with pillow (Shapes, ShapeQuestions), or an
image folder in Hugging Face's imagefolder layout (ImageFolder, PrefixFolder). data.py's docstring
says what a pipeline offers; the model file's preprocess(image, image_size) makes the pixels, and each
pipeline trains a byte-level BPE tokenizer (bpe.py) on its data's texts.

Batches, with S the image size and B the batch:
    image_text  {"pixel_values": (B, 3, S, S), "input_ids": (B, max_seq_len)}: each caption's tokens, then
                PAD to the end (caption_ids), and "gather": True when several processes train, so
                that each image meets the captions of all of them, as in SigLIP (Zhai et al. 2023,
                arXiv:2303.15343). Evaluation: the sigmoid loss on held-out pairs, and zero-shot
                accuracy as in CLIP (Radford et al. 2021, arXiv:2103.00020)
    prefix_lm   {"pixel_values": (B, 3, S, S), "input_ids": (B, T), "prefix_len": (B,), "targets": (B, T),
                "loss_weight": ()}: [BOS, prefix, "\\n"][suffix, EOS][PAD ...] in T = max_seq_len less the
                image tokens (text_length), prefix_len the length of the first bracket (prefix_ids),
                targets -100 but where the suffix and its EOS are predicted, loss_weight their number;
                PaliGemma's layout (Beyer et al. 2024, arXiv:2407.07726)

The shapes are pictures of one coloured shape on a noisy background; training never shows three of
the colour-shape combinations, so how a model does on those says whether it composes colour and shape.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from llm_machinery import corpus
from llm_machinery.corpus import UserError


# ------------------------------------------------------------------------------------------ texts


PAD = "<|pad|>"  # fills every caption to the model's fixed text length
BOS, EOS = "<|bos|>", "<|eos|>"  # around every text of a prefix-LM example; PAD fills the rest


def caption_ids(tokenizer, texts, length):
    """(N, length) ids: each caption's tokens, cut to length - 1, then PAD to the end.

    A SigLIP-style text tower pools whatever sits at the last position, so every caption must end
    there in the same token: at least one PAD, always.
    """
    pad = tokenizer.special_tokens[PAD]
    ids = np.full((len(texts), length), pad, dtype=np.int64)
    for row, text in zip(ids, texts):
        tokens = tokenizer.encode_ordinary(text)[: length - 1]
        row[: len(tokens)] = tokens
    return torch.from_numpy(ids)


def prefix_ids(tokenizer, prefix, length=None):
    """[bos] + prefix + "\n" with the tokenizer's special bos, the prefix cut (never bos or "\n") to leave
    one place of length for the suffix. sample.py asks a trained model the same way."""
    newline = tokenizer.encode_ordinary("\n")
    body = tokenizer.encode_ordinary(prefix)
    if length is not None:
        body = body[: max(0, length - 2 - len(newline))]
    return [tokenizer.special_tokens[BOS]] + body + newline


def text_length(config):
    """Text positions of a prefix-LM example: the context less the image tokens in front of the text."""
    return config.max_seq_len - config.n_image_tokens


# -------------------------------------------------------------------------------------- pipelines


class ImagePipeline:
    """What the image pipelines share: pictures and texts from self.data, the texts tokenized by
    self.tokenizer, which they train, and batches streamed by PairStream."""

    @classmethod
    def from_options(cls, options, module, tokenizer=None):
        """The pipeline of --data (None: the shapes) and --vocab-size, its pixels made by the model
        file's preprocess."""
        if tokenizer is not None:
            raise UserError(f"the {module.TASK} pipeline trains its own tokenizer on its texts; it takes none from --init")
        return cls(options.data, options.vocab_size, preprocess=getattr(module, "preprocess", None))

    def describe(self):
        return f"{self.data.describe()}, vocabulary {self.tokenizer.n_vocab}"

    def model_config(self):
        return {"vocab_size": self.tokenizer.n_vocab}

    def stream(self, config, batch_size, **kwargs):
        return PairStream(self, config, batch_size, **kwargs)

    def save(self, out_dir):
        self.tokenizer.save(out_dir)


class PairStream(IterableDataset):
    """Endless batches pipe.batch(examples, seed, config), in an order that depends only on (seed, step),
    each with the entries of extra besides.

    The slicing of a step among ranks and micro-batches is data.WindowStream's. Example g is the g-th
    picture made for a seed (shapes, which never repeat) or, for a folder of N images, the g % N-th of
    epoch g // N's shuffle.
    """

    def __init__(self, pipe, config, batch_size, seed=0, start_step=0, rank=0, world_size=1, grad_accum=1, extra=None):
        super().__init__()
        self.pipe, self.config, self.batch_size, self.seed = pipe, config, batch_size, seed
        self.start_step, self.rank, self.world_size, self.grad_accum = start_step, rank, world_size, grad_accum
        self.extra = extra or {}

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        item = self.start_step * self.grad_accum + worker
        per_step = self.world_size * self.grad_accum * self.batch_size
        while True:
            step, micro = divmod(item, self.grad_accum)
            first = step * per_step + (micro * self.world_size + self.rank) * self.batch_size
            yield {**self.pipe.batch(range(first, first + self.batch_size), self.seed, self.config), **self.extra}
            item += n_workers


class ImageText(ImagePipeline):
    """Image-caption pairs for a contrastive model: the sigmoid loss on held-out pairs, and zero-shot
    accuracy, the share of held-out images whose own caption ranks first among the candidates."""

    def __init__(self, source=None, vocab_size=512, preprocess=None, val_fraction=0.1):
        if preprocess is None:
            raise UserError("an image-text model file must define preprocess(image, image_size) for images.py to call")
        self.data = Shapes() if source is None else ImageFolder(source, val_fraction)
        self.preprocess = preprocess
        self.tokenizer, key = corpus.train_tokenizer(self.data.caption_corpus(), vocab_size, special_tokens=(PAD,))
        self.fingerprint = {"images": "shapes" if source is None else folder_fingerprint(self.data), "tokenizer": key}
        self.val = None

    def check(self, config):
        if config.max_seq_len < 2:
            raise UserError("captions need max_seq_len of at least 2: one token and the padding the model pools")
        self.validation(config)  # reads (and checks) every image now, before anything is written
        self.data.train_batch([0], 0, self.preprocess, config.image_size)

    def unit(self, config):
        return "pairs", 1

    def validation(self, config):
        """(pixel_values, input_ids, candidates, answers, held_out, label_ids) of the validation split:
        image i is to pick label candidates[i, answers[i]] among the labels candidates[i]; held_out
        marks the shapes of combinations never trained on (None for a folder)."""
        if self.val is None or self.val[0].shape[-1] != config.image_size:
            pixels, captions, candidates, answers, held_out = self.data.validation_set(self.preprocess, config.image_size)
            # A fixed shuffle, so that a validation batch mixes captions as a training batch does (a
            # folder sorted by class, or the shapes in their order, would fill a batch with one).
            order = torch.from_numpy(np.random.default_rng(0).permutation(len(answers)))
            self.val = (pixels[order], caption_ids(self.tokenizer, captions, config.max_seq_len)[order],
                        torch.tensor(candidates)[order], torch.tensor(answers)[order],
                        None if held_out is None else torch.tensor(held_out)[order],
                        caption_ids(self.tokenizer, self.data.labels, config.max_seq_len))
        return self.val

    def stream(self, config, batch_size, **kwargs):
        # Several processes: each image meets the captions of all of them, as in one batch of them all.
        extra = {"gather": True} if kwargs.get("world_size", 1) > 1 else {}
        return PairStream(self, config, batch_size, extra=extra, **kwargs)

    def batch(self, examples, seed, config):
        pixels, captions = self.data.train_batch(examples, seed, self.preprocess, config.image_size)
        return {"pixel_values": pixels, "input_ids": caption_ids(self.tokenizer, captions, config.max_seq_len)}

    def eval_examples(self, config, max_tokens=None):
        return len(self.data.val)

    @torch.no_grad()
    def evaluate(self, model, config, batch_size, device, autocast, max_tokens=None):
        """val_loss: the model's loss over batches of the validation pairs, as large as training's
        global batch (under DDP each rank holds its slice and the model gathers the captions, as in
        training). val_accuracy: zero-shot, each image against every candidate caption."""
        pixels, ids, candidates, answers, held_out, label_ids = self.validation(config)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        gather = {"gather": True} if world > 1 else {}
        was_training = model.training
        model.eval()
        per_rank = max(1, min(batch_size, len(ids) // world))
        n_batches = len(ids) // (per_rank * world)
        # the sum of the batch losses, then right answers and images, overall and on held-out combinations
        sums = torch.zeros(5, dtype=torch.float64)
        for i in range(n_batches):
            mine = slice((i * world + rank) * per_rank, (i * world + rank + 1) * per_rank)
            with autocast():
                _, loss = model(pixels[mine].to(device), ids[mine].to(device), **gather)
            # Each rank's loss is world_size times its share of the batch's loss (see siglip.py).
            sums[0] += loss.float().item() / world
        for i in range(rank * batch_size, len(ids), world * batch_size):
            mine = slice(i, i + batch_size)
            with autocast():
                probs = model.classify(pixels[mine].to(device), label_ids.to(device)).float().cpu()
            # The most probable of each image's own candidates (a softmax over all labels keeps their order).
            correct = (probs.gather(1, candidates[mine]).argmax(-1) == answers[mine]).double()
            sums[1:3] += torch.tensor([correct.sum(), len(correct)])
            if held_out is not None:
                sums[3:5] += torch.tensor([correct[held_out[mine]].sum(), held_out[mine].sum()])
        model.train(was_training)
        if dist.is_initialized():
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        result = {"val_loss": sums[0].item() / n_batches, "val_accuracy": (sums[1] / sums[2]).item()}
        if held_out is not None:
            result["val_accuracy_seen"] = ((sums[1] - sums[3]) / (sums[2] - sums[4])).item()
            result["val_accuracy_held_out"] = (sums[3] / sums[4]).item()
        return result

    @torch.no_grad()
    def demo(self, model, device, max_new_tokens=6, seed=0, **kwargs):
        """A few validation images: the true caption, and the three candidates the model ranks first."""
        config = model.config
        pixels, _, candidates, answers, held_out, label_ids = self.validation(config)
        picks = np.random.default_rng(seed).permutation(len(answers))[: max(1, min(6, max_new_tokens))]
        if held_out is not None:  # show held-out combinations first: they are the interesting ones
            picks = sorted(picks, key=lambda i: not held_out[i])
        was_training = model.training
        model.eval()
        probs = model.classify(pixels[picks].to(device), label_ids.to(device)).float().cpu()
        model.train(was_training)
        lines = []
        for i, row in zip(picks, probs):
            mine = candidates[i]
            row = row[mine] / row[mine].sum()  # a distribution over this image's candidates
            best = row.argsort(descending=True)[:3]
            tag = " (combination never trained on)" if held_out is not None and held_out[i] else ""
            lines.append(f"{self.data.labels[mine[answers[i]]]}{tag} -> "
                         + ", ".join(f"{self.data.labels[mine[j]]} {row[j]:.2f}" for j in best))
        return "\n".join(lines)


class PrefixLM(ImagePipeline):
    """Image, prefix and suffix for a PaliGemma-style model: the text of an example is
    [bos, prefix, "\\n"][suffix, eos][pad ...], cut to the text length, and only suffix and eos are
    scored. val_loss is the mean suffix cross-entropy; val_accuracy the share of validation examples
    whose greedy answer, decoded up to eos, equals the suffix (both stripped)."""

    def __init__(self, source=None, vocab_size=512, preprocess=None, val_fraction=0.1):
        if preprocess is None:
            raise UserError("a prefix-LM model file must define preprocess(image, image_size) for images.py to call")
        self.data = ShapeQuestions() if source is None else PrefixFolder(source, val_fraction)
        self.preprocess = preprocess
        self.tokenizer, key = corpus.train_tokenizer(self.data.corpus(), vocab_size, special_tokens=(BOS, EOS, PAD))
        self.bos, self.eos, self.pad = (self.tokenizer.special_tokens[t] for t in (BOS, EOS, PAD))
        self.fingerprint = {"images": "shapes-qa" if source is None else folder_fingerprint(self.data), "tokenizer": key}
        self.val = None

    # -------------------------------------------------------------------------------- text

    def prompt_ids(self, prefix, length=None):
        return prefix_ids(self.tokenizer, prefix, length)

    def encode(self, pairs, length):
        """(input_ids (N, length), prefix_len (N,), targets (N, length)) of (prefix, suffix) pairs.

        Position t predicts token t + 1 where that token is the suffix or its eos, else -100: the last
        prefix place ("\\n") predicts the first suffix token, as paligemma.suffix_targets has it. A
        suffix too long for the row is cut, and then has no eos. Every prefix_len lies in [1, length - 1],
        which the model's forward takes on trust: prefix_ids keeps bos and cuts the prefix to leave the
        suffix a place, and check(config) refuses a text length without room for the data's longest
        prompt and one suffix token.
        """
        ids = np.full((len(pairs), length), self.pad, dtype=np.int64)
        targets = np.full((len(pairs), length), -100, dtype=np.int64)
        prefix_len = np.zeros(len(pairs), dtype=np.int64)
        for row, (prefix, suffix) in enumerate(pairs):
            p = self.prompt_ids(prefix, length)
            s = (self.tokenizer.encode_ordinary(suffix) + [self.eos])[: length - len(p)]
            ids[row, : len(p) + len(s)] = p + s
            targets[row, len(p) - 1 : len(p) + len(s) - 1] = s
            prefix_len[row] = len(p)
        return torch.from_numpy(ids), torch.from_numpy(prefix_len), torch.from_numpy(targets)

    def decode_answer(self, ids):
        """Text of generated ids up to the first eos, special tokens dropped."""
        ids = list(ids)
        if self.eos in ids:
            ids = ids[: ids.index(self.eos)]
        return self.tokenizer.decode([i for i in ids if i not in (self.bos, self.pad)])

    # ---------------------------------------------------------------------------- protocol

    def check(self, config):
        length = text_length(config)
        self.validation(config)  # reads (and checks) every image now, before anything is written
        self.data.train_batch([0], 0, self.preprocess, config.image_size)
        longest = max(self.data.prompts(), key=lambda p: len(self.prompt_ids(p)))
        need = len(self.prompt_ids(longest)) + 1
        if need > length:
            raise UserError(f"the prompt {longest!r} needs {need} text tokens with bos, \"\\n\" and one answer token, "
                            f"but max_seq_len {config.max_seq_len} leaves {length} after the image tokens; "
                            f"raise it (--set max_seq_len={config.max_seq_len - length + need})")

    def unit(self, config):
        return "examples", 1

    def validation(self, config):
        """(pixels (M, 3, S, S), examples) of the validation split, made once per image size."""
        if self.val is None or self.val[0].shape[-1] != config.image_size:
            self.val = self.data.validation_set(self.preprocess, config.image_size)
            # Tokens a greedy answer may need: the longest validation answer and its eos.
            self.answer_tokens = max(len(self.tokenizer.encode_ordinary(e[2])) + 1 for e in self.val[1])
        return self.val

    def batch(self, examples, seed, config):
        pixels, pairs = self.data.train_batch(examples, seed, self.preprocess, config.image_size)
        ids, prefix_len, targets = self.encode(pairs, text_length(config))
        return {"pixel_values": pixels, "input_ids": ids, "prefix_len": prefix_len, "targets": targets,
                "loss_weight": (targets != -100).sum()}

    def eval_examples(self, config, max_tokens=None):
        return len(self.validation(config)[1])

    def answer(self, model, pixels, prefixes, config, device, max_new_tokens=None):
        """Greedy answers (text up to eos) of the model to the prompts, one per picture."""
        prompts = [self.prompt_ids(p, text_length(config)) for p in prefixes]
        width = max(len(p) for p in prompts)
        room = text_length(config) - width
        n_new = max(1, min(room, max_new_tokens or room))
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=device)
        prefix_len = torch.tensor([len(p) for p in prompts], device=device)
        out = model.generate(pixels.to(device), ids, n_new, temperature=0, eos_id=self.eos, prefix_len=prefix_len)
        return [self.decode_answer(row) for row in out[:, width:].tolist()]

    @torch.no_grad()
    def evaluate(self, model, config, batch_size, device, autocast, max_tokens=None):
        """val_loss: suffix cross-entropy summed over every validation example, divided by the scored
        tokens; val_accuracy: exact matches of greedy answers, and for shapes per question
        (val_accuracy_<question>) and on the held-out combinations. Under DDP each rank takes every
        world_size-th batch and the sums are all-reduced, so the numbers are those of one process."""
        pixels, examples = self.validation(config)
        length = text_length(config)
        kinds = sorted({e[3] for e in examples if e[3] is not None})
        held = any(e[4] for e in examples)
        keys = ["all", *kinds] + (["held_out"] if held else [])
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        sums = torch.zeros(2 + 2 * len(keys), dtype=torch.float64)  # nats, tokens, then (right, asked) per key
        was_training = model.training
        model.eval()
        for start in range(rank * batch_size, len(examples), world * batch_size):
            chunk = examples[start : start + batch_size]
            pics = pixels[[e[0] for e in chunk]]
            ids, prefix_len, targets = self.encode([(e[1], e[2]) for e in chunk], length)
            with autocast():
                logits, _ = model(pics.to(device), ids.to(device), prefix_len.to(device))
            targets = targets.to(device)
            sums[0] += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                       reduction="sum").item()
            sums[1] += (targets != -100).sum().item()
            with autocast():
                answers = self.answer(model, pics, [e[1] for e in chunk], config, device, self.answer_tokens)
            for e, got in zip(chunk, answers):
                right = float(got.strip() == e[2].strip())
                for key in ("all", e[3]) + (("held_out",) if e[4] else ()):
                    if key in keys:
                        j = 2 + 2 * keys.index(key)
                        sums[j : j + 2] += torch.tensor([right, 1.0], dtype=torch.float64)
        model.train(was_training)
        if dist.is_initialized():
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        result = {"val_loss": (sums[0] / sums[1].clamp(min=1)).item()}
        for j, key in enumerate(keys):
            name = "val_accuracy" if key == "all" else f"val_accuracy_{key}"
            result[name] = (sums[2 + 2 * j] / sums[3 + 2 * j].clamp(min=1)).item()
        return result

    @torch.no_grad()
    def demo(self, model, device, max_new_tokens=6, seed=0, **kwargs):
        """A few validation examples, prompt -> the model's answer (the truth): one of each question, on
        held-out and trained combinations in turn, then any others."""
        config = model.config
        pixels, examples = self.validation(config)
        order = np.random.default_rng(seed).permutation(len(examples)).tolist()
        held = any(e[4] for e in examples)
        picks = []
        for j, kind in enumerate(dict.fromkeys(e[3] for e in examples)):
            picks += [i for i in order if examples[i][3] == kind and examples[i][4] == (held and j % 2 == 0)][:1]
        picks += [i for i in order if i not in picks]
        chosen = [examples[i] for i in picks[: max(1, min(6, max_new_tokens))]]
        was_training = model.training
        model.eval()
        answers = self.answer(model, pixels[[e[0] for e in chosen]], [e[1] for e in chosen], config, device,
                              self.answer_tokens)
        model.train(was_training)
        lines = []
        for e, got in zip(chosen, answers):
            tag = " [combination never trained on]" if e[4] else ""
            lines.append(f"{e[1]!r} -> {got.strip()!r} ({e[2]!r}){tag}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- shapes


class Shapes:
    """Pictures made here: one shape of a colour, a size and a place on a noisy grey background, and the
    caption that says so ("a small red circle at the top").

    Example g is drawn from a generator seeded with (seed, g), so the data is the same on every
    machine and a resumed run sees what an uninterrupted one sees. Training never shows the HELD_OUT
    colour-shape combinations. Evaluation shows fresh pictures of every combination, each to be told
    apart from the 18 captions that differ from its own in colour and shape only: the accuracy on the
    held-out ones measures whether the model composes colour and shape or memorises pairs.
    """

    COLOURS = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (40, 80, 225), "yellow": (235, 215, 30),
               "purple": (140, 55, 185), "orange": (245, 135, 25)}
    SHAPES = ("circle", "square", "triangle")
    SIZES = {"small": 0.32, "large": 0.6}  # side as a fraction of the picture
    PLACES = {"at the top": (0.5, 0.3), "at the bottom": (0.5, 0.7), "on the left": (0.3, 0.5),
              "on the right": (0.7, 0.5), "in the middle": (0.5, 0.5)}
    HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
    VAL_PER_COMBINATION = 16

    def __init__(self):
        self.combos = [(c, s) for c in self.COLOURS for s in self.SHAPES]
        self.train_combos = [c for c in self.combos if c not in self.HELD_OUT]
        self.labels = [self.caption(c, s, size, place) for size in self.SIZES for place in self.PLACES
                       for c, s in self.combos]
        self.val = [(i, combo) for combo in self.combos for i in range(self.VAL_PER_COMBINATION)]

    @staticmethod
    def caption(colour, shape, size, place):
        return f"a {size} {colour} {shape} {place}"

    def caption_corpus(self):
        """Every caption the data can show, for the tokenizer."""
        return "\n".join(self.labels)

    def draw(self, rng, colour, shape, image_size):
        """(picture, caption, (size, place)) of colour and shape, the rest drawn from rng."""
        from PIL import Image, ImageDraw

        size = list(self.SIZES)[rng.integers(len(self.SIZES))]
        place = list(self.PLACES)[rng.integers(len(self.PLACES))]
        noise = rng.normal(rng.integers(60, 200), 18, (image_size, image_size, 3)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(noise)
        r = image_size * self.SIZES[size] * rng.uniform(0.9, 1.1) / 2
        cx, cy = (image_size * (f + rng.uniform(-0.04, 0.04)) for f in self.PLACES[place])
        fill = tuple(int(v) for v in np.clip(np.array(self.COLOURS[colour]) + rng.integers(-20, 21, 3), 0, 255))
        draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, fill)
        return image, self.caption(colour, shape, size, place), (size, place)

    def train_pair(self, g, seed, image_size):
        rng = np.random.default_rng([seed, g])  # two numbers; validation pictures use three, so never the same
        return self.draw(rng, *self.train_combos[rng.integers(len(self.train_combos))], image_size)[:2]

    def train_batch(self, examples, seed, preprocess, image_size):
        pairs = [self.train_pair(g, seed, image_size) for g in examples]
        return preprocess([image for image, _ in pairs], image_size), [caption for _, caption in pairs]

    def validation_set(self, preprocess, image_size):
        pictures, captions, candidates, answers, held_out = self.val_pairs(image_size)
        return preprocess(pictures, image_size), captions, candidates, answers, held_out

    def val_pairs(self, image_size):
        """(pictures, captions, candidates, answers, held out?) of the validation split: the candidates
        of a picture are the indices in labels of the 18 captions with its size and place."""
        pictures, captions, candidates, answers = [], [], [], []
        for i, (c, s) in self.val:
            rng = np.random.default_rng([i, self.combos.index((c, s)), 1])
            image, caption, (size, place) = self.draw(rng, c, s, image_size)
            choices = [self.labels.index(self.caption(*combo, size, place)) for combo in self.combos]
            pictures.append(image)
            captions.append(caption)
            candidates.append(choices)
            answers.append(choices.index(self.labels.index(caption)))
        held_out = [combo in self.HELD_OUT for _, combo in self.val]
        return pictures, captions, candidates, answers, held_out

    def describe(self):
        return (f"shapes: {len(self.COLOURS)} colours x {len(self.SHAPES)} shapes, {len(self.HELD_OUT)} combinations "
                f"never trained on, {len(self.val)} validation pictures")


def draw_shape(pen, shape, cx, cy, r, fill):
    """A circle, square or triangle of half-width r centred on (cx, cy), with a pillow ImageDraw pen."""
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)


class ShapeQuestions:
    """Shapes as captioning and visual questions: each picture is asked to be captioned, or asked its
    colour, shape, place or size. Training example g of a seed is one picture and one question, both
    drawn from a generator seeded with (seed, g), never of a HELD_OUT combination; validation holds
    VAL_PER_COMBINATION fresh pictures of every combination, each asked every question."""

    QUESTIONS = {"caption": "caption en", "color": "answer en what color is the shape?",
                 "shape": "answer en what shape is it?", "place": "answer en where is the shape?",
                 "size": "answer en how big is the shape?"}
    VAL_PER_COMBINATION = 4

    def __init__(self):
        self.shapes = Shapes()

    @staticmethod
    def answer(kind, colour, shape, size, place, caption):
        return {"caption": caption, "color": colour, "shape": shape, "place": place, "size": size}[kind]

    def corpus(self):
        """Every prompt and answer the data can show, for the tokenizer."""
        return "\n".join([*self.QUESTIONS.values(), *self.shapes.labels])

    def train_example(self, g, seed, image_size):
        """(picture, prefix, suffix) of training example g."""
        rng = np.random.default_rng([seed, g])
        colour, shape = self.shapes.train_combos[rng.integers(len(self.shapes.train_combos))]
        image, caption, (size, place) = self.shapes.draw(rng, colour, shape, image_size)
        kind = list(self.QUESTIONS)[rng.integers(len(self.QUESTIONS))]
        return image, self.QUESTIONS[kind], self.answer(kind, colour, shape, size, place, caption)

    def prompts(self):
        return set(self.QUESTIONS.values())

    def train_batch(self, examples, seed, preprocess, image_size):
        triples = [self.train_example(g, seed, image_size) for g in examples]
        return preprocess([t[0] for t in triples], image_size), [t[1:] for t in triples]

    def validation_set(self, preprocess, image_size):
        """(pictures (M, 3, S, S), examples): one example (picture index, prefix, suffix, question, held
        out?) per picture and question."""
        pictures, examples = [], []
        for k, (colour, shape) in enumerate(self.shapes.combos):
            for i in range(self.VAL_PER_COMBINATION):
                # Three numbers, as Shapes' validation pictures, with a last one of its own.
                rng = np.random.default_rng([i, k, 2])
                image, caption, (size, place) = self.shapes.draw(rng, colour, shape, image_size)
                for kind, prompt in self.QUESTIONS.items():
                    answer = self.answer(kind, colour, shape, size, place, caption)
                    examples.append((len(pictures), prompt, answer, kind, (colour, shape) in self.shapes.HELD_OUT))
                pictures.append(image)
        return preprocess(pictures, image_size), examples

    def describe(self):
        n = len(self.shapes.combos) * self.VAL_PER_COMBINATION
        return (f"shapes with {len(self.QUESTIONS)} questions, {len(self.shapes.HELD_OUT)} colour-shape "
                f"combinations never trained on, {n} validation pictures")


# ---------------------------------------------------------------------------------- image folders


class ImageFolder:
    """A Hugging Face imagefolder: metadata.jsonl with one {"file_name": ..., "text": ...} per line and
    the images beside it, either in DIR itself (the last 10% of the lines are held out) or in the split
    folders DIR/train and DIR/test (or DIR/validation). Images of any size and mode."""

    def __init__(self, source, val_fraction=0.1):
        root = Path(source).expanduser()
        if root.is_file():
            raise UserError(f"--data {source} is a file; an image-text model needs a folder with metadata.jsonl "
                            "(one {\"file_name\": ..., \"text\": ...} per line) and the images beside it")
        if not root.is_dir():
            raise UserError(f"no folder {source}; pass an image folder with metadata.jsonl")
        val_dir = next((root / d for d in ("test", "validation") if (root / d / "metadata.jsonl").is_file()), None)
        if (root / "train" / "metadata.jsonl").is_file() and val_dir is not None:
            self.train, self.val = self.read(root / "train"), self.read(val_dir)
        elif (root / "metadata.jsonl").is_file():
            pairs = self.read(root)
            cut = int(len(pairs) * (1 - val_fraction))
            self.train, self.val = pairs[:cut], pairs[cut:]
        else:
            raise UserError(f"{source} holds no metadata.jsonl (nor train/ with test/ or validation/ beside it); "
                            "an image folder needs one {\"file_name\": ..., \"text\": ...} line per image")
        if not self.train or not self.val:
            raise UserError(f"{source} holds {len(self.train)} training and {len(self.val)} validation images; "
                            "it needs at least one of each")
        self.labels = sorted({text for _, text in self.val})  # the zero-shot candidates
        self.images = {}
        self.order = (None, None)  # ((seed, epoch), permutation): the last epoch's shuffle

    @staticmethod
    def read(folder):
        return [(image, record["text"]) for image, record in metadata(folder, ("file_name", "text"))]

    def caption_corpus(self):
        return "\n".join(text for _, text in self.train)

    def pictures(self, split, preprocess, image_size):
        """(N, 3, S, S) of a split, preprocessed once and kept (the folder is expected to be small)."""
        from PIL import Image, UnidentifiedImageError

        key = (split, image_size)
        if key not in self.images:
            tensors = []
            for path, _ in getattr(self, split):
                try:
                    with Image.open(path) as image:
                        tensors.append(preprocess(image, image_size))
                except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
                    raise UserError(f"cannot read the image {path} ({e}); replace or remove it") from None
            self.images[key] = torch.stack(tensors)
        return self.images[key]

    def train_batch(self, examples, seed, preprocess, image_size):
        """Example g is position g % N of epoch g // N's shuffle of the N training images."""
        picks = [self.shuffle(seed, g) for g in examples]
        return self.pictures("train", preprocess, image_size)[picks], [self.train[i][1] for i in picks]

    def shuffle(self, seed, g):
        epoch, position = divmod(g, len(self.train))
        if self.order[0] != (seed, epoch):
            self.order = ((seed, epoch), np.random.default_rng([seed, epoch]).permutation(len(self.train)))
        return self.order[1][position]

    def validation_set(self, preprocess, image_size):
        """Every image against all distinct captions of the split; its own is the answer."""
        captions = [text for _, text in self.val]
        candidates = [list(range(len(self.labels)))] * len(captions)
        answers = [self.labels.index(text) for text in captions]
        return self.pictures("val", preprocess, image_size), captions, candidates, answers, None

    def describe(self):
        return (f"{len(self.train):,} training and {len(self.val):,} validation images, "
                f"{len(self.labels)} distinct validation captions")


class PrefixFolder(ImageFolder):
    """An image folder whose metadata.jsonl lines are {"file_name": ..., "prefix": ..., "suffix": ...},
    split as ImageFolder splits it; a training pair's text is the tuple (prefix, suffix)."""

    @staticmethod
    def read(folder):
        return [(image, (r["prefix"], r["suffix"])) for image, r in metadata(folder, ("file_name", "prefix", "suffix"))]

    def corpus(self):
        return "\n".join(f"{p}\n{s}" for _, (p, s) in self.train + self.val)

    def prompts(self):
        return {p for _, (p, _) in self.train + self.val}

    def validation_set(self, preprocess, image_size):
        examples = [(i, p, s, None, False) for i, (_, (p, s)) in enumerate(self.val)]
        return self.pictures("val", preprocess, image_size), examples

    def describe(self):
        return f"{len(self.train):,} training and {len(self.val):,} validation examples of an image, a prefix and a suffix"


def metadata(folder, fields):
    """(image path, record) for each line of folder/metadata.jsonl, a JSON object whose fields are strings
    and whose file_name is a file of the folder."""
    path = folder / "metadata.jsonl"
    shape = "{" + ", ".join(f'"{f}": ...' for f in fields) + "}"
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UserError(f"{path} line {n} is not JSON; each line must be {shape}") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(f), str) for f in fields):
            names = [json.dumps(f) for f in fields]
            raise UserError(f"{path} line {n} has no {', '.join(names[:-1])} and {names[-1]} strings; "
                            f"each line must be {shape}")
        image = folder / record["file_name"]
        if not image.is_file():
            raise UserError(f"{path} line {n} names {record['file_name']}, which is not in {folder}")
        yield image, record


def folder_fingerprint(folder):
    """sha256 over the names, sizes and texts of an image folder's examples, so that a resumed run
    notices other data under the same --data."""
    return corpus.sha256("\n".join(f"{p.name}\t{p.stat().st_size}\t{t}" for p, t in folder.train + folder.val))


def write_pictures(folder):
    """One picture of each colour and shape (train.py --examples), 32 pixels wide as the image models are
    trained on them, named by what they show (red_circle.png), to hand to sample.py --image."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = Shapes()
    for i, (colour, shape) in enumerate(shapes.combos):
        image, _, _ = shapes.draw(np.random.default_rng([0, i]), colour, shape, 32)
        image.save(folder / f"{colour}_{shape}.png")
    return f"{len(shapes.combos)} pictures in {folder}, such as {folder / '_'.join(shapes.combos[0])}.png"
