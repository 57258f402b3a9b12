"""The image-text pipeline of images.py (shapes and image folders), and train.py / sample.py driving siglip.py."""

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llm_machinery import corpus, data, images, runs
import sample
import siglip
import train

from conftest import records, stop_at_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "siglip", "--set", "image_size=16", "--set", "patch_size=4", "--set", "vision_dim=32",
        "--set", "vision_layers=1", "--set", "vision_heads=2", "--set", "vision_mlp_dim=64", "--set", "text_dim=32",
        "--set", "text_layers=1", "--set", "text_heads=2", "--set", "text_mlp_dim=64", "--set", "max_seq_len=12",
        "--batch-size", "8", "--warmup-steps", "3", "--no-plot", "--threads", "1", "--sample-tokens", "3"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMS_FROM_SCRATCH_CACHE", str(root / "cache"))
        yield root


def picture(seed, size=(20, 14), mode="RGB"):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return image.convert(mode)


def image_folder(root, n=30, captions=("a cat", "a dog", "a bird"), modes=("RGB", "RGBA", "L", "P", "CMYK")):
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        mode = modes[i % len(modes)]
        name = f"{i:03d}.{'jpg' if mode == 'CMYK' else 'png'}"
        picture(i, size=(12 + i % 7, 9 + i % 5), mode=mode).save(root / name)
        lines.append(json.dumps({"file_name": name, "text": captions[i % len(captions)]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def config(**kw):
    return types.SimpleNamespace(image_size=16, max_seq_len=12, **kw)


def options(source=None):
    """What data.pipeline reads of train.py's options."""
    return argparse.Namespace(data=source, vocab_size=300)


# ------------------------------------------------------------------------------------ shapes


def test_shapes_are_deterministic_and_hold_combinations_out():
    shapes = images.Shapes()
    a, b = shapes.train_pair(5, 0, 24), shapes.train_pair(5, 0, 24)
    assert a[1] == b[1] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert shapes.train_pair(5, 1, 24)[1] != a[1] or not np.array_equal(np.asarray(shapes.train_pair(5, 1, 24)[0]), np.asarray(a[0]))
    seen = set()
    for g in range(600):
        caption = shapes.train_pair(g, 0, 16)[1].split()
        colour, shape = [w for w in caption if w in shapes.COLOURS][0], [w for w in caption if w in shapes.SHAPES][0]
        seen.add((colour, shape))
    assert seen.isdisjoint(shapes.HELD_OUT) and len(seen) == 18 - len(shapes.HELD_OUT)
    _, captions, candidates, answers, held_out = shapes.val_pairs(16)
    assert sorted(set(answers)) == list(range(18)) and sum(held_out) == 3 * shapes.VAL_PER_COMBINATION
    for caption, choices, answer in zip(captions, candidates, answers):
        assert shapes.labels[choices[answer]] == caption
        # The 18 candidates share the picture's size and place and differ in colour and shape.
        others = [shapes.labels[c].split() for c in choices]
        assert len({tuple(o[1:2] + o[4:]) for o in others}) == 1 and len({tuple(o[2:4]) for o in others}) == 18


def test_a_picture_shows_its_colour():
    shapes = images.Shapes()
    rng = np.random.default_rng(0)
    for colour, rgb in shapes.COLOURS.items():
        image, caption, _ = shapes.draw(rng, colour, "square", 32)
        pixels = np.asarray(image).reshape(-1, 3).astype(int)
        near = (np.abs(pixels - np.array(rgb)).max(axis=1) <= 25).mean()
        assert near > 0.05, (colour, caption, near)  # even a small square covers a few percent of the picture


def test_captions_are_padded_so_the_last_position_is_always_pad(env):
    pipe = data.pipeline(siglip, options())
    ids = images.caption_ids(pipe.tokenizer, ["a red circle", "a small red circle at the top " * 5], 8)
    pad = pipe.tokenizer.special_tokens[images.PAD]
    assert ids.shape == (2, 8) and (ids[:, -1] == pad).all() and (ids[1, :-1] != pad).all()
    assert pipe.tokenizer.decode(ids[0][ids[0] != pad].tolist()) == "a red circle"


class Oracle(torch.nn.Module):
    """classify() puts all probability on `answer(i)`; forward returns a loss of 1 per call."""

    def __init__(self, choose):
        super().__init__()
        self.choose, self.seen = choose, 0

    def forward(self, pixel_values, input_ids):
        return None, torch.tensor(1.0)

    def classify(self, pixel_values, label_ids):
        probs = torch.zeros(len(pixel_values), len(label_ids))
        for row in range(len(pixel_values)):
            probs[row, self.choose(self.seen)] = 1
            self.seen += 1
        return probs


def test_zero_shot_accuracy_counts_seen_and_held_out_combinations(env):
    pipe = data.pipeline(siglip, options())
    _, _, candidates, answers, held_out, _ = pipe.validation(config())
    right = pipe.evaluate(Oracle(lambda i: candidates[i, answers[i]]), config(), 10, "cpu", contextlib.nullcontext)
    assert right["val_accuracy"] == right["val_accuracy_seen"] == right["val_accuracy_held_out"] == 1.0
    assert right["val_loss"] == 1.0
    # Always the first candidate (a red circle, a trained combination): right on its 16 pictures only.
    first = pipe.evaluate(Oracle(lambda i: candidates[i, 0]), config(), 10, "cpu", contextlib.nullcontext)
    n_seen = len(answers) - held_out.sum().item()
    assert first["val_accuracy"] == pytest.approx(16 / len(answers))
    assert first["val_accuracy_seen"] == pytest.approx(16 / n_seen) and first["val_accuracy_held_out"] == 0


def raw_pixels(image, image_size):
    """A preprocess that keeps the 0..255 values, so that a test can tell the colour of a picture."""
    if isinstance(image, list):
        return torch.stack([raw_pixels(im, image_size) for im in image])
    return torch.from_numpy(np.array(image.convert("RGB").resize((image_size, image_size)))).permute(2, 0, 1).float()


def colour_of(pixels):
    """The colour of Shapes.COLOURS that most pixels of a (3, S, S) picture of raw values are near."""
    rgb = pixels.flatten(1).T
    near = {name: ((rgb - torch.tensor(value)).abs().amax(1) <= 25).sum().item() for name, value in images.Shapes.COLOURS.items()}
    return max(near, key=near.get)


class ColourJudge(torch.nn.Module):
    """forward: the share of pairs whose caption does not name the colour its picture shows."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer, self.pad = tokenizer, tokenizer.special_tokens[images.PAD]

    def forward(self, pixel_values, input_ids):
        captions = [self.tokenizer.decode([i for i in row if i != self.pad]) for row in input_ids.tolist()]
        wrong = [colour_of(p) not in caption.split() for p, caption in zip(pixel_values, captions)]
        return None, torch.tensor(sum(wrong) / len(wrong))

    def classify(self, pixel_values, label_ids):
        return torch.full((len(pixel_values), len(label_ids)), 1 / len(label_ids))


@pytest.mark.parametrize("source", ["shapes", "folder"])
def test_validation_pictures_go_with_their_own_captions(env, tmp_path, source):
    """val_loss means something only if each validation picture is scored with its own caption: a
    judge that knows the truth scores 0, and zero-shot answers name the same caption."""
    folder = None
    if source == "folder":
        folder, lines, colours = tmp_path / "d", [], list(images.Shapes.COLOURS.items())
        folder.mkdir()
        for i in range(40):
            name, rgb = colours[i % len(colours)]
            noise = np.random.default_rng(i).integers(-15, 16, (10, 10, 3))
            Image.fromarray((np.array(rgb) + noise).clip(0, 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
            lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": f"a {name} picture"}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        folder = str(folder)
    pipe = images.ImageText(folder, vocab_size=300, preprocess=raw_pixels)
    pixels, ids, candidates, answers, _, label_ids = pipe.validation(config())
    assert len(ids) == (288 if source == "shapes" else 4)
    assert all(torch.equal(ids[i], label_ids[candidates[i, answers[i]]]) for i in range(len(ids)))
    result = pipe.evaluate(ColourJudge(pipe.tokenizer), config(), 8, "cpu", contextlib.nullcontext)
    assert result["val_loss"] == 0


def test_image_text_batches_ask_for_gathered_captions_only_under_ddp(env):
    pipe = data.pipeline(siglip, options())
    one = next(iter(pipe.stream(config(), 4, seed=1)))
    assert set(one) == {"pixel_values", "input_ids"}
    halves = [next(iter(pipe.stream(config(), 2, seed=1, rank=r, world_size=2))) for r in (0, 1)]
    assert all(h["gather"] is True for h in halves)
    assert torch.equal(torch.cat([h["pixel_values"] for h in halves]), one["pixel_values"])
    assert torch.equal(torch.cat([h["input_ids"] for h in halves]), one["input_ids"])


# ------------------------------------------------------------------------------- image folders


def test_image_folder_with_split_folders_and_any_mode(env, tmp_path):
    image_folder(tmp_path / "d" / "train", n=20)
    image_folder(tmp_path / "d" / "test", n=6, captions=("a dog", "a fish"))
    pipe = data.pipeline(siglip, options(str(tmp_path / "d")))
    assert len(pipe.data.train) == 20 and len(pipe.data.val) == 6
    assert pipe.data.labels == ["a dog", "a fish"]  # the candidates: the held-out split's distinct captions
    pipe.check(config())
    pixels = pipe.data.pictures("train", siglip.preprocess, 16)
    assert pixels.shape == (20, 3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    expected = siglip.preprocess(Image.open(tmp_path / "d" / "train" / "001.png"), 16)
    assert torch.equal(pixels[1], expected)
    batch = pipe.batch(range(0, 20), seed=0, config=config())
    assert sorted(tuple(r) for r in batch["pixel_values"].flatten(1).tolist()) == sorted(tuple(r) for r in pixels.flatten(1).tolist())


def test_image_folder_without_splits_holds_out_the_last_tenth(env, tmp_path):
    image_folder(tmp_path / "d", n=30)
    pipe = data.pipeline(siglip, options(str(tmp_path / "d")))
    assert [p.stem for p, _ in pipe.data.val] == ["027", "028", "029"]


def test_folder_epochs_show_every_image_once_in_a_seeded_order(env, tmp_path):
    image_folder(tmp_path / "d", n=30)
    pipe = data.pipeline(siglip, options(str(tmp_path / "d")))
    first_epoch = [pipe.data.shuffle(4, g) for g in range(27)]
    assert sorted(first_epoch) == list(range(27))
    assert [pipe.data.shuffle(4, g) for g in range(27, 54)] != first_epoch
    assert [pipe.data.shuffle(4, g) for g in range(27)] == first_epoch


@pytest.mark.parametrize("problem, match", [
    ("corrupt", "cannot read the image"), ("missing", "which is not in"), ("no text", 'line 2 has no "file_name" and "text"'),
    ("not json", "line 3 is not JSON"), ("empty", "holds no metadata.jsonl"),
])
def test_bad_image_folders(env, tmp_path, problem, match):
    folder = image_folder(tmp_path / "d", n=12)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    if problem == "corrupt":
        (folder / "003.png").write_bytes(b"\x89PNG not really")
    elif problem == "missing":
        (folder / "005.png").unlink()
    elif problem == "no text":
        lines[1] = json.dumps({"file_name": "001.png"})
    elif problem == "not json":
        lines[2] = "{file_name: 002.png"
    elif problem == "empty":
        shutil.rmtree(folder)
        folder.mkdir()
    if folder.joinpath("metadata.jsonl").exists():
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(corpus.UserError, match=match):
        pipe = data.pipeline(siglip, options(str(folder)))
        pipe.check(config())


def fails(argv, capsys, match):
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and match in last and "Traceback" not in err, err


def test_wrong_kind_of_data_for_the_model(env, tmp_path, capsys):
    folder = image_folder(tmp_path / "d", n=12)
    (tmp_path / "t.txt").write_text("some text " * 100)
    fails(["--model", "gpt_llama", "--data", str(folder), "--out", str(tmp_path / "o")], capsys, "is an image folder")
    fails([*TINY, "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "o")], capsys, "is a file")
    (folder / "003.png").write_bytes(b"broken")
    fails([*TINY, "--data", str(folder), "--out", str(tmp_path / "o"), "--max-steps", "2"], capsys, "003.png")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ training siglip


def weights(out):
    return load_file(Path(out) / "model.safetensors")


@pytest.fixture(scope="module")
def trained(env):
    out = env / "trained"
    assert train.main([*TINY, "--out", str(out), "--max-steps", "12", "--eval-every", "6"]) == 0
    return out


def test_outputs_and_metrics(trained, capsys):
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer.tiktoken", "state.pt", "metrics.jsonl"):
        assert (trained / name).is_file(), name
    evals = [r for r in records(trained) if "val_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    for r in evals:
        assert {"val_accuracy", "val_accuracy_seen", "val_accuracy_held_out"} <= r.keys()
    logged = [r for r in records(trained) if "loss" in r]
    assert all({"t", "b", "pairs_per_s"} <= r.keys() for r in logged)


def test_sample_ranks_labels_for_images(trained, tmp_path, capsys):
    shapes = images.Shapes()
    image, _, _ = shapes.draw(np.random.default_rng(0), "red", "circle", 16)
    image.convert("P").save(tmp_path / "a.png")
    labels = ["a red circle", "a blue square", "a green triangle"]
    assert sample.main([str(trained), "--image", str(tmp_path / "a.png"), "--labels", ",".join(labels)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{tmp_path / 'a.png'}:" and len(out) == 4
    printed = {line.split("  ")[2]: float(line.split()[0]) for line in out[1:]}
    model, tokenizer, _ = runs.load_run(trained)
    probs = model.classify(siglip.preprocess(Image.open(tmp_path / "a.png"), 16)[None], images.caption_ids(tokenizer, labels, 12))[0]
    assert printed == pytest.approx({label: round(p.item(), 3) for label, p in zip(labels, probs)}, abs=1e-3)
    assert [line.split("  ")[2] for line in out[1:]] == [labels[i] for i in probs.argsort(descending=True)]
    assert sample.main([str(trained), "--image", str(tmp_path / "missing.png"), "--labels", "a"]) == 2
    assert "cannot read the image" in capsys.readouterr().err
    assert sample.main([str(trained), "--prompt", "a red"]) == 2


def test_resume_after_sigint_is_bit_identical(env):
    common = [*TINY, "--max-steps", "16", "--ckpt-every", "100", "--eval-every", "0", "--log-every", "1", "--seed", "4",
              "--sample-tokens", "0"]
    assert train.main([*common, "--out", str(env / "straight")]) == 0
    out = env / "stopped"
    code, err = stop_at_step([*common, "--out", str(out)], 5)
    assert code == 130, err  # 128 + SIGINT, after saving
    assert 5 <= torch.load(out / "state.pt", weights_only=True)["step"] < 16
    assert train.main([*common, "--out", str(out)]) == 0
    a, b = weights(env / "straight"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_ddp_processes_match_one_with_twice_the_batch(env):
    common = ["--max-steps", "3", "--eval-every", "3", "--sample-tokens", "0", "--seed", "1", "--log-every", "1"]
    argv = [a for a in TINY if a not in ("--batch-size", "8")]
    assert train.main([*argv, *common, "--batch-size", "8", "--out", str(env / "one")]) == 0
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
         *argv, *common, "--batch-size", "4", "--out", str(env / "two")],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = weights(env / "one"), weights(env / "two")
    for k in a:
        # A key bias shifts every logit of a query alike, so softmax makes its gradient zero but for
        # rounding, whose sign Adam turns into a full step; those parameters are noise, not a check.
        if k.endswith("k_proj.bias"):
            continue
        if k.endswith("in_proj.bias"):  # query, key and value biases of the pooling head, in one tensor
            q, _, v = a[k].chunk(3)
            a[k], b[k] = torch.cat([q, v]), torch.cat([b[k].chunk(3)[0], b[k].chunk(3)[2]])
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for key in ("loss", "val_loss", "val_accuracy"):
        one, two = ([r[key] for r in records(env / o) if key in r] for o in ("one", "two"))
        assert len(one) == len(two) > 0 and one == pytest.approx(two, rel=1e-5), key


def test_a_changed_image_changes_the_folder_fingerprint(env, tmp_path):
    folder = image_folder(tmp_path / "d", n=12)
    first = data.pipeline(siglip, options(str(folder))).fingerprint
    assert data.pipeline(siglip, options(str(folder))).fingerprint == first
    picture(99, size=(40, 30)).save(folder / "000.png")  # same name, other picture
    assert data.pipeline(siglip, options(str(folder))).fingerprint != first
