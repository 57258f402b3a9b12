"""
Text corpora to token ids for data.py's causal-LM pipeline: where a corpus comes from, how it is
cleaned and split, the byte-level BPE tokenizer (bpe.py) trained on it, and the token files and shards
it becomes. No torch: the standard library and numpy (pyarrow and datasets for the sources that need
them); tensors begin in data.py.

A corpus takes one of two paths (is_small_corpus):
    whole     the built-in corpus (the Python documentation's topics) or .txt files of up to
              SMALL_CORPUS_BYTES, not cleaned: read as one string (read_text), split by characters
              (split_text), the tokenizer trained on the training split, each split encoded in one
              piece into a cached token file (token_file), an array of N uint16 (or uint32) ids
    streamed  anything else (a large .txt, .jsonl, .parquet, a save_to_disk folder, hf:NAME) and any
              corpus that --clean cleans: read as documents (documents), cleaned if asked (Cleaner),
              every 1 / val_fraction-th document held out (is_validation), the tokenizer trained on a
              sample spread over the training documents (tokenizer_sample), and the documents encoded
              by worker processes into shards of SHARD_TOKENS ids, each document ending in
              <|endoftext|> (prepare_shards), read back as one array (TokenShards)

records() reads a .jsonl, parquet or dataset source as whole records, for the conversations of
conversations.py.

Text files are UTF-8: one whose first SNIFF_BYTES hold a NUL byte or a quarter of undecodable bytes is
refused by name (check_text), while a few undecodable bytes are replaced by U+FFFD with a warning.

Where things are cached ($LLMS_FROM_SCRATCH_CACHE, else $XDG_CACHE_HOME/llms-from-scratch, else
~/.cache/llms-from-scratch), each keyed by content so that a changed corpus never reads a stale file:
    downloads/<sha256 of the URL>.txt
    tokenizers/<sha256 of training text, vocabulary size, split pattern>/tokenizer.{tiktoken,json}
    tokens/<tokenizer key>-<sha256 of the split's text>.<uint16|uint32>
    shards/<tokenizer key>-<sha256 of the documents>-<shard size>/{train,val}-NNNNNN.<uint16|uint32>, manifest.json

The scripts share a few things from here: UserError, the one error type for bad input, and the
helpers at the end (cache_dir, sha256, warn, atomic_write, in_one_line).
"""

import codecs
import glob
import hashlib
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
import unicodedata
import urllib.request
from pathlib import Path

import numpy as np


class UserError(Exception):
    """Bad input, said in one sentence; the command-line scripts print it and exit with code 2."""


# ------------------------------------------------------------------------------------------ sizes


# A corpus of .txt files up to this size is read whole, split by characters and encoded in one piece,
# as the built-in corpus is: quick, and the default run's numbers stay what they were. A larger one,
# any .jsonl, .parquet or dataset source, and any corpus that is cleaned, is read as a stream of
# documents and encoded by worker processes into token shards (see prepare_shards).
SMALL_CORPUS_BYTES = 16 * 2**20
DOCUMENT_CHARS = 2**20  # a large .txt file becomes documents of about this many characters
TEXT_BLOCK_BYTES = 2**22  # and is read this much at a time
TOKENIZER_SAMPLE_BYTES = 32 * 2**20  # the tokenizer of a streamed corpus learns from about this much text
SHARD_TOKENS = 2**24  # tokens per shard file (32 MiB of uint16), the last one shorter
ENDOFTEXT = "<|endoftext|>"  # the token that ends every document of a streamed corpus
SNIFF_BYTES = 2**16  # whether a .txt file holds text is judged by its first this many bytes (check_text)
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


# ---------------------------------------------------------------------------------------- sources


def is_small_corpus(source):
    """Whether source is read whole (the built-in corpus, or .txt files of SMALL_CORPUS_BYTES at most)."""
    if source is None:
        return True
    if source.startswith("hf:") or is_saved_dataset(Path(source).expanduser()):
        return False
    files = corpus_files(source)
    return all(p.suffix not in (".jsonl", ".parquet") for p in files) and sum(p.stat().st_size for p in files) <= SMALL_CORPUS_BYTES


