"""siglip.py against Hugging Face transformers' SiglipModel and SiglipImageProcessor, plus the sigmoid loss
(by hand, in blocks, across two processes), the config's checks and zero-shot classification."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import siglip
from siglip import Config, Model, preprocess, sigmoid_loss, sigmoid_loss_definition

from conftest import ROOT, load_on_meta, reference  # noqa: E402

transformers = reference("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py


# Two shapes of model: powers of two, and odd sizes (3 heads, 30-pixel images in 6-pixel patches, a text
# width that differs from the vision width, a large layer-norm eps that a wrong eps could not hide under).
CASES = {
    "even": dict(text=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=16),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8)),
    "odd": dict(text=dict(vocab_size=99, hidden_size=36, intermediate_size=70, num_hidden_layers=3,
                          num_attention_heads=3, max_position_embeddings=11, projection_size=48, layer_norm_eps=1e-3),
                vision=dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=3,
                            image_size=30, patch_size=6, layer_norm_eps=1e-3)),
}


def hf_siglip(tmp_path, case, max_shard_size=None):
    """A tiny random SiglipModel with eager attention, saved into tmp_path."""
    torch.manual_seed(0)
    config = transformers.SiglipConfig(text_config=CASES[case]["text"], vision_config=CASES[case]["vision"])
    reference = transformers.SiglipModel(config).eval()
    reference.set_attn_implementation("eager")
    # A fresh model has unit norm weights, zero biases, t' = b = 0; random ones make a swap show up.
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") or "_bias" in name:
                p.normal_(0.0, 0.1)
        reference.logit_scale.fill_(1.7)
        reference.logit_bias.fill_(-2.3)
    kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    reference.save_pretrained(tmp_path, **kwargs)
    return reference


def random_inputs(case, batch=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    text, vision = CASES[case]["text"], CASES[case]["vision"]
    S = vision["image_size"]
    pixel_values = torch.rand(batch, 3, S, S, generator=g) * 2 - 1
    input_ids = torch.randint(0, text["vocab_size"], (batch, text["max_position_embeddings"]), generator=g)
    return pixel_values, input_ids


@pytest.mark.parametrize("case", list(CASES))
def test_features_logits_and_loss_match_transformers(tmp_path, case):
    reference = hf_siglip(tmp_path, case)
    model = Model.from_pretrained(tmp_path)
    model.config.positives = "diagonal"  # transformers' loss knows only the diagonal
    pixel_values, input_ids = random_inputs(case)
    with torch.no_grad():
        out = reference(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
        image = reference.get_image_features(pixel_values=pixel_values).pooler_output
        text = reference.get_text_features(input_ids=input_ids).pooler_output
        logits, loss = model(pixel_values, input_ids)
        torch.testing.assert_close(model.encode_image(pixel_values), image, atol=1e-4, rtol=0)
        torch.testing.assert_close(model.encode_text(input_ids), text, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, out.logits_per_image, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=1e-4, rtol=0)
    assert model.metrics()["t"] == pytest.approx(np.exp(1.7)) and model.metrics()["b"] == pytest.approx(-2.3)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_transformers(tmp_path, case):
    """The backward pass too: the pooling head without keys and values, the text tower's last block at
    the last position alone and the patches as one matmul give transformers' gradients."""
    reference = hf_siglip(tmp_path, case)
    model = Model.from_pretrained(tmp_path)
    model.config.positives = "diagonal"
    pixel_values, input_ids = random_inputs(case)
    model(pixel_values, input_ids)[1].backward()
    reference(input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss.backward()
    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        expected = theirs[siglip.to_hf_name(name)].grad
        if name.endswith("in_proj.bias"):  # a key bias moves every score alike: its gradient is zero
            C = len(p) // 3
            p.grad[C : 2 * C] = expected[C : 2 * C] = 0
        elif name.endswith("k_proj.bias"):
            continue
        torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_sharded_checkpoint(tmp_path):
    reference = hf_siglip(tmp_path, "even", max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = Model.from_pretrained(tmp_path)
    pixel_values, input_ids = random_inputs("even", batch=2)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=pixel_values).logits_per_image
        torch.testing.assert_close(model(pixel_values, input_ids)[0], expected, atol=1e-4, rtol=0)


def test_older_config_layout_takes_transformers_defaults(tmp_path):
    """Configs written by older transformers leave out every value that equals the default."""
    text = dict(CASES["even"]["text"])  # without max_position_embeddings, whose default is 64
    del text["max_position_embeddings"]
    config = dict(architectures=["SiglipModel"], text_config=text, vision_config=CASES["even"]["vision"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert siglip.config_from_hf(tmp_path) == Config(
        image_size=32, patch_size=8, vision_dim=32, vision_layers=2, vision_heads=4, vision_mlp_dim=64, vocab_size=64,
        max_seq_len=64, text_dim=32, text_layers=2, text_heads=4, text_mlp_dim=64, norm_eps=1e-6)


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Model.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Model.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(architectures=["CLIPModel"])))
    with pytest.raises(ValueError, match="CLIPModel checkpoint; siglip.py loads SiglipModel"):
        Model.from_pretrained(tmp_path)
    config = dict(architectures=["SiglipModel"], text_config=dict(CASES["even"]["text"], hidden_act="gelu"),
                  vision_config=dict(CASES["even"]["vision"], vision_use_head=False))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not support activations gelu.*without its pooling head"):
        Model.from_pretrained(tmp_path)
    config = dict(architectures=["SiglipModel"], text_config=CASES["even"]["text"],
                  vision_config=CASES["even"]["vision"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        Model.from_pretrained(tmp_path)


def test_unexpected_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_siglip(tmp_path, "even")
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({**tensors, "text_model.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not have: text_model.extra.weight"):
        Model.from_pretrained(tmp_path)
    del tensors["vision_model.head.probe"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lacks the tensor vision_model.head.probe"):
        Model.from_pretrained(tmp_path)


def test_from_pretrained_builds_on_meta_and_keeps_the_files_tensors(tmp_path, monkeypatch):
    """The model is built on the meta device, where the random initialisation touches no memory, and the
    tensors read from the file become its parameters: the weights are never held twice."""
    hf_siglip(tmp_path, "even")
    load_on_meta(siglip, tmp_path, monkeypatch)


# ------------------------------------------------------------------------------------------ the loss


def loss_by_hand(image, text, t, b, captions=None):
    """-1/B sum_i sum_j log sigmoid(z_ij (t <x_i, y_j> + b)), written out with loops in float64."""
    x, y = image.detach().double().numpy(), text.detach().double().numpy()
    total = 0.0
    for i in range(len(x)):
        for j in range(len(y)):
            match = i == j if captions is None else captions[i] == captions[j]
            z = 1.0 if match else -1.0
            total -= np.log(1.0 / (1.0 + np.exp(-z * (t * (x[i] @ y[j]) + b))))
    return total / len(x)


def embeddings(n, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, dim, generator=g), dim=-1) for _ in range(2))


def test_loss_equals_the_formula_by_hand():
    image, text = embeddings(6)
    t, b = torch.tensor([7.5]), torch.tensor([-4.0])
    captions = ["red", "blue", "red", "green", "blue", "red"]
    ids = torch.tensor([[{"red": 3, "blue": 4, "green": 5}[c], 0] for c in captions])
    diagonal = sigmoid_loss(image, text, t, b)
    same_text = sigmoid_loss(image, text, t, b, ids)
    assert diagonal.item() == pytest.approx(loss_by_hand(image, text, 7.5, -4.0), rel=1e-6)
    assert same_text.item() == pytest.approx(loss_by_hand(image, text, 7.5, -4.0, captions), rel=1e-6)
    assert same_text.item() != pytest.approx(diagonal.item(), rel=1e-3)


@pytest.mark.parametrize("same_text", [False, True])
def test_blocks_equal_the_definition_in_value_and_gradients(same_text):
    """sigmoid_loss, in checkpointed blocks, against sigmoid_loss_definition on the whole matrix; the
    definition against the formula by hand. Captions 3 and 6 differ in their second token only."""
    image, text = embeddings(7)
    ids = torch.tensor([[1, 0], [2, 0], [1, 0], [3, 1], [2, 0], [1, 0], [3, 0]]) if same_text else None
    labels = torch.arange(7)[:, None] if ids is None else ids
    captions = None if ids is None else [tuple(row) for row in ids.tolist()]
    results = []
    for loss_of in (lambda x, y, t, b: sigmoid_loss_definition(x, y, t, b, labels, labels),
                    lambda x, y, t, b: sigmoid_loss(x, y, t, b, ids, chunk_size=3)):
        leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(),
                  torch.tensor([2.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)]
        x, y, t_prime, b = leaves
        loss = loss_of(x, y, t_prime.exp(), b)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in leaves]))
    assert results[0][0].item() == pytest.approx(loss_by_hand(image, text, np.exp(2.0), -3.0, captions), rel=1e-6)
    torch.testing.assert_close(results[1][0], results[0][0])
    for g, g0 in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g, g0)


