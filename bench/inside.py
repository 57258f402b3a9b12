"""What sample.py --show costs: recording and drawing against a plain forward and the same drawing.

    python bench/inside.py [--repeats 3] [--threads 1] [--tokens 64]

At Llama 3.2 1B's shape (random weights, float32, 1.24B parameters) and 64 tokens: a plain forward against
inside.look_at_text, which runs the same forward while recording every head's weights and reads the
logit lens through the 128k-token head at each layer (the two take turns, best of --repeats), and the
drawing of the pictures (16 layers of 32 heads, next tokens, logit lens; best of 2). Prints each, and
the ratio of --show (recording + drawing) to a plain forward + the same drawing; target: at most 2x.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpt_llama  # noqa: E402
from llm_machinery import inside, pictures  # noqa: E402
from timing import best_times, timed  # noqa: E402

LLAMA_32_1B = dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                   max_seq_len=2048, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True,
                   rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192))


class Words:
    """Token labels of a typical length, for a model with no tokenizer."""

    def decode_bytes(self, ids):
        return b"".join(b" w%d" % (i % 1000) for i in ids)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = gpt_llama.Model(gpt_llama.Config(**LLAMA_32_1B))
    # Random weights, small enough that the softmax stays finite; no need for the model's own init.
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.output.weight = model.tok_embeddings.weight
    for module in model.modules():
        if isinstance(module, gpt_llama.RMSNorm):
            module.weight.data.fill_(1.0)
    model.rope_cos, model.rope_sin = gpt_llama.rope_tables(64, 2048, 500000.0, LLAMA_32_1B["rope_scaling"])
    model.eval()
    print(f"{model.num_params() / 1e9:.2f}B parameters, {args.tokens} tokens, {args.threads} thread(s)")
    ids = torch.randint(0, 128256, (args.tokens,)).tolist()
    tokenizer = Words()
    arrays = inside.look_at_text(model, tokenizer, ids)
    pictures.require_matplotlib()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)

        def plain():
            with torch.no_grad():
                model(torch.tensor([ids]))

        def record():
            inside.look_at_text(model, tokenizer, ids)

        # The drawing is the same in both and takes minutes at this shape, so it is timed on its own, and
        # the two forwards take turns.
        t_plain, t_record = best_times([plain, record], args.repeats)
        draw = min(timed(lambda: pictures.draw_text(arrays, folder, "bench")) for _ in range(2))
        size = sum(os.path.getsize(p) for p in folder.iterdir()) / 2**20
    print(f"drawing: {draw:.1f} s ({size:.1f} MiB of PNGs)")
    print(f"plain forward: {t_plain:.1f} s; --show's recording, with the logit lens: {t_record:.1f} s")
    print(f"plain forward + drawing: {t_plain + draw:.1f} s; --show: {t_record + draw:.1f} s; "
          f"ratio {(t_record + draw) / (t_plain + draw):.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
