"""corpus.py and data.py on streamed corpora: each source kind, exact token ids in shards, the whole-document split,
the batch stream across shards, resuming an interrupted preparation, cleaning and bad input."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_machinery import corpus, data
import train
from conftest import stop_at_step  # noqa: E402
from test_train import TINY, weights

ROOT = Path(__file__).resolve().parent.parent

# Documents of different lengths and kinds of text, one of them a duplicate.
DOCS = [f"Document {i}: " + " ".join(["alpha", "beta", "gamma", "Ünïcödé", "42", "x = f(y)\n", "🙂"][(i * j) % 7]
                                      for j in range(20 + 13 * (i % 5))) for i in range(40)]
DOCS[17] = DOCS[3]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMS_FROM_SCRATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def encode_whole(pipe, docs):
    """Each document encoded at once, then the separator: what the shards must hold."""
    ids = [pipe.tokenizer.encode_ordinary(d) + [pipe.separator] for d in docs]
    return np.concatenate([np.asarray(i, dtype=np.int64) for i in ids])


def splits(docs, val_fraction=0.1):
    return ([d for i, d in enumerate(docs) if not corpus.is_validation(i, val_fraction)],
            [d for i, d in enumerate(docs) if corpus.is_validation(i, val_fraction)])


def test_shards_hold_exactly_the_ids_of_each_document_encoded_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "SHARD_TOKENS", 300)  # many shards, documents cut across them
    pipe = data.CausalLM(str(write_jsonl(tmp_path / "c.jsonl", DOCS)), vocab_size=300, workers=2)
    train_docs, val_docs = splits(DOCS)
    assert len(val_docs) == 4 and len(pipe.train_tokens.paths) > 3
    assert all(n == 300 for n in pipe.train_tokens.sizes[:-1])
    np.testing.assert_array_equal(np.asarray(pipe.train_tokens, dtype=np.int64), encode_whole(pipe, train_docs))
    np.testing.assert_array_equal(np.asarray(pipe.val_tokens, dtype=np.int64), encode_whole(pipe, val_docs))
    assert pipe.tokenizer.n_vocab == 301 and pipe.token_bytes[pipe.separator] == 0


def test_shards_and_split_do_not_depend_on_the_number_of_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "SHARD_TOKENS", 500)
    source = str(write_jsonl(tmp_path / "c.jsonl", DOCS))
    made = []
    for workers in (1, 3):
        monkeypatch.setenv("LLMS_FROM_SCRATCH_CACHE", str(tmp_path / f"cache{workers}"))
        pipe = data.CausalLM(source, vocab_size=300, workers=workers)
        made.append([np.asarray(pipe.train_tokens), np.asarray(pipe.val_tokens), pipe.fingerprint])
    for a, b in zip(*made):
        assert (a == b) if isinstance(a, dict) else np.array_equal(a, b)


def test_an_interrupted_preparation_resumes_and_makes_the_same_shards(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpus, "SHARD_TOKENS", 200)
    source = str(write_jsonl(tmp_path / "c.jsonl", DOCS))
    monkeypatch.setenv("LLMS_FROM_SCRATCH_CACHE", str(tmp_path / "whole"))
    whole = data.CausalLM(source, vocab_size=300, workers=2)

    monkeypatch.setenv("LLMS_FROM_SCRATCH_CACHE", str(tmp_path / "cut"))
    write = corpus.ShardWriter.flush
    written = []

    def flush_then_die(self):
        write(self)
        written.append(self.split)
        if len(written) == 5:
            raise KeyboardInterrupt  # as a kill would, after the shard and before anything else

    monkeypatch.setattr(corpus.ShardWriter, "flush", flush_then_die)
    with pytest.raises(KeyboardInterrupt):
        data.CausalLM(source, vocab_size=300, workers=2)
    monkeypatch.setattr(corpus.ShardWriter, "flush", write)
    encoded = []
    encode = corpus.tasks

    def counting_tasks(docs, first=0, **kwargs):
        encoded.append(first)
        return encode(docs, first, **kwargs)

    monkeypatch.setattr(corpus, "tasks", counting_tasks)
    resumed = data.CausalLM(source, vocab_size=300, workers=2)
    assert "resuming the preparation" in capsys.readouterr().err and encoded[0] > 0
    for split in ("train_tokens", "val_tokens"):
        a, b = getattr(whole, split), getattr(resumed, split)
        assert a.sizes == b.sizes and np.array_equal(np.asarray(a), np.asarray(b))


def test_the_stream_reads_across_shards_as_one_file(tmp_path):
    ids = np.random.default_rng(0).integers(0, 60000, 1000).astype(np.uint16)
    ids.tofile(tmp_path / "one.uint16")
    for k in range(0, 1000, 64):
        ids[k : k + 64].tofile(tmp_path / f"s{k:04d}.uint16")
    one = corpus.TokenShards([tmp_path / "one.uint16"], np.uint16)
    sharded = corpus.TokenShards(sorted(tmp_path.glob("s*.uint16")), np.uint16)
    assert len(sharded) == 1000 and np.array_equal(sharded[np.arange(1000)], ids)
    for kwargs in ({}, {"grad_accum": 2, "start_step": 3}):
        a, b = (iter(data.WindowStream(t, 16, 4, seed=9, **kwargs)) for t in (one, sharded))
        for _ in range(40):  # past an epoch, so the windows cross shard boundaries at every offset
            x, y = next(a), next(b)
            assert torch.equal(x["idx"], y["idx"]) and torch.equal(x["targets"], y["targets"])


def test_ranks_and_accumulation_slices_are_disjoint_and_cover_the_step(tmp_path):
    np.arange(3000, dtype=np.uint16).tofile(tmp_path / "t.uint16")
    tokens = corpus.TokenShards([tmp_path / "t.uint16"], np.uint16)
    whole = iter(data.WindowStream(tokens, 10, 8, seed=4))
    parts = [iter(data.WindowStream(tokens, 10, 2, seed=4, rank=r, world_size=2, grad_accum=2)) for r in (0, 1)]
    for step in range(5):
        firsts = [next(p)["idx"][:, 0] for _ in range(2) for p in parts]  # micro 0 of both ranks, then micro 1
        mine = torch.cat(firsts)
        assert len(set(mine.tolist())) == 8  # no window twice within a step
        assert torch.equal(mine, next(whole)["idx"][:, 0])


def test_every_source_kind_gives_the_same_documents(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    (tmp_path / "j").mkdir()
    write_jsonl(tmp_path / "j" / "a.jsonl", DOCS[:25])
    write_jsonl(tmp_path / "j" / "b.jsonl", DOCS[25:], field="body")
    assert list(corpus.documents(str(tmp_path / "j" / "a.jsonl"))) == DOCS[:25]
    assert list(corpus.documents(str(tmp_path / "j" / "b.jsonl"), text_field="body")) == DOCS[25:]
    pq.write_table(pa.table({"text": DOCS, "n": list(range(40))}), tmp_path / "c.parquet", row_group_size=7)
    assert list(corpus.documents(str(tmp_path / "c.parquet"))) == DOCS
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    assert list(corpus.documents(str(tmp_path / "saved"))) == DOCS
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:5]})}).save_to_disk(str(tmp_path / "dict"))
    assert list(corpus.documents(str(tmp_path / "dict"))) == DOCS[:5]
    # A folder and a glob mix the kinds, in the order of their paths.
    (tmp_path / "mix").mkdir()
    write_jsonl(tmp_path / "mix" / "1.jsonl", DOCS[:10])
    pq.write_table(pa.table({"text": DOCS[10:20]}), tmp_path / "mix" / "2.parquet")
    (tmp_path / "mix" / "3.txt").write_text("plain text\n")
    expected = DOCS[:20] + ["plain text\n"]
    assert list(corpus.documents(str(tmp_path / "mix"))) == expected
    assert list(corpus.documents(str(tmp_path / "mix" / "*"))) == expected
    # A large .txt file becomes documents cut at line breaks, which join back into the file.
    monkeypatch.setattr(corpus, "DOCUMENT_CHARS", 500)
    text = "\n\n".join(DOCS)
    (tmp_path / "big.txt").write_text(text)
    pieces = list(corpus.documents(str(tmp_path / "big.txt")))
    assert "".join(pieces) == text and len(pieces) > 10 and all(len(p) <= 500 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:-1])  # at a blank line where one is near, else a line break


def test_a_saved_dataset_and_a_large_text_file_train(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    pipe = data.CausalLM(str(tmp_path / "saved"), vocab_size=280, workers=1)
    assert np.array_equal(np.asarray(pipe.val_tokens, dtype=np.int64), encode_whole(pipe, splits(DOCS)[1]))
    monkeypatch.setattr(corpus, "SMALL_CORPUS_BYTES", 1000)  # this file is no longer small: it streams
    monkeypatch.setattr(corpus, "DOCUMENT_CHARS", 800)
    (tmp_path / "big.txt").write_text("\n\n".join(DOCS))
    pipe = data.CausalLM(str(tmp_path / "big.txt"), vocab_size=280, workers=2)
    pieces = list(corpus.documents(str(tmp_path / "big.txt")))
    assert np.array_equal(np.asarray(pipe.train_tokens, dtype=np.int64), encode_whole(pipe, splits(pieces)[0]))


def test_clean_normalizes_removes_controls_and_duplicates_and_says_so(tmp_path, capsys):
    docs = ["Cafe\u0301 au lait\x00 ok", "tab\tand\nnewline stay\x07", "Café au lait ok", "unique " * 30] + DOCS
    pipe = data.CausalLM(str(write_jsonl(tmp_path / "c.jsonl", docs)), vocab_size=280, clean=True, workers=1)
    report = capsys.readouterr().err
    # doc 0 becomes doc 2 once normalized and without its NUL; DOCS[17] repeats DOCS[3]
    assert "normalized 1 documents" in report and "removed 2 control characters" in report
    assert "dropped 2 duplicate documents" in report
    kept = ["Café au lait ok", "tab\tand\nnewline stay", "unique " * 30] + DOCS[:17] + DOCS[18:]
    train_docs, val_docs = splits(kept)
    assert np.array_equal(np.asarray(pipe.train_tokens, dtype=np.int64), encode_whole(pipe, train_docs))


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_text('{"text": "fine"}\n{"text": broken}\n'), "line 2 is not JSON"),
    (lambda p: p.write_text('{"text": "fine"}\n\n{"body": "no text"}\n'), "line 3 has no 'text' field"),
])
def test_bad_jsonl_is_named_by_line(tmp_path, make, match):
    make(tmp_path / "c.jsonl")
    with pytest.raises(corpus.UserError, match=match):
        data.CausalLM(str(tmp_path / "c.jsonl"), vocab_size=280)


def test_bad_sources_exit_2_with_one_sentence(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "saved"))
    write_jsonl(tmp_path / "few.jsonl", DOCS[:5])
    write_jsonl(tmp_path / "short.jsonl", ["tiny"] * 20)
    capsys.readouterr()  # what datasets printed while saving
    for source, match in [(tmp_path / "bad.parquet", "cannot read the parquet file"),
                          (tmp_path / "saved", "has no 'text' column"),
                          (tmp_path / "few.jsonl", "too few to hold out a validation split"),
                          (tmp_path / "short.jsonl", "too few for one window")]:
        out = tmp_path / "out"
        assert train.main(["--data", str(source), "--out", str(out), *TINY, "--max-steps", "1"]) == 2
        err = capsys.readouterr().err  # progress lines may come first; the error is the last line
        assert match in err.splitlines()[-1] and err.splitlines()[-1].startswith("error: ") and "Traceback" not in err, err
        assert not out.exists()


def test_training_on_shards_resumes_bit_identically_after_a_kill(tmp_path, monkeypatch):
    """Windows cross the shard boundaries; a run killed between checkpoints ends with the weights of
    a run that was never stopped."""
    source = str(write_jsonl(tmp_path / "c.jsonl", DOCS * 3))
    monkeypatch.setattr(corpus, "SHARD_TOKENS", 1000)
    common = ["--data", source, *TINY, "--max-steps", "16", "--ckpt-every", "6", "--eval-every", "0",
              "--log-every", "1", "--sample-tokens", "0", "--workers", "2"]
    assert train.main([*common, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "stopped"
    # The subprocess makes shards of the default size: the batches do not depend on the shard size.
    stop_at_step([*common, "--out", str(out)], 8, signal.SIGKILL)
    assert torch.load(out / "state.pt", weights_only=True)["step"] in (6, 12)
    assert train.main([*common, "--out", str(out)]) == 0
    a, b = weights(tmp_path / "straight"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("block", [1, 5, 64, 10**6])
def test_a_txt_file_read_a_block_at_a_time_cuts_as_the_whole_text_would(tmp_path, monkeypatch, capsys, block):
    """Documents end after the last blank line (else line break) that leaves at most DOCUMENT_CHARS
    characters, whether the file is decoded whole or a block at a time, with characters of several
    bytes split across blocks; an undecodable byte is named by its offset."""
    monkeypatch.setattr(corpus, "DOCUMENT_CHARS", 40)
    monkeypatch.setattr(corpus, "TEXT_BLOCK_BYTES", block)
    rng = np.random.default_rng(block)
    pieces = ["word ", "é", "🙂", "\n", "\n\n", "a" * 45]
    text = "".join(pieces[i] for i in rng.integers(0, len(pieces), 300))
    raw = text.encode()
    bad = len(raw) // 2 - len(raw) // 2 % 4  # between characters: the 4-byte emoji and the rest align there or not
    raw = raw[:bad] + b"\xff" + raw[bad:]
    path = tmp_path / "big.txt"
    path.write_bytes(raw)
    whole, expected, start = raw.decode("utf-8", errors="replace"), [], 0
    while start < len(whole):
        end = len(whole) if len(whole) - start <= 40 else start + 40
        if end < len(whole):
            cut = whole.rfind("\n\n", start + 1, end)
            cut = cut if cut > start else whole.rfind("\n", start + 1, end)
            end = cut + 1 if cut > start else end
        expected.append(whole[start:end])
        start = end
    assert list(corpus.text_documents(path)) == expected
    assert f"(byte {raw.index(bytes([0xFF]))})" in capsys.readouterr().err


def test_corpus_py_needs_no_torch():
    """Preparing a corpus is numpy's work; tensors begin in data.py."""
    code = "from llm_machinery import corpus; import sys; assert 'torch' not in sys.modules, 'corpus.py imported torch'"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_the_tokenizer_of_a_streamed_corpus_learns_from_documents_spread_over_it(tmp_path, monkeypatch):
    """A corpus larger than TOKENIZER_SAMPLE_BYTES trains its tokenizer on every stride-th training
    document, from the first to the last, not on the documents that come first."""
    import bpe

    learned = []
    bpe_train = bpe.train

    def recording_train(texts, *args, **kwargs):
        texts = list(texts)
        learned.extend(texts)
        return bpe_train(texts, *args, **kwargs)

    monkeypatch.setattr(bpe, "train", recording_train)
    train_docs, _ = splits(DOCS)
    train_bytes = sum(len(d.encode()) for d in train_docs)
    monkeypatch.setattr(corpus, "TOKENIZER_SAMPLE_BYTES", train_bytes // 4 + 1)  # a stride of 4
    data.CausalLM(str(write_jsonl(tmp_path / "c.jsonl", DOCS)), vocab_size=300, workers=1)
    assert learned == train_docs[::4] and len(learned) == 9


@pytest.mark.parametrize("kind", ["binary", "utf-16", "cp1251"])
def test_a_txt_file_that_is_not_utf8_text_is_said_so_in_one_sentence(tmp_path, capsys, kind):
    """Binary data, or text in another encoding, is refused by name whether the file is read whole or
    streamed, and never trained on; a few undecodable bytes only warn (test_data.py's test_bad_sources,
    test_train.py's test_not_utf8_warns_and_trains)."""
    text = "Съешь же ещё этих мягких французских булок, да выпей чаю. " * 200
    raw = {"binary": np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes(),
           "utf-16": text.encode("utf-16"), "cp1251": text.encode("cp1251")}[kind]
    path = tmp_path / "corpus.txt"
    path.write_bytes(raw)
    said = re.escape(f"{path} is not")
    with pytest.raises(corpus.UserError, match=said):
        corpus.read_text(str(path))
    with pytest.raises(corpus.UserError, match=said):
        list(corpus.documents(str(path)))
    out = tmp_path / "out"
    assert train.main(["--data", str(path), "--out", str(out), *TINY, "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert re.match("error: " + said, err.splitlines()[-1]) and "Traceback" not in err, err
    assert not out.exists()


def test_train_py_options_reach_the_pipeline(tmp_path, capsys):
    """--text-field and --clean go from train.py's options to the causal-LM pipeline."""
    source = write_jsonl(tmp_path / "c.jsonl", DOCS * 3, field="body")
    argv = ["--data", str(source), "--out", str(tmp_path / "out"), *TINY, "--max-steps", "1", "--sample-tokens", "0",
            "--text-field", "body", "--clean", "--workers", "1"]
    assert train.main(argv) == 0
    assert "dropped 81 duplicate documents" in capsys.readouterr().err  # 39 distinct ones, three times over