def test_gather_without_torch_distributed_is_refused():
    image, text = embeddings(4)
    with pytest.raises(ValueError, match="gather=True needs torch.distributed"):
        sigmoid_loss(image, text, torch.tensor([5.0]), torch.tensor([-2.0]), gather=True)


@pytest.mark.parametrize("same_text", [False, True])
def test_chunked_loss_equals_the_full_loss_in_value_and_gradients(same_text):
    image, text = embeddings(7)
    ids = torch.tensor([[1], [2], [1], [3], [2], [1], [4]]) if same_text else None
    results = []
    for chunk_size in (3, 1, 100):  # 3 does not divide 7; 100 is one block
        leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(),
                  torch.tensor([2.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)]
        x, y, t_prime, b = leaves
        loss = sigmoid_loss(x, y, t_prime.exp(), b, ids, chunk_size)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in leaves]))
    # and plain autograd on the whole matrix at once
    leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(),
              torch.tensor([2.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)]
    x, y, t_prime, b = leaves
    labels = torch.arange(7) if ids is None else ids[:, 0]
    z = (labels[:, None] == labels[None, :]).float() * 2 - 1
    loss = -F.logsigmoid(z * (t_prime.exp() * x @ y.T + b)).sum() / 7
    loss.backward()
    results.append((loss.detach(), [p.grad for p in leaves]))
    for value, grads in results[1:]:
        torch.testing.assert_close(value, results[0][0])
        for g, g0 in zip(grads, results[0][1]):
            torch.testing.assert_close(g, g0)