def read_text(source=None):
    """The corpus as one string: the built-in one for None, else the files of source, joined."""
    if source is None:
        return default_corpus()
    text = "\n\n".join(decode_file(path) for path in corpus_files(source))
    if not text.strip():
        raise UserError(f"--data {source} is empty; pass a file with text in it")
    return text


def split_text(text, val_fraction=0.1):
    """The first (1 - val_fraction) of the characters for training, the rest for validation."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def documents(source, text_field="text"):
    """The documents of source in a fixed order: each .jsonl line, parquet or dataset row, and each
    piece of a .txt file (text_documents)."""
    if source.startswith("hf:"):
        yield from hub_dataset_documents(source[3:], text_field)
        return
    path = Path(source).expanduser()
    if is_saved_dataset(path):
        yield from arrow_documents(saved_dataset_batches(path), text_field, path)
        return
    for file in corpus_files(source):
        if file.suffix == ".jsonl":
            yield from jsonl_documents(file, text_field)
        elif file.suffix == ".parquet":
            yield from parquet_documents(file, text_field)
        else:
            yield from text_documents(file)


def records(source):
    """(where, record) for each record of source, a dict of its fields, in the order documents() reads
    them: each .jsonl line, parquet or dataset row, where saying which ("chats.jsonl line 3"). A .txt
    file holds text, not records."""
    if source.startswith("hf:"):
        yield from ((f"record {number} of {source}", record)
                    for number, record in enumerate(hub_dataset_records(source[3:]), start=1))
        return
    path = Path(source).expanduser()
    if is_saved_dataset(path):
        yield from arrow_records(saved_dataset_batches(path), path)
        return
    for file in corpus_files(source):
        if file.suffix == ".jsonl":
            yield from jsonl_records(file)
        elif file.suffix == ".parquet":
            yield from arrow_records(parquet_file(file).iter_batches(batch_size=1024), file)
        else:
            raise UserError(f"{file} holds text, not records; records come in .jsonl or .parquet files or datasets")


def corpus_files(source):
    """The files that make up a --data argument: a file, a directory of .txt, .jsonl and .parquet
    files, a glob or a URL (a Hugging Face dataset, a folder or a name, is no list of files; see documents)."""
    if source.startswith(("http://", "https://")):
        return [download(source)]
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        # An image folder's metadata.jsonl is a .jsonl with a "text" field too; it names the folder's images.
        if any(p.name == "metadata.jsonl" for p in files):
            raise UserError(f"{source} is an image folder (it holds metadata.jsonl); a text model trains on .txt files, "
                            "an image model (such as siglip) on this folder")
        if not files:
            raise UserError(f"the directory {source} holds no .txt, .jsonl or .parquet files; pass a text file, "
                            "a folder of them or a glob")
        return files
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p))
    if not files:
        raise UserError(f"no file matches --data {source}; pass a text file, a folder of .txt, .jsonl or .parquet "
                        "files, a glob, a URL, a saved Hugging Face dataset folder or hf:NAME")
    return files


def default_corpus():
    """The built-in corpus: the Python documentation's topics that ship with the standard library."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def download(url):
    """Path of the cached copy of url, fetched on first use."""
    path = cache_dir() / "downloads" / f"{sha256(url)}.txt"
    if not path.exists():
        print(f"downloading {url} into {path}", file=sys.stderr)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                body = response.read()
        except (OSError, ValueError) as e:
            raise UserError(f"could not download {url} ({e}); check the URL or pass a local file") from None
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(body))
    return path


