"""The prefix-LM pipeline of images.py (shapes with questions, and image folders with prefixes and
suffixes), and train.py driving paligemma.py through it."""

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llm_machinery import corpus, data
import paligemma
import train

from conftest import stop_at_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "paligemma", "--set", "image_size=16", "--set", "patch_size=8", "--set", "vision_dim=16",
        "--set", "vision_layers=1", "--set", "vision_heads=2", "--set", "vision_mlp_dim=32", "--set", "dim=16",
        "--set", "n_layers=1", "--set", "n_heads=2", "--set", "head_dim=8", "--set", "ffn_dim=32",
        "--set", "max_seq_len=40", "--batch-size", "8", "--warmup-steps", "2", "--no-plot", "--threads", "1",
        "--sample-tokens", "2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix_lm")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMS_FROM_SCRATCH_CACHE", str(root / "cache"))
        yield root


def options(source=None):
    """What data.pipeline reads of train.py's options."""
    return argparse.Namespace(data=source, vocab_size=300)


@pytest.fixture(scope="module")
def pipe(env):
    return data.pipeline(paligemma, options())


def config(**kw):
    return types.SimpleNamespace(**{"image_size": 16, "n_image_tokens": 4, "max_seq_len": 4 + 64, **kw})


def test_sequence_layout_and_targets(pipe):
    tok = pipe.tokenizer
    ids, prefix_len, targets = pipe.encode([("answer en what color is the shape?", "red"), ("caption en", "")], 40)
    prompt = [pipe.bos] + tok.encode_ordinary("answer en what color is the shape?") + tok.encode_ordinary("\n")
    suffix = tok.encode_ordinary("red") + [pipe.eos]
    want = prompt + suffix + [pipe.pad] * (40 - len(prompt) - len(suffix))
    assert ids[0].tolist() == want and prefix_len[0] == len(prompt)
    expected = [-100] * 40
    expected[len(prompt) - 1 : len(prompt) + len(suffix) - 1] = suffix
    assert targets[0].tolist() == expected
    # An empty suffix still scores its eos; the layout is the one paligemma.suffix_targets scores.
    assert targets[1].tolist().count(-100) == 39 and pipe.eos in targets[1].tolist()
    assert torch.equal(targets, paligemma.suffix_targets(ids, prefix_len, pipe.pad))
    # Too short a row: the prompt keeps bos and "\n" and one place for the suffix, which loses its eos.
    ids, prefix_len, targets = pipe.encode([("answer en what color is the shape?", "a small red circle")], 5)
    assert ids[0, 0] == pipe.bos and prefix_len[0] == 4 and (targets[0] != -100).sum() == 1
    assert pipe.eos not in ids[0].tolist()


def test_batches_are_deterministic_and_hold_combinations_out(pipe):
    c = config()
    a = next(iter(pipe.stream(c, 4, seed=3)))
    b = next(iter(pipe.stream(c, 4, seed=3)))
    assert set(a) == {"pixel_values", "input_ids", "prefix_len", "targets", "loss_weight"}
    assert a["loss_weight"] == (a["targets"] != -100).sum()
    assert all(torch.equal(a[k], b[k]) for k in a) and a["pixel_values"].shape == (4, 3, 16, 16)
    # Two ranks of batch 2 see what one rank of batch 4 sees.
    halves = [next(iter(pipe.stream(c, 2, seed=3, rank=r, world_size=2))) for r in (0, 1)]
    assert torch.equal(torch.cat([h["input_ids"] for h in halves]), a["input_ids"])
    questions = pipe.data
    seen, kinds = set(), set()
    for g in range(400):
        _, prompt, answer = questions.train_example(g, 0, 8)
        kinds.add(prompt)
        if prompt == questions.QUESTIONS["caption"]:
            words = answer.split()
            seen.add((words[2], words[3]))
    assert seen.isdisjoint(questions.shapes.HELD_OUT) and len(seen) == 18 - 3 and len(kinds) == 5
    _, examples = pipe.validation(c)
    combos = {(e[2].split()[2], e[2].split()[3]) for e in examples if e[3] == "caption"}
    assert len(combos) == 18 and {e[3] for e in examples} == set(questions.QUESTIONS)
    assert sum(e[4] for e in examples) == 3 * questions.VAL_PER_COMBINATION * 5


