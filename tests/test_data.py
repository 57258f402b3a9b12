"""corpus.py and data.py: corpus sources, caches, the deterministic sharded batch stream, and bits per byte."""

import functools
import http.server
import math
import threading
import types

import numpy as np
import pytest
import torch

from llm_machinery import corpus, data

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMS_FROM_SCRATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_default_corpus_is_pydoc_topics_in_key_order():
    from pydoc_data.topics import topics

    text = corpus.read_text(None)
    first, last = sorted(topics)[0], sorted(topics)[-1]
    assert text.startswith(topics[first]) and text.endswith(topics[last])
    train_text, val_text = corpus.split_text(text)
    assert train_text + val_text == text and len(val_text) == len(text) - int(len(text) * 0.9)


def test_file_directory_and_glob(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("second")
    (tmp_path / "d" / "a.txt").write_text("first")
    (tmp_path / "d" / "skip.md").write_text("not text")
    assert corpus.read_text(str(tmp_path / "d" / "a.txt")) == "first"
    assert corpus.read_text(str(tmp_path / "d")) == "first\n\nsecond"
    assert corpus.read_text(str(tmp_path / "d" / "*.txt")) == "first\n\nsecond"


def test_url_is_downloaded_once(tmp_path, cache):
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "corpus.txt").write_text(TEXT)
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            hits.append(args)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path / "srv")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/corpus.txt"
        assert corpus.read_text(url) == TEXT
        assert corpus.read_text(url) == TEXT
        assert len(hits) == 1  # the second read came from the cache
        assert list((cache / "downloads").iterdir())
        with pytest.raises(corpus.UserError, match="could not download"):
            corpus.read_text(f"http://127.0.0.1:{server.server_port}/missing.txt")
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_bad_sources(tmp_path, capsys):
    with pytest.raises(corpus.UserError, match="no file matches"):
        corpus.read_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(corpus.UserError, match="is empty"):
        corpus.read_text(str(tmp_path / "empty.txt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(corpus.UserError, match="no .txt, .jsonl or .parquet files"):
        corpus.read_text(str(tmp_path / "empty_dir"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ok".encode("latin-1"))
    assert corpus.read_text(str(tmp_path / "latin1.txt")) == "caf\ufffd ok"
    assert "not valid UTF-8" in capsys.readouterr().err


def test_tokenizer_and_token_files_are_cached(monkeypatch, cache):
    import bpe

    tok, key = corpus.train_tokenizer(TEXT, 270)
    assert tok.n_vocab == 270
    monkeypatch.setattr(bpe, "train", lambda *a, **k: pytest.fail("the cached tokenizer was not used"))
    again, key2 = corpus.train_tokenizer(TEXT, 270)
    assert key2 == key and again.encode_ordinary(TEXT) == tok.encode_ordinary(TEXT)
    tokens = corpus.token_file(tok, key, TEXT)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert tokens.tolist() == tok.encode_ordinary(TEXT)
    monkeypatch.setattr(tok, "encode_ordinary", lambda text: pytest.fail("the cached token file was not used"))
    assert corpus.token_file(tok, key, TEXT).tolist() == tokens.tolist()


def test_large_vocabularies_use_uint32(cache):
    class Big:
        n_vocab = 100_000

        def encode_ordinary(self, text):
            return [99_999, 70_000, 1]

    tokens = corpus.token_file(Big(), "big", "abc")
    assert tokens.dtype == np.uint32 and tokens.tolist() == [99_999, 70_000, 1]


@pytest.fixture
def token_path(tmp_path):
    path = tmp_path / "tokens.uint16"
    np.arange(1000, dtype=np.uint16).tofile(path)
    return path


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_stream_windows_are_shifted_targets_and_epochs_cover_every_window(token_path):
    s = data.WindowStream(corpus.TokenShards([token_path], np.uint16), seq_len=10, batch_size=9, seed=3)
    batches = take(s, s.n_windows // 9 + 1)
    for b in batches:
        assert b["idx"].shape == (9, 10) and torch.equal(b["idx"][:, 1:], b["targets"][:, :-1])
        assert torch.equal(b["targets"] - b["idx"], torch.ones(9, 10, dtype=torch.long))  # tokens are 0..999
    firsts = torch.cat([b["idx"][:, 0] for b in batches])[: s.n_windows]
    assert len(set((firsts % 10).tolist())) == 1  # one offset per epoch
    assert len(set(firsts.tolist())) == s.n_windows  # every window once


def test_stream_resumes_at_any_step_and_depends_on_the_seed(token_path):
    full = take(data.WindowStream(corpus.TokenShards([token_path], np.uint16), 16, 4, seed=1, grad_accum=2), 10)
    resumed = take(data.WindowStream(corpus.TokenShards([token_path], np.uint16), 16, 4, seed=1, grad_accum=2, start_step=3), 4)
    for a, b in zip(full[6:], resumed):
        assert torch.equal(a["idx"], b["idx"])
    other = take(data.WindowStream(corpus.TokenShards([token_path], np.uint16), 16, 4, seed=2, grad_accum=2), 1)
    assert not torch.equal(full[0]["idx"], other[0]["idx"])


def test_stream_shards_ranks_like_one_bigger_batch(token_path):
    one = take(data.WindowStream(corpus.TokenShards([token_path], np.uint16), 16, 8, seed=5), 3)
    ranks = [take(data.WindowStream(corpus.TokenShards([token_path], np.uint16), 16, 4, seed=5, rank=r, world_size=2), 3) for r in (0, 1)]
    for step in range(3):
        assert torch.equal(one[step]["idx"], torch.cat([ranks[0][step]["idx"], ranks[1][step]["idx"]]))


def test_dataloader_workers_keep_the_order(token_path):
    s = data.WindowStream(corpus.TokenShards([token_path], np.uint16), 16, 4, seed=7)
    plain = take(s, 6)
    loader = torch.utils.data.DataLoader(s, batch_size=None, num_workers=2, prefetch_factor=2)
    for a, b in zip(plain, take(loader, 6)):
        assert torch.equal(a["idx"], b["idx"])


def test_bits_per_byte_of_a_uniform_model(tmp_path):
    """A model that predicts every token with probability 1/V scores ln V nats per token."""
    (tmp_path / "c.txt").write_text(TEXT * 5)
    pipe = data.CausalLM(str(tmp_path / "c.txt"), vocab_size=280)
    V = pipe.tokenizer.n_vocab

    class Uniform(torch.nn.Module):
        def forward(self, idx, targets=None):  # the model-file contract; evaluation passes no targets
            return torch.zeros(*idx.shape, V), None

    import contextlib

    config = types.SimpleNamespace(max_seq_len=8)
    metrics = pipe.evaluate(Uniform(), config, batch_size=3, device="cpu", autocast=contextlib.nullcontext)
    n = (len(pipe.val_tokens) - 1) // 8
    targets = np.asarray(pipe.val_tokens[1 : n * 8 + 1])
    n_bytes = len(pipe.tokenizer.decode_bytes(targets.tolist()))
    assert metrics["val_loss"] == pytest.approx(math.log(V))
    assert metrics["val_bpb"] == pytest.approx(math.log(V) * len(targets) / (math.log(2) * n_bytes))
    assert metrics["val_ppl"] == pytest.approx(V)


def test_bits_per_byte_of_a_bigram_model_counts_the_target_bytes(tmp_path):
    """Against a loop over the windows written here: nats of each target under a fixed bigram table,
    over the UTF-8 bytes of the targets (not of the inputs, which differ by one token at each end)."""
    tail = " ".join(["Ünïcödé", "wörds", "🙂", "and", "plain", "ones"][i * i % 6] + str(i) for i in range(150))
    (tmp_path / "c.txt").write_text(TEXT * 5 + tail)
    pipe = data.CausalLM(str(tmp_path / "c.txt"), vocab_size=300)
    V, T = pipe.tokenizer.n_vocab, 7
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    class Bigram(torch.nn.Module):
        def forward(self, idx, targets=None):
            return table[idx].float(), None

    import contextlib

    tokens = np.asarray(pipe.val_tokens, dtype=np.int64)
    n = (len(tokens) - 1) // T
    nats = n_bytes = input_bytes = 0.0
    log_probs = torch.log_softmax(table.float(), dim=-1).double()
    for w in range(n):
        window = tokens[w * T : w * T + T + 1]
        for x, y in zip(window[:-1], window[1:]):
            nats -= log_probs[x, y].item()
            n_bytes += len(pipe.tokenizer.decode_bytes([int(y)]))
            input_bytes += len(pipe.tokenizer.decode_bytes([int(x)]))
    assert input_bytes != n_bytes  # the case where counting the wrong side would show
    metrics = pipe.evaluate(Bigram(), types.SimpleNamespace(max_seq_len=T), batch_size=4, device="cpu",
                            autocast=contextlib.nullcontext)
    assert metrics["val_loss"] == pytest.approx(nats / (n * T), rel=1e-6)
    assert metrics["val_bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-6)
    # A token budget reads the first whole windows only.
    limited = pipe.evaluate(Bigram(), types.SimpleNamespace(max_seq_len=T), batch_size=4, device="cpu",
                            autocast=contextlib.nullcontext, max_tokens=3 * T + 2)
    first = -sum(log_probs[x, y].item() for w in range(3) for x, y in zip(tokens[w * T : w * T + T], tokens[w * T + 1 : w * T + T + 1]))
    assert limited["val_loss"] == pytest.approx(first / (3 * T), rel=1e-6)


def test_atomic_write_that_fails_half_way_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.bin"
    path.write_bytes(b"old and whole")

    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"new but ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        corpus.atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old and whole"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]  # no temp file left behind
    corpus.atomic_write(path, lambda tmp: open(tmp, "wb").write(b"new"))
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_a_vocabulary_size_that_bpe_cannot_train_is_a_data_error(tmp_path):
    (tmp_path / "c.txt").write_text(TEXT)
    with pytest.raises(corpus.UserError, match="at least 256"):
        data.CausalLM(str(tmp_path / "c.txt"), vocab_size=100)


# Today's built-in corpus, pinned before the streaming pipeline was written: the default run must keep
# its token ids, split and first batch. pydoc_data.topics changes between Python releases, so the pins
# hold for the corpus whose sha256 they were taken on.
BUILT_IN = {"corpus_sha256": "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee",
            "tokenizer": "22d6b6e1a0579bb9-2048-f021c3d9", "train_tokens": 114653, "val_tokens": 13272,
            "train_sha256": "dbe37dd5451fd44d", "val_sha256": "505f8e5ab171ebbb", "first_batch_sha256": "ad591c7e6677c3dc",
            "first_batch_starts": [1440, 459, 51, 617, 631, 266, 32, 311]}


def test_the_built_in_corpus_gives_the_pinned_tokens_split_and_first_batch():
    import hashlib

    pipe = data.CausalLM(None, vocab_size=2048)
    if pipe.fingerprint["corpus_sha256"] != BUILT_IN["corpus_sha256"]:
        pytest.skip("this Python's pydoc_data.topics is not the one the pins were taken on")
    digest = lambda a: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]
    assert pipe.fingerprint["tokenizer"] == BUILT_IN["tokenizer"] and pipe.tokenizer.n_vocab == 2048
    assert (len(pipe.train_tokens), len(pipe.val_tokens)) == (BUILT_IN["train_tokens"], BUILT_IN["val_tokens"])
    assert digest(pipe.train_tokens[np.arange(len(pipe.train_tokens))]) == BUILT_IN["train_sha256"]
    assert digest(pipe.val_tokens[np.arange(len(pipe.val_tokens))]) == BUILT_IN["val_sha256"]
    batch = next(iter(pipe.stream(types.SimpleNamespace(max_seq_len=128), 8, seed=0)))
    assert digest(batch["idx"].numpy()) == BUILT_IN["first_batch_sha256"]
    assert batch["idx"][:, 0].tolist() == BUILT_IN["first_batch_starts"]