def is_saved_dataset(path):
    """Whether path is a folder that Hugging Face datasets' save_to_disk wrote (one split or several)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


# ---------------------------------------------------------------------- reading each kind of file


def check_text(path, head):
    """UserError unless head, the first bytes of the file path, reads as UTF-8 text. A NUL byte (binary
    files, UTF-16 text), or undecodable bytes making up a quarter of head (another encoding, or no text
    at all), mean it is something else, of which training would learn little but replacement
    characters; a few undecodable bytes are only warned about, where the file is decoded."""
    head = head[:SNIFF_BYTES]
    if b"\0" in head:
        raise UserError(f"{path} is not text: it holds NUL bytes, as binary files and UTF-16 text do; "
                        "pass UTF-8 text files")
    decoder = codecs.getincrementaldecoder("utf-8")("ignore")
    # What "ignore" drops is what does not decode; a character cut at the end of head is no fault.
    undecodable = len(head) - len(decoder.decode(head).encode("utf-8")) - len(decoder.getstate()[0])
    if undecodable > len(head) / 4:
        raise UserError(f"{path} is not UTF-8 text: {undecodable:,} of its first {len(head):,} bytes do not decode; "
                        "convert it to UTF-8 (iconv -t UTF-8) or leave it out")


def decode_file(path):
    """The text of a file read whole, what does not decode replaced (and warned about)."""
    raw = path.read_bytes()
    check_text(path, raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        warn(f"{path} is not valid UTF-8 (byte {e.start}); undecodable bytes were replaced with U+FFFD")
        return raw.decode("utf-8", errors="replace")


def text_documents(path):
    """A .txt file as documents of about DOCUMENT_CHARS, each cut at the last blank line (else line
    break) before that size, so that a paragraph is rarely cut in two. The file is read and decoded
    TEXT_BLOCK_BYTES at a time: a single .txt of gigabytes (TinyStories ships as one) never sits in
    memory whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    text, position = "", 0
    with open(path, "rb") as f:
        check_text(path, f.read(SNIFF_BYTES))
        f.seek(0)
        while True:
            block = f.read(TEXT_BLOCK_BYTES)
            state = decoder.getstate()
            try:
                text += decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:  # said once; from there on, what does not decode is replaced
                warn(f"{path} is not valid UTF-8 (byte {position - len(state[0]) + e.start}); undecodable bytes "
                     "were replaced with U+FFFD")
                decoder.setstate(state)
                decoder.errors = "replace"
                text += decoder.decode(block, final=not block)
            position += len(block)
            # Cut only where more text follows than a document holds, as cutting the whole file would.
            while len(text) > DOCUMENT_CHARS:
                cut = text.rfind("\n\n", 1, DOCUMENT_CHARS)
                cut = cut if cut > 0 else text.rfind("\n", 1, DOCUMENT_CHARS)
                end = cut + 1 if cut > 0 else DOCUMENT_CHARS
                yield text[:end]
                text = text[end:]
            if not block:
                break
    if text:
        yield text


def jsonl_documents(path, text_field):
    for where, record in jsonl_records(path):
        if not isinstance(record.get(text_field), str):
            raise UserError(f"{where} has no {text_field!r} field holding text; name the field with --text-field")
        yield record[text_field]


def jsonl_records(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path} line {number} is not JSON; each line must be a JSON object") from None
            if not isinstance(record, dict):
                raise UserError(f"{path} line {number} is not a JSON object; each line must be one")
            yield f"{path} line {number}", record


def arrow_documents(batches, text_field, where):
    """The text_field column of an iterable of pyarrow record batches, without None."""
    for batch in batches:
        if text_field not in batch.schema.names:
            raise UserError(f"{where} has no {text_field!r} column (it has {', '.join(batch.schema.names)}); "
                            "name the column with --text-field")
        yield from (text for text in batch.column(text_field).to_pylist() if text is not None)


def arrow_records(batches, where):
    """(where, record) of each row of an iterable of pyarrow record batches."""
    number = 0
    for batch in batches:
        for record in batch.to_pylist():
            number += 1
            yield f"row {number} of {where}", record


