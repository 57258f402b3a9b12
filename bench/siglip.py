"""Training speed of siglip.py against transformers' SiglipModel, both on the same weights, in one run.

    python bench/siglip.py [--repeats 10] [--threads 1] [--shapes recipe,vit-ti]

Prints a markdown table of image-text pairs per second for one training step (both towers, the
sigmoid loss, backward, AdamW), ours against transformers' SiglipModel(return_loss=True) with its
default attention (sdpa) and with eager attention, at two shapes:
- recipe: siglip.TRAIN_RECIPE, what `python train.py --model siglip` trains (32x32 images in 4x4
  patches, width 64, 2 vision layers and 1 text layer, 16 tokens, batch 64); best of --repeats;
- vit-ti: a ViT-Ti-like vision tower (224x224 images in 16x16 patches, width 192, 3 heads, 12
  layers) and a text tower of the same width (64 tokens, 12 layers), batch 32; best of 4, ours and
  transformers sdpa only (a step takes seconds).
Target: ours >= 1.2x transformers (sdpa).

Both sides run the same kernels (MKL matmuls, the CPU flash attention, tanh GELU); ours does less
work: the pooling head never projects the patches to keys and values, the text tower's last block
computes only the pooled position, and the patches are embedded by one matmul that leaves them
contiguous (see siglip.py). Ours runs with positives="diagonal", the loss transformers computes; the
"same_text" column with positives="same_text", where an image also matches every caption of the batch
with the same token ids as its own.

The contenders take turns and each number is the best of its turns: on shared cores noise only ever
slows a run down. --threads defaults to 1 because on cores that other processes also use, a second
thread makes every timing swing by several times; on an idle machine try --threads 2.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import siglip  # noqa: E402
from timing import best_times, chosen_shapes, quiet_transformers  # noqa: E402


CONTENDERS = ("ours", "ours (same_text)", "transformers sdpa", "transformers eager")


def shapes():
    """transformers' text and vision configs, batch size, repeats (None: --repeats) and contenders of each
    shape."""
    r = siglip.TRAIN_RECIPE
    c = r["config"]
    # No bos / eos ids: transformers' defaults (49406, 49407) lie outside these vocabularies.
    text = dict(bos_token_id=None, eos_token_id=None)
    recipe = dict(
        vision=dict(image_size=c["image_size"], patch_size=c["patch_size"], hidden_size=c["vision_dim"],
                    num_hidden_layers=c["vision_layers"], num_attention_heads=c["vision_heads"],
                    intermediate_size=c["vision_mlp_dim"]),
        text=dict(text, vocab_size=r["vocab_size"], max_position_embeddings=c["max_seq_len"],
                  hidden_size=c["text_dim"], num_hidden_layers=c["text_layers"], num_attention_heads=c["text_heads"],
                  intermediate_size=c["text_mlp_dim"], projection_size=c["vision_dim"]),
        batch=r["batch_size"], repeats=None, contenders=CONTENDERS,
    )
    vit_ti = dict(
        vision=dict(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                    intermediate_size=768),
        text=dict(text, vocab_size=32000, max_position_embeddings=64, hidden_size=192, num_hidden_layers=12,
                  num_attention_heads=3, intermediate_size=768, projection_size=192),
        batch=32, repeats=4, contenders=("ours", "transformers sdpa"),
    )
    return {"recipe": recipe, "vit-ti": vit_ti}


def rate(x):
    return "-" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def ratio(a, b):
    return "-" if None in (a, b) else f"{a / b:.2f}x"


def bench_shape(name, shape, repeats, transformers):
    """Pairs per second of each contender, and a line about the shape."""
    torch.manual_seed(0)
    config = transformers.SiglipConfig(text_config=shape["text"], vision_config=shape["vision"])
    theirs = transformers.SiglipModel(config)
    theirs.set_attn_implementation("sdpa")
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        models = {"ours": siglip.Model.from_pretrained(folder), "transformers sdpa": theirs}
        if "ours (same_text)" in shape["contenders"]:
            models["ours (same_text)"] = siglip.Model.from_pretrained(folder)
        if "transformers eager" in shape["contenders"]:
            models["transformers eager"] = transformers.SiglipModel.from_pretrained(folder, attn_implementation="eager")
    models["ours"].config.positives = "diagonal"  # transformers' loss
    if "ours (same_text)" in models:
        models["ours (same_text)"].config.positives = "same_text"
    B, S, T = shape["batch"], shape["vision"]["image_size"], shape["text"]["max_position_embeddings"]
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.rand(B, 3, S, S, generator=g) * 2 - 1
    input_ids = torch.randint(0, shape["text"]["vocab_size"], (B, T), generator=g)
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}

    def loss_of(key):
        if key.startswith("ours"):
            return models[key](pixel_values, input_ids)[1]
        return models[key](input_ids=input_ids, pixel_values=pixel_values, return_loss=True).loss

    with torch.no_grad():  # the same model on both sides, before any step
        gap = (loss_of("ours") - loss_of("transformers sdpa")).abs().item()

    def step(key):
        loss_of(key).backward()
        optimizers[key].step()
        optimizers[key].zero_grad(set_to_none=True)

    for m in models.values():
        m.train()
    n = shape["repeats"] or repeats
    times = best_times([lambda k=k: step(k) for k in models], n)
    note = (f"{name}: {models['ours'].num_params():,} parameters, batch {B}, {S}x{S} images, {T} tokens, "
            f"best of {n}; |loss ours - transformers| = {gap:.1e}")
    rates = {k: B / t for k, t in zip(models, times)}
    return {k: rates.get(k) for k in CONTENDERS}, note


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", default="recipe,vit-ti", help="comma-separated: recipe, vit-ti")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers = quiet_transformers()
    all_shapes = shapes()
    names = chosen_shapes(parser, args.shapes, all_shapes)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} "
          f"thread(s); training steps (forward, sigmoid loss, backward, AdamW) in image-text pairs/s\n")
    print("| shape | ours | ours (same_text) | transformers sdpa | transformers eager | ours / sdpa | ours / eager |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    notes = []
    for name in names:
        r, note = bench_shape(name, all_shapes[name], args.repeats, transformers)
        notes.append(note)
        ours, sdpa, eager = r["ours"], r["transformers sdpa"], r["transformers eager"]
        print(f"| {name} | {' | '.join(rate(r[k]) for k in CONTENDERS)} | **{ratio(ours, sdpa)}** "
              f"| {ratio(ours, eager)} |", flush=True)
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