def test_every_prefix_leaves_the_suffix_a_place(pipe):
    """paligemma.py's forward takes prefix_len on trust: it lies in [1, text length - 1] for every
    example at every text length that check accepts, and for a prompt too long for the row, which is cut;
    a text length without room for the longest prompt and one answer token is refused."""
    longest = max(pipe.data.prompts(), key=lambda p: len(pipe.prompt_ids(p)))
    need = len(pipe.prompt_ids(longest)) + 1
    with pytest.raises(corpus.UserError, match="max_seq_len"):
        pipe.check(config(max_seq_len=4 + need - 1))
    for length in (need, need + 3):
        c = config(max_seq_len=4 + length)
        pipe.check(c)
        _, examples = pipe.validation(c)
        lengths = [next(iter(pipe.stream(c, 16, seed=0)))["prefix_len"],
                   pipe.encode([(e[1], e[2]) for e in examples], length)[1],
                   pipe.encode([(longest * 3, "red")], length)[1]]
        for prefix_len in lengths:
            assert prefix_len.min() >= 1 and prefix_len.max() <= length - 1, (length, prefix_len)


class StandIn(torch.nn.Module):
    """forward: uniform logits; generate: the given answers, in order, each followed by eos."""

    def __init__(self, pipe, answers, vocab):
        super().__init__()
        self.pipe, self.answers, self.vocab, self.calls = pipe, list(answers), vocab, 0

    def forward(self, pixel_values, input_ids, prefix_len):
        return torch.zeros(*input_ids.shape, self.vocab), None

    def generate(self, pixel_values, prefix_ids, max_new_tokens, eos_id=None, prefix_len=None, **kwargs):
        assert eos_id == self.pipe.eos and len(prefix_len) == len(prefix_ids)
        rows = []
        for _ in range(len(prefix_ids)):
            new = (self.pipe.tokenizer.encode_ordinary(self.answers.pop(0)) + [eos_id])[:max_new_tokens]
            rows.append(new + [eos_id] * (max_new_tokens - len(new)))
        return torch.cat([prefix_ids, torch.tensor(rows)], dim=1)


def test_exact_match_accuracy_is_counted_right(pipe):
    c = config()
    _, examples = pipe.validation(c)
    n = len(examples)
    right = StandIn(pipe, [e[2] for e in examples], pipe.tokenizer.n_vocab)
    result = pipe.evaluate(right, c, 32, "cpu", contextlib.nullcontext)
    assert list(result)[0] == "val_loss" and math.isclose(result["val_loss"], math.log(pipe.tokenizer.n_vocab), rel_tol=1e-6)
    assert result["val_accuracy"] == 1.0 and result["val_accuracy_held_out"] == 1.0
    assert all(result[f"val_accuracy_{k}"] == 1.0 for k in pipe.data.QUESTIONS)
    # Always "red": right exactly on the colour questions about red shapes.
    red = StandIn(pipe, ["red"] * n, pipe.tokenizer.n_vocab)
    result = pipe.evaluate(red, c, 32, "cpu", contextlib.nullcontext)
    assert math.isclose(result["val_accuracy"], sum(e[2] == "red" for e in examples) / n)
    assert math.isclose(result["val_accuracy_color"], 1 / 6) and result["val_accuracy_caption"] == 0.0
    assert math.isclose(result["val_accuracy_held_out"], 1 / 3 / 5)  # red triangle: one in three, colour only
    # Only the whole answer counts: its first word ("red" for "red circle") is wrong, and so is more than it
    # ("red circle" for "red"), so each scores exactly the answers of one word.
    one_word = sum(len(e[2].split()) == 1 for e in examples) / n
    assert 0 < one_word < 1
    for answers in ([e[2].split()[0] for e in examples], [e[2].split()[0] + " circle" for e in examples]):
        result = pipe.evaluate(StandIn(pipe, answers, pipe.tokenizer.n_vocab), c, 32, "cpu", contextlib.nullcontext)
        assert math.isclose(result["val_accuracy"], sum(a == e[2] for a, e in zip(answers, examples)) / n)
    assert math.isclose(result["val_accuracy"], sum(e[2].split()[0] + " circle" == e[2] for e in examples) / n)


