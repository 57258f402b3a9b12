"""Training and decoding speed of paligemma.py against transformers' PaliGemmaForConditionalGeneration, both
on the same weights, in one run.

    python bench/paligemma.py [--repeats 10] [--threads 1] [--shapes recipe,vit-s] [--accuracy]

Prints a markdown table with two rows per shape, ours against transformers with its default attention
(sdpa) and with eager attention:
- training: examples/s of one training step (vision tower, projector and decoder over [image][prefix]
  [suffix], the suffix-only cross-entropy, backward, AdamW). transformers gets the same sequence with
  image placeholder tokens in front, token_type_ids 0 over image and prefix (its bidirectional block)
  and 1 over the suffix, and labels that are -100 except on suffix tokens; its loss shifts them by one
  and averages over the rest, which is ours: paligemma.suffix_targets scores the same tokens;
- decoding: new tokens/s of greedy generation of n tokens for a batch of images and prompts (prompt pass
  included), our generate against transformers' generate(do_sample=False) with eos turned off, so that
  both write exactly n tokens; the note says whether the tokens agree.
Shapes:
- recipe: paligemma.TRAIN_RECIPE, what `python train.py --model paligemma` trains (32x32 images in 4x4
  patches: 64 image tokens, width 64 and 2 layers in each tower, 32 text tokens, vocabulary 512,
  batch 32); best of --repeats;
- vit-s: 224x224 images in 16x16 patches (196 image tokens), a vision tower of width 192 (3 heads,
  4 layers), a decoder of width 256 (4 heads of 64, one key-value head, 4 layers), 64 text tokens,
  vocabulary 16384, batch 8; best of 3 (a training step takes seconds).
Targets: ours >= 1.2x transformers (sdpa) for training, >= 2x for decoding.

The weights are transformers' initialisation with random norms and biases, and the decoder's matrices
and the embeddings drawn wider, as tests/test_paligemma.py does: with the default ones every row
greedily repeats one token, which could not tell whether the two decoders agree. transformers runs with
use_cache=False in training (a training loop has no use for its cache).

With --accuracy, the benchmark also runs `python train.py --model paligemma` (the default run, about
5 minutes) into a temporary folder and prints the validation accuracies of its last evaluation.

The contenders take turns and each number is the best of its turns: on shared cores noise only ever
slows a run down. --threads defaults to 1 because on cores that other processes also use, a second
thread makes every timing swing by several times; on an idle machine try --threads 2.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import paligemma  # noqa: E402
from timing import best_times, chosen_shapes, quiet_transformers  # noqa: E402


CONTENDERS = ("ours", "transformers sdpa", "transformers eager")


def shapes():
    """Our config, batch size, prefix lengths of the training rows (lowest, highest), prompt length of
    decoding and repeats (None: --repeats) of each shape."""
    r = paligemma.TRAIN_RECIPE
    recipe = dict(config=dict(r["config"], vocab_size=r["vocab_size"]), batch=r["batch_size"], prefix=(4, 12),
                  prompt=8, repeats=None)
    vit_s = dict(
        config=dict(image_size=224, patch_size=16, vision_dim=192, vision_layers=4, vision_heads=3,
                    vision_mlp_dim=768, vocab_size=16384, dim=256, n_layers=4, n_heads=4, n_kv_heads=1, head_dim=64,
                    ffn_dim=1024, max_seq_len=196 + 64),
        batch=8, prefix=(8, 24), prompt=16, repeats=3,
    )
    return {"recipe": recipe, "vit-s": vit_s}


def hf_config(c, transformers):
    """transformers' PaliGemmaConfig of our Config c, as tests/test_paligemma.py builds it: the image
    placeholder id is vocab_size, outside the text vocabulary, as in the released models."""
    text = dict(model_type="gemma", vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
                num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                rope_parameters=dict(rope_type="default", rope_theta=c.rope_theta))
    vision = dict(hidden_size=c.vision_dim, intermediate_size=c.vision_mlp_dim, num_hidden_layers=c.vision_layers,
                  num_attention_heads=c.vision_heads, image_size=c.image_size, patch_size=c.patch_size,
                  vision_use_head=False, layer_norm_eps=c.vision_eps)
    return transformers.PaliGemmaConfig(text_config=text, vision_config=vision, projection_dim=c.dim,
                                        image_token_index=c.vocab_size)


def widen(model):
    """Random norms and biases, and decoder matrices and embeddings drawn wider than transformers'
    initialisation (std 0.02): the test's recipe, with the std of a matrix 3 / sqrt(input width), the
    smallest of 1.4 (the test's), 2, 2.5, 3 and 4 with which the greedy rows at vit-s write mostly
    distinct tokens instead of repeating one."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(-0.5, 0.5) if "language_model" in name else p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "embed_tokens" in name:
                p.normal_(0.0, 0.3)
            elif "language_model" in name:
                p.normal_(0.0, 3.0 / p.shape[1] ** 0.5)


def rate(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def bench_shape(name, shape, repeats, transformers):
    """(examples/s of training, new tokens/s of decoding) of each contender, and a line about the shape."""
    c = paligemma.Config(**shape["config"])
    torch.manual_seed(0)
    theirs = transformers.PaliGemmaForConditionalGeneration(hf_config(c, transformers))
    widen(theirs)
    theirs.set_attn_implementation("sdpa")
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        models = {"ours": paligemma.Model.from_pretrained(folder), "transformers sdpa": theirs,
                  "transformers eager": transformers.PaliGemmaForConditionalGeneration.from_pretrained(
                      folder, attn_implementation="eager")}
    B, S, N = shape["batch"], c.image_size, c.n_image_tokens
    T = c.max_seq_len - N
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.rand(B, 3, S, S, generator=g) * 2 - 1

    # Training: [image][bos, prefix, "\n"][suffix], no padding; prefix lengths differ between rows.
    ids = torch.randint(0, c.vocab_size, (B, T), generator=g)
    lo, hi = shape["prefix"]
    prefix_len = torch.randint(lo, hi + 1, (B,), generator=g)
    targets = paligemma.suffix_targets(ids, prefix_len)
    full = torch.cat([torch.full((B, N), c.vocab_size), ids], dim=1)
    token_type_ids = (torch.arange(N + T)[None] >= N + prefix_len[:, None]).long()
    labels = full.masked_fill(token_type_ids == 0, -100)  # transformers shifts them: position p predicts p + 1

    def loss_of(key):
        if key == "ours":
            return models[key](pixel_values, ids, prefix_len, targets)[1]
        return models[key](input_ids=full, pixel_values=pixel_values, token_type_ids=token_type_ids, labels=labels,
                           use_cache=False).loss

    with torch.no_grad():  # the same model on both sides, before any step
        for m in models.values():
            m.eval()
        gap = (loss_of("ours") - loss_of("transformers sdpa")).abs().item()

    # Decoding: a prompt of equal length in every row, then exactly n new tokens.
    P = shape["prompt"]
    n = T - P
    prompt = ids[:, :P]
    hf_prompt = full[:, : N + P]

    def ours_generate():
        return models["ours"].generate(pixel_values, prompt, n, temperature=0)[:, P:]

    def theirs_generate(key):
        with torch.no_grad():
            out = models[key].generate(input_ids=hf_prompt, pixel_values=pixel_values,
                                       token_type_ids=torch.zeros_like(hf_prompt),
                                       attention_mask=torch.ones_like(hf_prompt), max_new_tokens=n,
                                       min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, N + P:]

    mine, reference = ours_generate(), theirs_generate("transformers sdpa")
    agree = mine.shape == reference.shape == (B, n) and torch.equal(mine, reference)
    distinct = sum(len(row.unique()) for row in mine) / B

    decode = [ours_generate if k == "ours" else lambda k=k: theirs_generate(k) for k in models]
    count = shape["repeats"] or repeats
    decode_rates = {k: B * n / t for k, t in zip(models, best_times(decode, count))}

    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}

    def step(key):
        loss_of(key).backward()
        optimizers[key].step()
        optimizers[key].zero_grad(set_to_none=True)

    for m in models.values():
        m.train()
    train_rates = {k: B / t for k, t in zip(models, best_times([lambda k=k: step(k) for k in models], count))}
    note = (f"{name}: {models['ours'].num_params():,} parameters, batch {B}, {S}x{S} images in {c.patch_size}x"
            f"{c.patch_size} patches ({N} image tokens), {T} text tokens (prefixes of {lo}-{hi}); decoding {n} new "
            f"tokens after a prompt of {P}; best of {count}; |loss ours - transformers| = {gap:.1e}; greedy tokens "
            f"{'agree' if agree else 'DIFFER'} ({distinct:.0f} distinct of {n} per row on average)")
    return (train_rates, decode_rates), note


def accuracy():
    """The validation accuracies at the end of the default `python train.py --model paligemma` run."""
    with tempfile.TemporaryDirectory() as out:
        # train.py's own log goes to stderr, so that stdout stays the benchmark's.
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "paligemma", "--out", out], cwd=ROOT,
                       check=True, stdout=sys.stderr)
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    last = [r for r in records if "val_accuracy" in r][-1]
    return last["step"], {k: v for k, v in last.items() if k.startswith("val_accuracy")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", default="recipe,vit-s", help="comma-separated: recipe, vit-s")
    parser.add_argument("--accuracy", action="store_true",
                        help="also run `python train.py --model paligemma` (about 5 minutes) and print its accuracies")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers = quiet_transformers()
    all_shapes = shapes()
    names = chosen_shapes(parser, args.shapes, all_shapes)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} "
          f"thread(s); training steps (forward, suffix loss, backward, AdamW) in examples/s, greedy decoding in "
          f"new tokens/s; targets: ours / sdpa >= 1.2x (training), >= 2x (decoding)\n")
    print("| shape | measure | ours | transformers sdpa | transformers eager | ours / sdpa | ours / eager |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    notes = []
    for name in names:
        results, note = bench_shape(name, all_shapes[name], args.repeats, transformers)
        notes.append(note)
        for measure, r in zip(("training", "decoding"), results):
            ours, sdpa, eager = r["ours"], r["transformers sdpa"], r["transformers eager"]
            print(f"| {name} | {measure} | {' | '.join(rate(r[k]) for k in CONTENDERS)} | **{ours / sdpa:.2f}x** "
                  f"| {ours / eager:.2f}x |", flush=True)
    print("\n" + "\n".join(notes), flush=True)
    if args.accuracy:
        step, accuracies = accuracy()
        print(f"\n`python train.py --model paligemma`, last evaluation (step {step}): "
              + ", ".join(f"{k} {v:.3f}" for k, v in accuracies.items()))


if __name__ == "__main__":
    main()