def parquet_file(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow; install it with pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
        parquet.schema_arrow
    except Exception as e:  # pyarrow raises several error types for files that are not parquet
        raise UserError(f"cannot read the parquet file {path} ({in_one_line(e)})") from None
    return parquet


def parquet_documents(path, text_field):
    parquet = parquet_file(path)
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise UserError(f"{path} has no {text_field!r} column (it has {', '.join(names)}); name the column with --text-field")
    yield from arrow_documents(parquet.iter_batches(batch_size=1024, columns=[text_field]), text_field, path)


def saved_dataset_batches(path):
    """The record batches of a folder of Hugging Face datasets' save_to_disk, read with pyarrow (its files
    are Arrow streams, listed in state.json); of a DatasetDict, the train split."""
    try:
        import pyarrow as pa
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow; install it with pip install pyarrow") from None
    if (path / "dataset_dict.json").is_file():
        if not (path / "train" / "state.json").is_file():
            raise UserError(f"the dataset folder {path} has no train split")
        path = path / "train"
    try:
        files = [path / f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {path / 'state.json'} ({in_one_line(e)}); is it a save_to_disk folder?") from None
    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                yield from pa.ipc.open_stream(source)
        except (OSError, pa.ArrowInvalid) as e:
            raise UserError(f"cannot read the dataset file {file} ({in_one_line(e)})") from None


def hub_dataset_documents(name, text_field):
    for record in hub_dataset_records(name):
        if not isinstance(record.get(text_field), str):
            raise UserError(f"the dataset {name} has no {text_field!r} column holding text; name it with --text-field")
        yield record[text_field]


def hub_dataset_records(name):
    """hf:NAME: a dataset of the Hugging Face hub, streamed by the datasets package (its train split)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"--data hf:{name} needs the datasets package; install it with pip install datasets") from None
    try:
        yield from datasets.load_dataset(name, split="train", streaming=True)
    except Exception as e:  # network, missing dataset, bad config: said by datasets in many error types
        raise UserError(f"could not read the dataset {name} ({in_one_line(e)})") from None


# ------------------------------------------------------------------------- cleaning and the split


CONTROL_CHARACTERS = re.compile("[" + "".join(re.escape(chr(c)) for c in [*range(32), *range(127, 160)]
                                                if not chr(c).isspace()) + "]")


class Cleaner:
    """--clean: each document in NFC, without control characters other than whitespace, and each
    exact duplicate of an earlier document (after those two steps) dropped; counts what it did."""

    def __init__(self):
        self.seen = set()  # 8-byte digests of the documents kept so far
        self.normalized = self.controls = self.duplicates = self.duplicate_bytes = 0

    def __call__(self, text):
        """The cleaned document, or None to drop it."""
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
            self.normalized += 1
        text, removed = CONTROL_CHARACTERS.subn("", text)
        self.controls += removed
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        if digest in self.seen:
            self.duplicates += 1
            self.duplicate_bytes += len(text.encode("utf-8", "surrogatepass"))
            return None
        self.seen.add(digest)
        return text

    def report(self):
        return (f"cleaning normalized {self.normalized:,} documents to NFC, removed {self.controls:,} control "
                f"characters and dropped {self.duplicates:,} duplicate documents ({size(self.duplicate_bytes)})")


def corpus_documents(source, text_field="text", clean=False):
    """(documents, cleaner): the non-empty documents of source, cleaned if asked; the cleaner (None
    without clean) counts what cleaning removed once the documents have been read."""
    cleaner = Cleaner() if clean else None

    def stream():
        for text in documents(source, text_field):
            if cleaner is not None:
                text = cleaner(text)
            if text and not text.isspace():
                yield text

    return stream(), cleaner


def is_validation(index, val_fraction):
    """Whether document index is held out: one in every 1 / val_fraction, spread evenly over the corpus,
    so the split depends on nothing but the documents' order."""
    return int((index + 1) * val_fraction) > int(index * val_fraction)


def held_out_records(source):
    """The (where, record) pairs of --validation-file, read as --data is, and said to come from it."""
    try:
        return list(records(source))
    except UserError as e:
        raise UserError(str(e).replace("--data", "--validation-file")) from None


def is_held_out(record, val_fraction):
    """Whether a record (a conversation, a preference pair: anything json can write) is held out for
    validation: by a hash of its content, not its place, so that a file in any order, cycling through a
    few kinds of record, say, is split the same way, and exact duplicates fall on the same side, where
    none can leak from training into validation."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


def survey(source, text_field, clean, val_fraction):
    """One pass over the documents: their number and bytes, the training bytes, a sha256 of their
    content (each document's length and bytes, in order) and the cleaner's counts."""
    docs, cleaner = corpus_documents(source, text_field, clean)
    h = hashlib.sha256(f"{val_fraction}".encode())
    count = n_bytes = train_bytes = 0
    progress = Progress(None, label="reading")
    for text in docs:
        raw = text.encode("utf-8", "surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
        if not is_validation(count, val_fraction):
            train_bytes += len(raw)
        count, n_bytes = count + 1, n_bytes + len(raw)
        progress.update(1, len(raw), 0)
    if time.time() - progress.start > progress.every:  # a pass that took a while ends its line
        progress.update(0, 0, 0, final=True)
    return {"documents": count, "bytes": n_bytes, "train_bytes": train_bytes, "sha256": h.hexdigest(), "cleaner": cleaner}


# -------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(text, vocab_size, pattern=None, special_tokens=(), content_key=None):
    """A BPE tokenizer trained on text, or the cached one trained on the same text before.

    text is a string, keyed by its sha256, or an iterable of documents that content_key names; the
    documents are read only when no tokenizer is cached under that key."""
    import bpe

    pattern = pattern or bpe.CL100K_PATTERN
    key = f"{content_key or sha256(text)[:16]}-{vocab_size}-{sha256(pattern)[:8]}"
    if special_tokens:
        key += f"-{sha256(chr(0).join(special_tokens))[:8]}"
    path = cache_dir() / "tokenizers" / key
    if (path / "tokenizer.json").exists():
        return bpe.Tokenizer.load(path), key
    what = f"{len(text):,} characters" if isinstance(text, str) else "a sample of the training documents"
    print(f"training a {vocab_size}-token BPE tokenizer on {what}; cached in {path}", file=sys.stderr)
    try:
        tokenizer = bpe.train(text, vocab_size, pattern=pattern, special_tokens=list(special_tokens) or None)
    except ValueError as e:  # a vocabulary size bpe.py cannot train, said in its own words
        raise UserError(str(e)) from None
    learned = tokenizer.n_vocab - len(special_tokens)
    if learned < vocab_size:  # merging stops when no pair occurs twice
        print(f"the tokenizer has {learned} tokens: that is all the pairs that repeat in this text ({vocab_size} were "
              "asked for, which a larger text would give)", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{key}."))
    tokenizer.save(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another process cached the same tokenizer first
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return tokenizer, key


def tokenizer_sample(source, text_field, clean, val_fraction, stride, total_bytes):
    """Every stride-th training document, so that the sample spreads over the whole corpus."""
    docs, _ = corpus_documents(source, text_field, clean)
    n_train = 0
    progress = Progress(total_bytes, label="sampling for the tokenizer")
    for index, text in enumerate(docs):
        progress.update(1, len(text.encode("utf-8", "surrogatepass")), 0)
        if not is_validation(index, val_fraction):
            if n_train % stride == 0:
                yield text
            n_train += 1
    if time.time() - progress.start > progress.every:
        progress.update(0, 0, 0, final=True)


# ------------------------------------------------------------------------- token files and shards


def token_dtype(tokenizer):
    return np.dtype(np.uint16 if tokenizer.n_vocab <= 2**16 else np.uint32)


def token_file(tokenizer, tokenizer_key, text):
    """text's tokens in a cached file of uint16 (or uint32 for vocabularies past 65,536), memory-mapped."""
    dtype = token_dtype(tokenizer)
    path = cache_dir() / "tokens" / f"{tokenizer_key}-{sha256(text)[:16]}.{dtype.name}"
    if not path.exists():
        ids = np.asarray(tokenizer.encode_ordinary(text), dtype=dtype)
        atomic_write(path, lambda tmp: ids.tofile(tmp))
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def separator_id(tokenizer):
    """The id of the token that ends each document: <|endoftext|>, or Llama 3's <|end_of_text|>."""
    for name in (ENDOFTEXT, "<|end_of_text|>"):
        if name in tokenizer.special_tokens:
            return tokenizer.special_tokens[name]
    raise UserError(f"the tokenizer has no {ENDOFTEXT} or <|end_of_text|> token to end each document of a streamed corpus")


def prepare_shards(source, tokenizer, tokenizer_key, corpus, text_field="text", clean=False, val_fraction=0.1,
                   workers=None, shard_tokens=None):
    """The corpus's token shards, {"train": TokenShards, "val": TokenShards}, made once and cached.

    Worker processes encode batches of documents; this process hands them out in order and appends
    each document's ids, then the separator, to the shards of its split. After each shard it writes
    progress.json, so that an interrupted preparation resumes at the shard it was writing."""
    shard_tokens = shard_tokens or SHARD_TOKENS
    dtype = token_dtype(tokenizer)
    folder = cache_dir() / "shards" / f"{tokenizer_key}-{corpus['sha256'][:16]}-{shard_tokens}"
    manifest = folder / "manifest.json"
    if not manifest.exists():
        progress_path = folder / "progress.json"
        saved = json.loads(progress_path.read_text()) if progress_path.exists() else {}
        writers = {split: ShardWriter(folder, split, dtype, shard_tokens, **saved.get(split, {})) for split in ("train", "val")}
        first = min(w.start[0] for w in writers.values())
        if saved:
            print(f"resuming the preparation of {folder} at document {first:,}", file=sys.stderr)

        def save_progress():
            state = json.dumps({split: w.state() for split, w in writers.items()})
            atomic_write(progress_path, lambda tmp: Path(tmp).write_text(state))

        separator = separator_id(tokenizer)
        docs, _ = corpus_documents(source, text_field, clean)
        workers = workers or os.cpu_count() or 1
        progress = Progress(corpus["bytes"])
        # A forked worker starts at once with the tokenizer in hand; a spawned one (where fork is
        # missing) first re-imports the main script, torch and all.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(workers, _start_encoder, (tokenizer, separator)) as pool:
            for index, encoded, n_bytes in pool.imap(_encode_documents, tasks(docs, first)):
                for i, ids in enumerate(encoded, start=index):
                    writers["val" if is_validation(i, val_fraction) else "train"].add(i, ids, save_progress)
                progress.update(len(encoded), n_bytes, sum(map(len, encoded)))
            progress.update(0, 0, 0, final=True)
        for writer in writers.values():
            writer.flush()
        counts = {split: {"shards": w.shards, "tokens": w.tokens} for split, w in writers.items()}
        atomic_write(manifest, lambda tmp: Path(tmp).write_text(json.dumps(counts)))
        progress_path.unlink(missing_ok=True)
    counts = json.loads(manifest.read_text())
    return {split: TokenShards([folder / f"{split}-{k:06d}.{dtype.name}" for k in range(counts[split]["shards"])], dtype)
            for split in ("train", "val")}


class TokenShards:
    """Token ids kept in files of equal length (the last may be shorter), indexed as one array.

    Pickles as its paths, so that DataLoader workers each map the files themselves."""

    def __init__(self, paths, dtype):
        self.paths, self.dtype = [str(p) for p in paths], np.dtype(dtype)
        self.sizes = [os.path.getsize(p) // self.dtype.itemsize for p in self.paths]
        self.shard_tokens = max(self.sizes[0], 1) if self.sizes else 1
        self._maps = None

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def __len__(self):
        return sum(self.sizes)

    def __getitem__(self, index):
        """The ids at index (an array of positions, any shape, or a slice) as a new array."""
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r") if n else None for p, n in zip(self.paths, self.sizes)]
        index = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        out = np.empty(index.shape, dtype=self.dtype)
        shard, position = np.divmod(index, self.shard_tokens)
        for k in np.unique(shard):
            here = shard == k
            out[here] = self._maps[k][position[here]]
        return out

    def __array__(self, dtype=None, copy=None):
        return self[:].astype(dtype or self.dtype)


class ShardWriter:
    """Appends documents' ids to one split and writes each full shard atomically. position() is where
    the first id not yet in a written shard comes from, (document index, offset in its ids), which is
    what an interrupted preparation resumes from."""

    def __init__(self, folder, split, dtype, shard_tokens, shards=0, document=0, offset=0):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards, self.start = shards, (document, offset)
        self.buffer = np.empty(shard_tokens, dtype=dtype)
        self.filled = 0
        self.tokens = shards * shard_tokens

    def path(self, k):
        return self.folder / f"{self.split}-{k:06d}.{self.dtype.name}"

    def add(self, document, ids, on_shard):
        """Append document's ids, skipping what written shards hold; on_shard() after each shard write."""
        if document < self.start[0]:
            return
        offset = self.start[1] if document == self.start[0] else 0
        while offset < len(ids):
            if self.filled == 0:
                self.start = (document, offset)
            n = min(len(ids) - offset, self.shard_tokens - self.filled)
            self.buffer[self.filled : self.filled + n] = ids[offset : offset + n]
            self.filled, offset, self.tokens = self.filled + n, offset + n, self.tokens + n
            if self.filled == self.shard_tokens:
                self.flush()
                self.start = (document, offset)
                on_shard()
        if self.filled == 0:
            self.start = (document + 1, 0)

    def flush(self):
        if self.filled:
            ids = self.buffer[: self.filled]
            atomic_write(self.path(self.shards), lambda tmp: ids.tofile(tmp))
            self.shards, self.filled = self.shards + 1, 0

    def state(self):
        return {"shards": self.shards, "document": self.start[0], "offset": self.start[1]}


# ------------------------------------------------------------------ worker processes and progress


_worker_tokenizer = None


def _start_encoder(tokenizer, separator):
    global _worker_tokenizer
    _worker_tokenizer = (tokenizer, separator)


def _encode_documents(task):
    """(first index, [ids of each document followed by the separator], UTF-8 bytes) for a worker's task."""
    first, texts = task
    tokenizer, separator = _worker_tokenizer
    dtype = token_dtype(tokenizer)
    n_bytes = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
    return first, [np.asarray(tokenizer.encode_ordinary(text) + [separator], dtype=dtype) for text in texts], n_bytes


def tasks(docs, first=0, task_chars=2**20):
    """Documents in batches of about task_chars characters, each with the index of its first document;
    documents before first are read and skipped."""
    batch, chars, start = [], 0, first
    for index, text in enumerate(docs):
        if index < first:
            continue
        batch.append(text)
        chars += len(text)
        if chars >= task_chars:
            yield start, batch
            start, batch, chars = index + 1, [], 0
    if batch:
        yield start, batch


class Progress:
    """Documents, MB and tokens per second and the time left, on one line of stderr, every few seconds.
    A pass that reads the corpus without encoding it (label) shows no tokens; the first pass, which
    learns the corpus's size, no time left."""

    def __init__(self, total_bytes, every=2.0, label="encoding"):
        self.total, self.every, self.label = total_bytes, every, label
        self.docs = self.bytes = self.tokens = 0
        self.start = self.last = time.time()
        self.tty = sys.stderr.isatty()
        self.line_start = "\r" if self.tty else ""  # a terminal redraws one line; a log gets a line each time

    def update(self, docs, n_bytes, tokens, final=False):
        self.docs, self.bytes, self.tokens = self.docs + docs, self.bytes + n_bytes, self.tokens + tokens
        now = time.time()
        if not final and now - self.last < (self.every if self.tty else 5 * self.every):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.bytes / elapsed
        size = f" of {self.total / 1e6:,.1f}" if self.total else ""
        tokens = f", {self.tokens / elapsed / 1e6:.2f}M tokens/s" if self.label == "encoding" else ""
        left = f", {(self.total - self.bytes) / rate:.0f} s left" if self.total and rate else ""
        print(f"{self.line_start}{self.label}: {self.docs:,} documents, {self.bytes / 1e6:,.1f}{size} MB, "
              f"{self.docs / elapsed:,.0f} documents/s, {rate / 1e6:.1f} MB/s{tokens}{left}",
              end="\n" if final or not self.tty else "", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------- shared helpers


def cache_dir():
    if os.environ.get("LLMS_FROM_SCRATCH_CACHE"):
        return Path(os.environ["LLMS_FROM_SCRATCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llms-from-scratch"


def sha256(data):
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def atomic_write(path, write):
    """Call write(temp_path), then move the temp file onto path, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give them the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def size(n_bytes):
    """'3.2 MB', '41.0 KB' or '512 bytes': a size in the largest unit that keeps it 1 or more."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.1f} {unit}"
    return f"{n_bytes:,} bytes"


def in_one_line(error, limit=160):
    """An exception's message on one line, cut to limit characters: torch's state-dict errors list
    every key over several lines, pyarrow's its context."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

def write_texts(folder):
    """The built-in corpus as one .txt file a topic (train.py --examples), to try --data on a folder."""
    from pydoc_data.topics import topics

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for key in sorted(topics):
        (folder / f"{re.sub(r'[^A-Za-z0-9]+', '_', key)}.txt").write_text(topics[key], encoding="utf-8")
    return f"{len(topics)} .txt files in {folder}"
