"""Preparing a large corpus: wall time and peak memory of every process, and encoding throughput
against tiktoken in the same number of processes.

    python bench/prepare.py [--copies 10] [--workers 2] [--vocab-size 2048] [--no-whole]

The corpus is the standard library's *.py files, `copies` times, written as one .txt file per
top-level package into a temporary folder (about 32 MB a copy, site-packages left out), so corpus.py streams it into shards.
Each preparation runs in a fresh process with an empty cache; ru_maxrss of RUSAGE_SELF is the main
process's peak and that of RUSAGE_CHILDREN the largest peak of any worker. Unless --no-whole, the same
corpus also goes, in a fresh process, through the path that small corpora still take and that every
corpus took before shards: read whole into one string, the tokenizer trained on all of its training
split, each split encoded as one list of ids (about 8 GB of memory for the default corpus).
"""

import argparse
import multiprocessing
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PREPARE = """
import resource, sys, time
sys.path.insert(0, {root!r})
from llm_machinery import data
t = time.perf_counter()
pipe = data.CausalLM({folder!r}, vocab_size={vocab}, workers={workers})
wall = time.perf_counter() - t
self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(wall, self_mb, child_mb, len(pipe.train_tokens) + len(pipe.val_tokens))
"""

WHOLE = """
import resource, sys, time
sys.path.insert(0, {root!r})
from llm_machinery import corpus
t = time.perf_counter()
train_text, val_text = corpus.split_text(corpus.read_text({folder!r}))
tokenizer, key = corpus.train_tokenizer(train_text, {vocab})
tokens = len(corpus.token_file(tokenizer, key, train_text)) + len(corpus.token_file(tokenizer, key, val_text))
wall = time.perf_counter() - t
print(wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0, tokens)
"""


def write_corpus(folder, copies):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    groups = {}
    for p in files:
        groups.setdefault(p.relative_to(stdlib).parts[0].removesuffix(".py"), []).append(p)
    total = 0
    for copy in range(copies):
        for name, paths in groups.items():
            text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in paths)
            (folder / f"{copy}-{name}.txt").write_text(text, encoding="utf-8")
            total += len(text.encode())
    return total


_encoder = None


def _start(kind, tokenizer_dir):
    global _encoder
    import bpe

    tok = bpe.Tokenizer.load(tokenizer_dir)
    if kind == "tiktoken":
        import tiktoken

        ranks = {tok.decode_bytes([i]): i for i in range(tok.n_vocab) if i not in tok.special_tokens.values()}
        tok = tiktoken.Encoding("bench", pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens={})
    _encoder = tok


def _encode(text):
    return len(_encoder.encode_ordinary(text))


def encode_rate(kind, tokenizer_dir, docs, workers, n_bytes):
    with multiprocessing.get_context("fork").Pool(workers, _start, (kind, tokenizer_dir)) as pool:
        pool.map(_encode, docs[:workers])  # started and warm
        t = time.perf_counter()
        tokens = sum(pool.imap(_encode, docs, chunksize=1))
        return n_bytes / (time.perf_counter() - t) / 1e6, tokens


def prepare(template, folder, cache, args):
    """(seconds, peak MB of the process, largest peak MB of its children, tokens) of a preparation in a
    fresh process with an empty cache."""
    env = {**os.environ, "LLMS_FROM_SCRATCH_CACHE": str(cache)}
    code = template.format(root=str(ROOT), folder=str(folder), vocab=args.vocab_size, workers=args.workers)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    wall, self_mb, child_mb, tokens = out.stdout.split()
    return float(wall), float(self_mb), float(child_mb), int(tokens)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--no-whole", action="store_true", help="skip the whole-string path (minutes, about 8 GB)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "corpus", Path(tmp) / "cache"
        folder.mkdir()
        n_bytes = write_corpus(folder, args.copies)
        print(f"corpus: {n_bytes / 1e6:,.0f} MB in {len(list(folder.iterdir()))} files", flush=True)
        if not args.no_whole:
            wall, self_mb, _, tokens = prepare(WHOLE, folder, Path(tmp) / "cache-whole", args)
            print(f"whole-string path, one process: {wall:.1f} s, {tokens:,} tokens, peak RSS {self_mb:,.0f} MB",
                  flush=True)
        wall, self_mb, child_mb, tokens = prepare(PREPARE, folder, cache, args)
        print(f"streamed into shards, tokenizer training included: {wall:.1f} s, {tokens:,} tokens, peak RSS "
              f"main {self_mb:,.0f} MB, largest worker {child_mb:,.0f} MB", flush=True)

        os.environ["LLMS_FROM_SCRATCH_CACHE"] = str(cache)
        from llm_machinery import corpus

        tokenizer_dir = next((cache / "tokenizers").iterdir())
        all_docs = list(corpus.documents(str(folder)))
        docs = all_docs[: len(all_docs) // args.copies]  # one copy, held in memory for both encoders
        doc_bytes = sum(len(d.encode()) for d in docs)
        ours, _ = encode_rate("bpe", tokenizer_dir, docs, args.workers, doc_bytes)
        theirs, _ = encode_rate("tiktoken", tokenizer_dir, docs, args.workers, doc_bytes)
        print(f"encoding one copy ({doc_bytes / 1e6:,.0f} MB) in {args.workers} processes: bpe.py {ours:.1f} MB/s, "
              f"tiktoken {theirs:.1f} MB/s, ratio {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
