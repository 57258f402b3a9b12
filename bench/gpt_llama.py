"""Speed of gpt_llama.py against transformers' LlamaForCausalLM, both on the same weights, in one run.

    python bench/gpt_llama.py [--repeats 5] [--threads 1]

Prints tokens/s and ratios, at the size of gpt_llama.TRAIN_RECIPE, for:
- a training step (forward, backward, AdamW), ours against transformers';
- greedy decoding at batch 1, our generate against transformers' generate;
- our decoding with the KV cache against recomputing the whole sequence for every new token, once the
  sequence is 128, 512 and 1024 tokens long (the rate of the next 32 tokens).
Targets: training >= 1x transformers, decoding >= 2x transformers, cache >= 5x uncached at 512.

The contenders take turns and each number is the best of --repeats turns: on shared cores noise only
ever slows a run down. --threads defaults to 1 because on cores that other processes also use, a
second thread makes every timing swing by several times; on an idle machine try --threads 2.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpt_llama  # noqa: E402
from timing import best_times  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    recipe = gpt_llama.TRAIN_RECIPE
    c = recipe["config"]
    vocab, context = recipe["vocab_size"], c["max_seq_len"]
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=c["dim"], intermediate_size=c["ffn_dim"], num_hidden_layers=c["n_layers"],
        num_attention_heads=c["n_heads"], num_key_value_heads=c["n_kv_heads"], max_position_embeddings=1024 + 64,
        tie_word_embeddings=True, rms_norm_eps=1e-5, attn_implementation="sdpa",
    )
    theirs = transformers.LlamaForCausalLM(hf_config)
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = gpt_llama.Model.from_pretrained(folder)
    print(f"config {c}, vocab {vocab}: {ours.num_params():,} parameters; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} thread(s), best of {args.repeats}")

    batch = 8
    idx = torch.randint(0, vocab, (batch, context + 1))
    optimizers = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (ours, theirs)}

    def train_step(model):
        if model is ours:
            loss = ours(idx[:, :-1], idx[:, 1:])[1]
        else:  # transformers shifts the labels itself
            loss = theirs(input_ids=idx[:, :-1], labels=idx[:, :-1]).loss
        loss.backward()
        optimizers[model].step()
        optimizers[model].zero_grad(set_to_none=True)

    ours.train(), theirs.train()
    t_ours, t_theirs = best_times([lambda: train_step(ours), lambda: train_step(theirs)], args.repeats)
    tokens = batch * context
    print(f"train step, batch {batch} x {context}: ours {tokens / t_ours:,.0f} tokens/s, "
          f"transformers {tokens / t_theirs:,.0f} tokens/s, ratio {t_theirs / t_ours:.2f}x (target >= 1)")

    ours.eval(), theirs.eval()
    prompt, n = torch.randint(0, vocab, (1, 16)), 128

    def theirs_generate():
        with torch.no_grad():
            theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                            eos_token_id=None, pad_token_id=0)

    t_ours, t_theirs = best_times([lambda: ours.generate(prompt, n, temperature=0), theirs_generate], args.repeats)
    print(f"greedy decode, batch 1, prompt 16, {n} new tokens: ours {n / t_ours:,.0f} tokens/s, "
          f"transformers {n / t_theirs:,.0f} tokens/s, ratio {t_theirs / t_ours:.2f}x (target >= 2)")

    window = 32
    for length in (128, 512, 1024):
        start_ids = torch.randint(0, vocab, (1, length - window))
        stream = None

        def prefill():  # the prompt's pass happens at the first step, before the clock starts
            nonlocal stream
            stream = ours.generate_stream(start_ids, window + 1, temperature=0)
            next(stream)

        def cached():
            for _ in stream:
                pass

        def uncached():
            seq = start_ids
            with torch.no_grad():
                for _ in range(window):
                    logits, _ = ours(seq)
                    seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)

        t_cached, t_uncached = best_times([cached, uncached], args.repeats, setup=prefill)
        print(f"decode at {length:4d} tokens: cached {window / t_cached:,.0f} tokens/s, "
              f"uncached {window / t_uncached:,.0f} tokens/s, ratio {t_uncached / t_cached:.1f}x"
              + (" (target >= 5)" if length == 512 else ""))


if __name__ == "__main__":
    main()