def prefix_folder(root, n=12, bad=None):
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"{i:02d}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / name)
        lines.append(json.dumps({"file_name": name, "prefix": "caption en", "suffix": ["a cat", "a dog"][i % 2]}))
    if bad is not None:
        lines[3] = bad
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_folder_lines_without_prefix_and_suffix_are_refused(env):
    for i, bad in enumerate(['{"file_name": "00.png", "text": "a cat"}', "not json"]):
        folder = prefix_folder(env / f"bad{i}", bad=bad)
        with pytest.raises(corpus.UserError, match="metadata.jsonl line 4"):
            data.pipeline(paligemma, options(str(folder)))
    pipe = data.pipeline(paligemma, options(str(prefix_folder(env / "good"))))
    c = config()
    pipe.check(c)
    _, examples = pipe.validation(c)
    assert len(examples) == 2 and pipe.unit(c) == ("examples", 1)
    with pytest.raises(corpus.UserError, match="max_seq_len"):
        pipe.check(config(max_seq_len=6))


def test_train_end_to_end(env):
    out = env / "run"
    assert train.main([*TINY, "--out", str(out), "--max-steps", "4", "--eval-every", "0"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in lines if "val_accuracy" in m]
    assert final and "val_loss" in final[-1] and "val_accuracy_held_out" in final[-1]
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def weights(out):
    return load_file(Path(out) / "model.safetensors")


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigint_is_bit_identical(env):
    # A tiny step takes milliseconds: many steps after the stop leave the signal time to land before the end.
    common = [*TINY, "--max-steps", "200", "--ckpt-every", "1000", "--eval-every", "0", "--log-every", "1",
              "--seed", "4", "--sample-tokens", "0"]
    assert train.main([*common, "--out", str(env / "straight")]) == 0
    out = env / "stopped"
    code, err = stop_at_step([*common, "--out", str(out)], 3)
    assert code == 130, err  # 128 + SIGINT, after saving
    assert 3 <= torch.load(out / "state.pt", weights_only=True)["step"] < 200
    assert train.main([*common, "--out", str(out)]) == 0
    a, b = weights(env / "straight"), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("loss", "val_loss", "val_accuracy"):
        straight, resumed = ([r[key] for r in records(o) if key in r] for o in (env / "straight", out))
        assert len(straight) > 0 and straight == resumed, key


@pytest.mark.parametrize("batch, accum", [(4, 1), (2, 2)])
def test_two_ddp_processes_match_one_with_the_same_global_batch(env, batch, accum):
    """Answers differ in length, so micro-batches score different numbers of tokens: the step must weigh
    each one's mean loss by its tokens (loss_weight) to equal the step of one batch of 8."""
    # 40 steps at a high learning rate, so that the final evaluation answers some questions right and
    # the accuracies compared below are not all zero; a step takes milliseconds.
    common = ["--max-steps", "40", "--lr", "3e-2", "--eval-every", "20", "--sample-tokens", "0", "--seed", "1",
              "--log-every", "1"]
    # TINY's own --batch-size and --sample-tokens come first, so the ones given after them win.
    if not (env / "one").exists():
        assert train.main([*TINY, *common, "--batch-size", "8", "--out", str(env / "one")]) == 0
    two = env / f"two-{batch}-{accum}"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
         *TINY, *common, "--batch-size", str(batch), "--grad-accum", str(accum), "--out", str(two)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = weights(env / "one"), weights(two)
    assert a.keys() == b.keys()
    for k in a:
        # A key bias shifts every logit of a query alike, so softmax makes its gradient zero but for
        # rounding, whose sign Adam turns into a full step; those parameters (the vision tower's
        # k_proj.bias; the text decoder has no biases) are noise, not a check.
        if k.endswith("k_proj.bias"):
            continue
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    evals = [r for r in records(env / "one") if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    accuracies = sorted(k for k in evals[-1] if k.startswith("val_accuracy"))
    assert {"val_accuracy", "val_accuracy_held_out", "val_accuracy_caption", "val_accuracy_color"} <= set(accuracies)
    for key in ("loss", "val_loss", *accuracies):
        single, double = ([r[key] for r in records(o) if key in r] for o in (env / "one", two))
        assert len(single) == len(double) > 0 and single == pytest.approx(double, rel=1e-5), key