TINY = dict(image_size=8, patch_size=4, vision_dim=16, vision_layers=1, vision_heads=2, vision_mlp_dim=24,
            vocab_size=20, max_seq_len=5, text_dim=12, text_layers=1, text_heads=3, text_mlp_dim=20)


def tiny_config(**overrides):
    return Config(**{**TINY, **overrides})


def test_model_loss_uses_the_configured_positives():
    torch.manual_seed(0)
    pixel_values = torch.randn(4, 3, 8, 8)
    input_ids = torch.tensor([[1, 2, 0, 0, 0], [3, 0, 0, 0, 0], [1, 2, 0, 0, 0], [4, 5, 6, 0, 0]])
    losses = {}
    for positives in ("diagonal", "same_text"):
        torch.manual_seed(0)
        model = Model(tiny_config(positives=positives))
        logits, losses[positives] = model(pixel_values, input_ids)
        captions = [tuple(row) for row in input_ids.tolist()] if positives == "same_text" else None
        t, b = model.metrics()["t"], model.metrics()["b"]
        with torch.no_grad():
            x = F.normalize(model.encode_image(pixel_values), dim=-1)
            y = F.normalize(model.encode_text(input_ids), dim=-1)
        assert losses[positives].item() == pytest.approx(loss_by_hand(x, y, t, b, captions), rel=1e-5)
        torch.testing.assert_close(logits, t * x @ y.T + b)
    assert losses["same_text"].item() != pytest.approx(losses["diagonal"].item(), rel=1e-3)
    assert model(pixel_values, input_ids, return_loss=False)[1] is None


# Run by torch.distributed.run in two processes: each takes half of the batch in batch.pt, runs the model
# under DistributedDataParallel and sigmoid_loss on half of the embeddings, both with gather=True, and
# saves losses and gradients. Then rank 0 alone computes a loss without gather: were the captions gathered
# all the same, it would wait for rank 1 until the timeout.
DDP_SCRIPT = textwrap.dedent("""
    import datetime, os, sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    sys.path.insert(0, sys.argv[1])
    import siglip

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        batch = torch.load(os.path.join(sys.argv[2], "batch.pt"))
        n = len(batch["input_ids"]) // world
        mine = {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}
        results = {}
        for positives in ("diagonal", "same_text"):
            torch.manual_seed(0)
            model = siglip.Model(siglip.Config(**TINY, positives=positives, loss_chunk_size=3))
            ddp = DistributedDataParallel(model)  # kept alive: its hooks average the gradients in backward
            _, loss = ddp(pixel_values=mine["pixel_values"], input_ids=mine["input_ids"], gather=True)
            loss.backward()
            results[positives] = (loss.detach(), {k: p.grad for k, p in model.named_parameters()})
            x = mine["image"].clone().requires_grad_()
            y = mine["text"].clone().requires_grad_()
            loss = siglip.sigmoid_loss(x, y, torch.tensor([5.0]), torch.tensor([-2.0]),
                                       mine["input_ids"] if positives == "same_text" else None, 3, gather=True)
            loss.backward()
            results[positives + " embeddings"] = (loss.detach(), {"image": x.grad, "text": y.grad})
        if rank == 0:
            results["alone"] = siglip.sigmoid_loss(mine["image"], mine["text"], torch.tensor([5.0]),
                                                   torch.tensor([-2.0]))
        torch.save(results, os.path.join(sys.argv[2], f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
""")



def test_two_processes_equal_one_with_the_whole_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    # Identical captions on both ranks: rows 0, 3 and 6 (ranks 0, 0, 1), rows 1 and 4 (ranks 0, 1).
    captions = [[1, 2], [3, 4], [5, 6], [1, 2], [3, 4], [7, 0], [1, 2], [8, 9]]
    batch = dict(pixel_values=torch.randn(8, 3, 8, 8, generator=g),
                 input_ids=torch.tensor([c + [0, 0, 0] for c in captions]),
                 image=F.normalize(torch.randn(8, 6, generator=g), dim=-1),
                 text=F.normalize(torch.randn(8, 6, generator=g), dim=-1))
    torch.save(batch, tmp_path / "batch.pt")
    (tmp_path / "ddp.py").write_text(f"TINY = {TINY!r}\n" + DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "ddp.py"), str(ROOT), str(tmp_path)],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for positives in ("diagonal", "same_text"):
        torch.manual_seed(0)
        model = Model(tiny_config(positives=positives))
        _, loss = model(batch["pixel_values"], batch["input_ids"])
        loss.backward()
        # The mean of the ranks' losses is the loss of the whole batch; DDP's averaged gradients are its gradients.
        torch.testing.assert_close((ranks[0][positives][0] + ranks[1][positives][0]) / 2, loss.detach())
        for name, p in model.named_parameters():
            for r in range(2):
                torch.testing.assert_close(ranks[r][positives][1][name], p.grad, atol=1e-6, rtol=1e-4,
                                           msg=lambda m: f"{name}: {m}")
        # The same for the loss alone: a rank's gradients, averaged over ranks as DDP would, are the
        # whole batch's gradients of its own rows.
        x, y = batch["image"].clone().requires_grad_(), batch["text"].clone().requires_grad_()
        ids = batch["input_ids"] if positives == "same_text" else None
        loss = sigmoid_loss(x, y, torch.tensor([5.0]), torch.tensor([-2.0]), ids)
        loss.backward()
        results = [ranks[r][positives + " embeddings"] for r in range(2)]
        torch.testing.assert_close((results[0][0] + results[1][0]) / 2, loss.detach())
        for key, full in (("image", x.grad), ("text", y.grad)):
            torch.testing.assert_close(torch.cat([results[r][1][key] for r in range(2)]) / 2, full)
    alone = sigmoid_loss(batch["image"][:4], batch["text"][:4], torch.tensor([5.0]), torch.tensor([-2.0]))
    torch.testing.assert_close(ranks[0]["alone"], alone)


# ------------------------------------------------------------------------------------- preprocessing


def photo(width, height, seed=0):
    """A photograph-like RGB picture: smooth gradients, shapes, and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([200 * xx + 40, 180 * yy + 30, 120 * (xx * yy) + 60 * np.sin(9 * xx)], -1)
    pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape) + 60, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    pen = ImageDraw.Draw(image)
    pen.ellipse((width // 5, height // 4, width // 2, 3 * height // 4), fill=(230, 40, 30))
    pen.rectangle((width // 2, height // 6, 5 * width // 6, height // 2), fill=(20, 90, 200))
    return image


def processor(size):
    return transformers.SiglipImageProcessor(size={"height": size, "width": size})


@pytest.mark.parametrize("width,height,size", [(57, 43, 32), (120, 30, 30), (20, 95, 48), (224, 160, 64)])
def test_preprocess_equals_siglip_image_processor(width, height, size):
    image = photo(width, height)
    expected = processor(size)(image, return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(preprocess(image, size), expected, atol=1e-6, rtol=0)


def test_transparency_palette_grey_and_cmyk_follow_the_reference():
    rgba = photo(50, 40).convert("RGBA")
    alpha = np.zeros((40, 50), dtype=np.uint8)
    alpha[:, 25:] = 255
    alpha[:20, :25] = 128
    rgba.putalpha(Image.fromarray(alpha))
    palette = photo(50, 40).quantize(8, dither=Image.Dither.NONE)
    palette.info["transparency"] = 3
    images = [rgba, rgba.convert("LA"), palette, photo(50, 40).convert("L"), photo(50, 40).convert("CMYK"),
              photo(50, 40).convert("1")]
    expected = processor(24)(images, return_tensors="pt").pixel_values
    torch.testing.assert_close(preprocess(images, 24), expected, atol=1e-6, rtol=0)
    # fully transparent pixels become white
    assert preprocess(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), 8).eq(1).all()


def test_one_picture_in_every_mode_gives_one_tensor():
    rgb = photo(64, 48).quantize(12, dither=Image.Dither.NONE).convert("RGB")  # few colours: a palette keeps them all
    expected = preprocess(rgb, 32)
    for image in (rgb.convert("RGBA"), rgb.quantize(12, dither=Image.Dither.NONE), rgb.convert("RGBX")):
        torch.testing.assert_close(preprocess(image, 32), expected, atol=0, rtol=0)
    grey = rgb.convert("L")
    expected = preprocess(grey.convert("RGB"), 32)
    torch.testing.assert_close(preprocess(grey, 32), expected, atol=0, rtol=0)
    torch.testing.assert_close(preprocess(grey.convert("LA"), 32), expected, atol=0, rtol=0)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    rng = np.random.default_rng(0)
    deep = (np.linspace(0, 65535, 40 * 30).reshape(30, 40) + rng.normal(0, 300, (30, 40))).clip(0, 65535)
    deep = deep.astype(np.uint16)
    eight_bit = Image.fromarray(np.round(deep / 257).astype(np.uint8))
    expected = preprocess(eight_bit, 16)
    for image in (Image.fromarray(deep), Image.fromarray(deep.astype(np.int32))):
        assert image.mode in ("I;16", "I")
        torch.testing.assert_close(preprocess(image, 16), expected, atol=0, rtol=0)
    # An I image of 8-bit values stays as it is; floats are on the 0..255 scale.
    torch.testing.assert_close(preprocess(eight_bit.convert("I"), 16), expected, atol=0, rtol=0)
    torch.testing.assert_close(preprocess(eight_bit.convert("F"), 16), expected, atol=0, rtol=0)


def test_preprocess_batches_lists():
    images = [photo(40, 30, seed=s) for s in range(3)]
    batch = preprocess(images, 16)
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[2], preprocess(images[2], 16))


# ------------------------------------------------------------------------------------- the rest


@pytest.mark.parametrize("bad", [
    dict(vision_dim=-5), dict(text_heads=0), dict(vision_dim=64, vision_heads=5), dict(text_dim=30, text_heads=4),
    dict(image_size=30, patch_size=8), dict(patch_size=0), dict(max_seq_len=0), dict(vocab_size=2.5),
    dict(text_layers=True), dict(norm_eps=0.0), dict(norm_eps="1e-6"), dict(positives="all"),
    dict(loss_chunk_size=0), dict(vision_mlp_dim=None),
])
def test_bad_configs_raise_value_error(bad):
    with pytest.raises(ValueError):
        Config(**bad)


def test_wrong_inputs_get_clear_errors():
    model = Model(tiny_config())
    with pytest.raises(ValueError, match=r"shape \(batch, 3, 8, 8\)"):
        model.encode_image(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="padded to max_seq_len"):
        model.encode_text(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        model.encode_text(torch.zeros(2, 5))


def test_classify_gives_a_distribution_in_the_sigmoid_ranking():
    torch.manual_seed(0)
    model = Model(tiny_config())
    pixel_values, labels = torch.randn(3, 3, 8, 8), torch.randint(0, 20, (6, 5))
    probs = model.classify(pixel_values, labels)
    assert probs.shape == (3, 6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    with torch.no_grad():
        image = F.normalize(model.encode_image(pixel_values), dim=-1)
        text = F.normalize(model.encode_text(labels), dim=-1)
    logits = model.logit_scale.exp() * image @ text.T + model.logit_bias
    assert torch.equal(probs.argsort(-1), logits.sigmoid().argsort(-1))


def test_paper_initialisation_and_metrics():
    model = Model(tiny_config())
    assert model.logit_scale.item() == pytest.approx(np.log(10)) and model.logit_bias.item() == -10
    pixel_values, input_ids = torch.randn(4, 3, 8, 8), torch.randint(0, 20, (4, 5))
    model(pixel_values, input_ids)
    metrics = model.metrics()
    assert set(metrics) == {"t", "b", "gap", "acc"} and metrics["t"] == pytest.approx(10) and metrics["b"] == -10
    # A collapsed model, every image and every caption on one vector, shows a gap of zero.
    with torch.no_grad():
        for linear in (model.vision_head.out_proj, model.vision_head.mlp.fc2, model.text.head):
            linear.weight.zero_()
            linear.bias.fill_(1.0)
    logits, _ = model(pixel_values, input_ids)
    torch.testing.assert_close(logits, torch.zeros(4, 4))  # t + b with t = 10, b = -10
    assert model.metrics()["gap"] == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize("positives", ["diagonal", "same_text"])
def test_training_forward_compiles_without_graph_breaks(positives):
    """A forward with its loss, blocks and all, is one graph for torch.compile: nothing in it waits on a
    value of the device (torch.unique, .item(), a data-dependent branch)."""
    model = Model(tiny_config(positives=positives, loss_chunk_size=3))
    pixel_values, input_ids = torch.randn(7, 3, 8, 8), torch.randint(0, 20, (7, 5))
    explanation = torch._dynamo.explain(model)(pixel_values, input_ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_flops_per_token_counts_every_matmul():
    """Against torch's FLOP counter on a forward and backward of both towers (the math attention kernel,
    whose matmuls it can see; pixels that need a gradient, so the patch projection costs 6 per weight).
    Per pair: the counts of two batch sizes differ by two pairs, and what runs once per batch (the
    MAP head's query) drops out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = Model(tiny_config(image_size=12, patch_size=3, text_layers=2))

    def count(batch):
        pixel_values, input_ids = torch.randn(batch, 3, 12, 12, requires_grad=True), torch.randint(0, 20, (batch, 5))
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):
            (model.encode_image(pixel_values).sum() + model.encode_text(input_ids).sum()).backward()
        return counter.get_total_flops()

    assert count(5) - count(3) == 2 * model.flops_per_token()
