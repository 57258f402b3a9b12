"""
Data for train.py and sample.py: where a corpus comes from, how it becomes tokens, and the batch stream.

A model file names its pipeline with TASK; PIPELINES maps that name to the class that feeds it:
    causal_lm   text -> byte-level BPE (bpe.py) -> memory-mapped token file -> windows {idx, targets}
    image_text  pictures of shapes made here, or an image folder with captions -> {pixel_values,
                input_ids}; images go through the model file's own preprocess(image, image_size)
    prefix_lm   pictures of shapes with questions, or an image folder with prefixes and suffixes ->
                {pixel_values, input_ids, prefix_len, targets}; only the suffix is scored

Every pipeline offers the same few methods, so train.py never needs to know which one it drives:
    model_config()       Config fields the data decides (the vocabulary size)
    check(config)        DataError unless both splits hold an example of the model's shape
    unit(config)         what the log counts, e.g. ("tokens", tokens per example)
    stream(config, ...)  an IterableDataset of batches, dicts passed as model(**batch); a batch whose
                         loss is a mean over a varying number of tokens also carries loss_weight, that
                         number, which train.py takes out to weigh the micro-batches of a step
    evaluate(...)        validation metrics, a dict of floats whose first key is val_loss
    eval_examples(...)   how many examples one evaluation reads, to plan a time budget
    demo(...)            a short sample to print at the end of training
    save(out_dir)        what sample.py needs besides the weights (the tokenizer)

Where things are cached ($LLMS_FROM_SCRATCH_CACHE, else $XDG_CACHE_HOME/llms-from-scratch, else
~/.cache/llms-from-scratch), each keyed by content so that a changed corpus never reads a stale file:
    downloads/<sha256 of the URL>.txt
    tokenizers/<sha256 of training text, vocabulary size, split pattern>/tokenizer.{tiktoken,json}
    tokens/<tokenizer key>-<sha256 of the split's text>.<uint16|uint32>
    shards/<tokenizer key>-<sha256 of the documents>-<shard size>/{train,val}-NNNNNN.<uint16|uint32>, manifest.json
"""

import codecs
import glob
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info


class DataError(Exception):
    """Bad input, said in one sentence; the command-line scripts print it and exit with code 2."""


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


# ---------------------------------------------------------------------------------------------- text

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
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


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
            raise DataError(f"could not download {url} ({e}); check the URL or pass a local file") from None
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(body))
    return path


def is_saved_dataset(path):
    """Whether path is a folder that Hugging Face datasets' save_to_disk wrote (one split or several)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


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
            raise DataError(f"{source} is an image folder (it holds metadata.jsonl); a text model trains on .txt files, "
                            "an image model (such as siglip) on this folder")
        if not files:
            raise DataError(f"the directory {source} holds no .txt, .jsonl or .parquet files; pass a text file, "
                            "a folder of them or a glob")
        return files
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p))
    if not files:
        raise DataError(f"no file matches --data {source}; pass a text file, a folder of .txt, .jsonl or .parquet "
                        "files, a glob, a URL, a saved Hugging Face dataset folder or hf:NAME")
    return files


def decode_file(path):
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        warn(f"{path} is not valid UTF-8 (byte {e.start}); undecodable bytes were replaced with U+FFFD")
        return raw.decode("utf-8", errors="replace")


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
        raise DataError(f"--data {source} is empty; pass a file with text in it")
    return text


def split_text(text, val_fraction=0.1):
    """The first (1 - val_fraction) of the characters for training, the rest for validation."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def text_documents(path):
    """A .txt file as documents of about DOCUMENT_CHARS, each cut at the last blank line (else line
    break) before that size, so that a paragraph is rarely cut in two. The file is read and decoded
    TEXT_BLOCK_BYTES at a time: a single .txt of gigabytes (TinyStories ships as one) never sits in
    memory whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    text, position = "", 0
    with open(path, "rb") as f:
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
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path} line {number} is not JSON; each line must be an object with a "
                                f"{text_field!r} field") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataError(f"{path} line {number} has no {text_field!r} field holding text; "
                                "name the field with --text-field") from None
            yield record[text_field]


def arrow_documents(batches, text_field, where):
    """The text_field column of an iterable of pyarrow record batches, without None."""
    for batch in batches:
        if text_field not in batch.schema.names:
            raise DataError(f"{where} has no {text_field!r} column (it has {', '.join(batch.schema.names)}); "
                            "name the column with --text-field")
        yield from (text for text in batch.column(text_field).to_pylist() if text is not None)


def parquet_documents(path, text_field):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow; install it with pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
    except Exception as e:  # pyarrow raises several error types for files that are not parquet
        raise DataError(f"cannot read the parquet file {path} ({in_one_line(e)})") from None
    if text_field not in names:
        raise DataError(f"{path} has no {text_field!r} column (it has {', '.join(names)}); name the column with --text-field")
    yield from arrow_documents(parquet.iter_batches(batch_size=1024, columns=[text_field]), text_field, path)


def saved_dataset_documents(path, text_field):
    """A folder of Hugging Face datasets' save_to_disk, read with pyarrow (its files are Arrow
    streams, listed in state.json); of a DatasetDict, the train split."""
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow; install it with pip install pyarrow") from None
    if (path / "dataset_dict.json").is_file():
        if not (path / "train" / "state.json").is_file():
            raise DataError(f"the dataset folder {path} has no train split")
        path = path / "train"
    try:
        files = [path / f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read {path / 'state.json'} ({in_one_line(e)}); is it a save_to_disk folder?") from None
    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                yield from arrow_documents(pa.ipc.open_stream(source), text_field, path)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"cannot read the dataset file {file} ({in_one_line(e)})") from None


def hub_dataset_documents(name, text_field):
    """hf:NAME: a dataset of the Hugging Face hub, streamed by the datasets package (its train split)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"--data hf:{name} needs the datasets package; install it with pip install datasets") from None
    try:
        stream = datasets.load_dataset(name, split="train", streaming=True)
        for record in stream:
            if not isinstance(record.get(text_field), str):
                raise DataError(f"the dataset {name} has no {text_field!r} column holding text; name it with --text-field")
            yield record[text_field]
    except DataError:
        raise
    except Exception as e:  # network, missing dataset, bad config: said by datasets in many error types
        raise DataError(f"could not read the dataset {name} ({in_one_line(e)})") from None


def in_one_line(error, limit=160):
    """An exception's message on one line, cut to limit characters: torch's state-dict errors list
    every key over several lines, pyarrow's its context."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def documents(source, text_field="text"):
    """The documents of source in a fixed order: each .jsonl line, parquet or dataset row, and each
    piece of a .txt file (text_documents)."""
    if source.startswith("hf:"):
        yield from hub_dataset_documents(source[3:], text_field)
        return
    path = Path(source).expanduser()
    if is_saved_dataset(path):
        yield from saved_dataset_documents(path, text_field)
        return
    for file in corpus_files(source):
        if file.suffix == ".jsonl":
            yield from jsonl_documents(file, text_field)
        elif file.suffix == ".parquet":
            yield from parquet_documents(file, text_field)
        else:
            yield from text_documents(file)


# Control characters other than whitespace: the C0 and C1 codes, DEL, less what str.isspace keeps.
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
                f"characters and dropped {self.duplicates:,} duplicate documents ({self.duplicate_bytes / 1e6:,.1f} MB)")


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


# ------------------------------------------------------------------------------------------ tokens


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
        raise DataError(str(e)) from None
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


def load_tokenizer(directory):
    """The tokenizer in directory: what train.py saved (tokenizer.tiktoken beside our own tokenizer.json),
    else a Hugging Face folder's tokenizer.json, else Llama 3's tokenizer.model (a tiktoken rank file)."""
    import bpe

    directory = Path(directory)
    # train.py's tokenizer.json holds only the pattern and the special tokens; its ranks live in
    # tokenizer.tiktoken, which a Hugging Face folder never has, so that file tells the two apart.
    if (directory / "tokenizer.tiktoken").is_file():
        return bpe.Tokenizer.load(directory)
    if (directory / "tokenizer.json").is_file():
        return bpe.Tokenizer.from_hf(directory / "tokenizer.json")
    if (directory / "tokenizer.model").is_file():
        return bpe.Tokenizer.from_llama3(directory / "tokenizer.model")
    raise DataError(f"{directory} holds no tokenizer: neither a tokenizer.json (with tokenizer.tiktoken if "
                    "train.py wrote it) nor Llama 3's tokenizer.model")


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
    raise DataError(f"the tokenizer has no {ENDOFTEXT} or <|end_of_text|> token to end each document of a streamed corpus")


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


# ---------------------------------------------------------------------------------------- batches


class WindowStream(IterableDataset):
    """Endless batches of windows of seq_len + 1 tokens, in an order that depends only on (seed, step).

    tokens is a TokenShards: the windows run across shard boundaries as if the shards were one file.
    Each epoch cuts the tokens into windows at a random offset and shuffles them. A step takes
    world_size * grad_accum * batch_size windows in that order; micro-batch m of rank r gets the
    slice ((m * world_size) + r) * batch_size, so 2 ranks with batch B see what 1 rank with batch 2B
    sees. Item i of the stream is (step, micro) = divmod(i, grad_accum); DataLoader worker w of n
    makes items w, w + n, ... and the DataLoader hands them out in turn, so the order is kept.
    """

    def __init__(self, tokens, seq_len, batch_size, seed=0, start_step=0, rank=0, world_size=1, grad_accum=1):
        super().__init__()
        self.tokens, self.seq_len = tokens, seq_len
        self.batch_size, self.seed, self.start_step = batch_size, seed, start_step
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        n_tokens = len(tokens)
        # Keep seq_len - 1 tokens of slack so that every epoch's random offset fits.
        self.n_windows = (n_tokens - 1 - (seq_len - 1)) // seq_len
        if self.n_windows < 1:
            raise DataError(
                f"the training split has {n_tokens} tokens, too few for windows of {seq_len}; "
                "use more text or a shorter context (--set max_seq_len=...)"
            )
        self._epochs = {}

    def epoch(self, e):
        """(offset, permutation of window indices) of epoch e."""
        if e not in self._epochs:
            rng = np.random.default_rng([self.seed, e])
            self._epochs = {e: (int(rng.integers(self.seq_len)), rng.permutation(self.n_windows))}
        return self._epochs[e]

    def starts(self, step, micro):
        """First token of each window of this rank's micro-batch at (step, micro)."""
        per_step = self.world_size * self.grad_accum * self.batch_size
        first = step * per_step + (micro * self.world_size + self.rank) * self.batch_size
        out = np.empty(self.batch_size, dtype=np.int64)
        for j, g in enumerate(range(first, first + self.batch_size)):
            e, i = divmod(g, self.n_windows)
            offset, perm = self.epoch(e)
            out[j] = offset + perm[i] * self.seq_len
        return out

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        span = np.arange(self.seq_len + 1)
        item = self.start_step * self.grad_accum + worker
        while True:
            step, micro = divmod(item, self.grad_accum)
            windows = torch.from_numpy(self.tokens[self.starts(step, micro)[:, None] + span].astype(np.int64))
            yield {"idx": windows[:, :-1], "targets": windows[:, 1:]}
            item += n_workers


# --------------------------------------------------------------------------------------- pipeline


class CausalLM:
    """Next-token prediction on text: BPE tokens, windows of the training split, bits per byte."""

    def __init__(self, source=None, vocab_size=2048, pattern=None, val_fraction=0.1, tokenizer=None,
                 text_field="text", clean=False, workers=None):
        """tokenizer: None to train one on the training split, or (tokenizer, key, files) to use that
        one, a pretrained model's: key names its token files in the cache, files are copied by save().

        A small corpus of .txt files (is_small_corpus) is split by characters and encoded whole; any
        other is streamed as documents (text_field names their text in .jsonl, parquet and datasets),
        cleaned if asked (Cleaner), split into whole documents and encoded by worker processes into
        shards, each document ending in <|endoftext|> (prepare_shards)."""
        self.tokenizer_files = None if tokenizer is None else tokenizer[2]
        if is_small_corpus(source) and not clean:
            self._read_whole(source, vocab_size, pattern, val_fraction, tokenizer)
        else:
            self._stream(source, vocab_size, pattern, val_fraction, tokenizer, text_field, clean, workers)
        # UTF-8 bytes of every token, to turn a loss per token into bits per byte.
        self.token_bytes = torch.tensor([len(self.tokenizer.decode_bytes([i])) for i in range(self.tokenizer.n_vocab)])
        if self.separator is not None:
            self.token_bytes[self.separator] = 0  # the end of a document is no text of the corpus

    def _read_whole(self, source, vocab_size, pattern, val_fraction, tokenizer):
        text = read_text(source)
        train_text, val_text = split_text(text, val_fraction)
        if not val_text.strip():
            raise DataError("the corpus is too short to hold out a validation split; pass more text")
        if tokenizer is None:
            self.tokenizer, key = train_tokenizer(train_text, vocab_size, pattern)
        else:
            self.tokenizer, key, _ = tokenizer
        dtype = token_dtype(self.tokenizer)
        self.train_tokens, self.val_tokens = (
            TokenShards([tokens.filename] if isinstance(tokens, np.memmap) else [], dtype)
            for tokens in (token_file(self.tokenizer, key, train_text), token_file(self.tokenizer, key, val_text)))
        self.separator = None
        self.fingerprint = {"corpus_sha256": sha256(text), "tokenizer": key}

    def _stream(self, source, vocab_size, pattern, val_fraction, tokenizer, text_field, clean, workers):
        corpus = survey(source, text_field, clean, val_fraction)
        if corpus["cleaner"] is not None:
            print(corpus["cleaner"].report(), file=sys.stderr)
        if corpus["documents"] == 0:
            raise DataError(f"--data {source} is empty; pass a source with text in it")
        if int(corpus["documents"] * val_fraction) == 0:  # how many documents is_validation holds out
            raise DataError(f"--data {source} has {corpus['documents']} documents, too few to hold out a validation "
                            f"split of whole documents (one in every {1 / val_fraction:g}); pass more documents")
        if tokenizer is None:
            # Every stride-th training document, about TOKENIZER_SAMPLE_BYTES in all: see README.md.
            stride = max(1, -(-corpus["train_bytes"] // TOKENIZER_SAMPLE_BYTES))
            sample = tokenizer_sample(source, text_field, clean, val_fraction, stride, corpus["bytes"])
            self.tokenizer, key = train_tokenizer(sample, vocab_size, pattern, special_tokens=(ENDOFTEXT,),
                                                  content_key=f"{corpus['sha256'][:16]}-every{stride}")
        else:
            self.tokenizer, key, _ = tokenizer
        self.separator = separator_id(self.tokenizer)
        shards = prepare_shards(source, self.tokenizer, key, corpus, text_field, clean, val_fraction, workers)
        self.train_tokens, self.val_tokens = shards["train"], shards["val"]
        self.fingerprint = {"corpus_sha256": corpus["sha256"], "tokenizer": key}

    def describe(self):
        return (
            f"{len(self.train_tokens):,} training and {len(self.val_tokens):,} validation tokens, "
            f"vocabulary {self.tokenizer.n_vocab}"
        )

    def model_config(self):
        return {"vocab_size": self.tokenizer.n_vocab}

    def check(self, config):
        seq_len = config.max_seq_len
        for split, tokens in (("training", self.train_tokens), ("validation", self.val_tokens)):
            if len(tokens) < seq_len + 1:
                raise DataError(
                    f"the {split} split has {len(tokens):,} tokens, too few for one window of {seq_len} + 1; "
                    "use more text or a shorter context (--set max_seq_len=...)"
                )

    def unit(self, config):
        return "tokens", config.max_seq_len

    def stream(self, config, batch_size, **kwargs):
        return WindowStream(self.train_tokens, config.max_seq_len, batch_size, **kwargs)

    def eval_examples(self, config, max_tokens=None):
        n = (len(self.val_tokens) - 1) // config.max_seq_len
        return min(n, max(1, max_tokens // config.max_seq_len)) if max_tokens else n

    @torch.no_grad()
    def evaluate(self, model, config, batch_size, device, autocast, max_tokens=None):
        """Mean validation cross-entropy (nats per token), perplexity and bits per byte, over whole windows.

        Under DDP each rank takes every world_size-th window and the sums are all-reduced.
        """
        self.check(config)
        seq_len = config.max_seq_len
        n = self.eval_examples(config, max_tokens)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        mine = np.arange(rank, n, world)
        span = np.arange(seq_len + 1)
        sums = torch.zeros(3, dtype=torch.float64)  # loss * tokens, tokens, bytes
        was_training = model.training
        model.eval()
        for i in range(0, len(mine), batch_size):
            w = torch.from_numpy(self.val_tokens[mine[i : i + batch_size, None] * seq_len + span].astype(np.int64))
            x, y = w[:, :-1].to(device), w[:, 1:].to(device)
            # No targets: the model's own loss may add auxiliary terms (MoE balancing), and the
            # cross-entropy from the logits is all that bits per byte measures.
            with autocast():
                logits, _ = model(x)
            nats = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            sums += torch.tensor([nats, y.numel(), self.token_bytes[y.cpu()].sum().item()], dtype=torch.float64)
        model.train(was_training)
        if dist.is_initialized():
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        loss, tokens, n_bytes = sums.tolist()
        loss /= tokens
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": loss * tokens / (math.log(2) * n_bytes)}

    def demo(self, model, device, prompt="The", max_new_tokens=200, temperature=0.8, top_k=50, seed=0):
        ids = self.tokenizer.encode_ordinary(prompt)
        max_new_tokens = min(max_new_tokens, model.config.max_seq_len - len(ids))
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
        return self.tokenizer.decode(out[0].tolist())

    def save(self, out_dir):
        if self.tokenizer_files is None:
            self.tokenizer.save(out_dir)
            return
        for path in self.tokenizer_files:  # a pretrained tokenizer, in its own files, as sample.py reads them
            atomic_write(Path(out_dir) / path.name, lambda tmp, path=path: shutil.copyfile(path, tmp))


# ---------------------------------------------------------------------------------------- images

PAD = "<|pad|>"  # fills every caption to the model's fixed text length


def caption_ids(tokenizer, texts, length):
    """(N, length) ids: each caption's tokens, cut to length - 1, then PAD to the end.

    A SigLIP-style text tower pools whatever sits at the last position, so every caption must end
    there in the same token: at least one PAD, always.
    """
    pad = tokenizer.special_tokens[PAD]
    ids = np.full((len(texts), length), pad, dtype=np.int64)
    for row, text in zip(ids, texts):
        tokens = tokenizer.encode_ordinary(text)[: length - 1]
        row[: len(tokens)] = tokens
    return torch.from_numpy(ids)


def draw_shape(pen, shape, cx, cy, r, fill):
    """A circle, square or triangle of half-width r centred on (cx, cy), with a pillow ImageDraw pen."""
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)


class Shapes:
    """Pictures made here: one shape of a colour, a size and a place on a noisy grey background, and the
    caption that says so ("a small red circle at the top").

    Example g is drawn from a generator seeded with (seed, g), so the data is the same on every
    machine and a resumed run sees what an uninterrupted one sees. Training never shows the HELD_OUT
    colour-shape combinations. Evaluation shows fresh pictures of every combination, each to be told
    apart from the 18 captions that differ from its own in colour and shape only: the accuracy on the
    held-out ones measures whether the model composes colour and shape or memorises pairs.
    """

    COLOURS = {"red": (215, 35, 35), "green": (35, 165, 55), "blue": (40, 80, 225), "yellow": (235, 215, 30),
               "purple": (140, 55, 185), "orange": (245, 135, 25)}
    SHAPES = ("circle", "square", "triangle")
    SIZES = {"small": 0.32, "large": 0.6}  # side as a fraction of the picture
    PLACES = {"at the top": (0.5, 0.3), "at the bottom": (0.5, 0.7), "on the left": (0.3, 0.5),
              "on the right": (0.7, 0.5), "in the middle": (0.5, 0.5)}
    HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
    VAL_PER_COMBINATION = 16

    def __init__(self):
        self.combos = [(c, s) for c in self.COLOURS for s in self.SHAPES]
        self.train_combos = [c for c in self.combos if c not in self.HELD_OUT]
        self.labels = [self.caption(c, s, size, place) for size in self.SIZES for place in self.PLACES
                       for c, s in self.combos]
        self.val = [(i, combo) for combo in self.combos for i in range(self.VAL_PER_COMBINATION)]

    @staticmethod
    def caption(colour, shape, size, place):
        return f"a {size} {colour} {shape} {place}"

    def caption_corpus(self):
        """Every caption the data can show, for the tokenizer."""
        return "\n".join(self.labels)

    def draw(self, rng, colour, shape, image_size):
        """(picture, caption, (size, place)) of colour and shape, the rest drawn from rng."""
        from PIL import Image, ImageDraw

        size = list(self.SIZES)[rng.integers(len(self.SIZES))]
        place = list(self.PLACES)[rng.integers(len(self.PLACES))]
        noise = rng.normal(rng.integers(60, 200), 18, (image_size, image_size, 3)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(noise)
        r = image_size * self.SIZES[size] * rng.uniform(0.9, 1.1) / 2
        cx, cy = (image_size * (f + rng.uniform(-0.04, 0.04)) for f in self.PLACES[place])
        fill = tuple(int(v) for v in np.clip(np.array(self.COLOURS[colour]) + rng.integers(-20, 21, 3), 0, 255))
        draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, fill)
        return image, self.caption(colour, shape, size, place), (size, place)

    def train_pair(self, g, seed, image_size):
        rng = np.random.default_rng([seed, g])  # two numbers; validation pictures use three, so never the same
        return self.draw(rng, *self.train_combos[rng.integers(len(self.train_combos))], image_size)[:2]

    def train_batch(self, examples, seed, preprocess, image_size):
        pairs = [self.train_pair(g, seed, image_size) for g in examples]
        return preprocess([image for image, _ in pairs], image_size), [caption for _, caption in pairs]

    def validation_set(self, preprocess, image_size):
        pictures, captions, candidates, answers, held_out = self.val_pairs(image_size)
        return preprocess(pictures, image_size), captions, candidates, answers, held_out

    def val_pairs(self, image_size):
        """(pictures, captions, candidates, answers, held out?) of the validation split: the candidates
        of a picture are the indices in labels of the 18 captions with its size and place."""
        pictures, captions, candidates, answers = [], [], [], []
        for i, (c, s) in self.val:
            rng = np.random.default_rng([i, self.combos.index((c, s)), 1])
            image, caption, (size, place) = self.draw(rng, c, s, image_size)
            choices = [self.labels.index(self.caption(*combo, size, place)) for combo in self.combos]
            pictures.append(image)
            captions.append(caption)
            candidates.append(choices)
            answers.append(choices.index(self.labels.index(caption)))
        held_out = [combo in self.HELD_OUT for _, combo in self.val]
        return pictures, captions, candidates, answers, held_out

    def describe(self):
        return (f"shapes: {len(self.COLOURS)} colours x {len(self.SHAPES)} shapes, {len(self.HELD_OUT)} combinations "
                f"never trained on, {len(self.val)} validation pictures")


class ImageFolder:
    """A Hugging Face imagefolder: metadata.jsonl with one {"file_name": ..., "text": ...} per line and
    the images beside it, either in DIR itself (the last 10% of the lines are held out) or in the split
    folders DIR/train and DIR/test (or DIR/validation). Images of any size and mode."""

    def __init__(self, source, val_fraction=0.1):
        root = Path(source).expanduser()
        if root.is_file():
            raise DataError(f"--data {source} is a file; an image-text model needs a folder with metadata.jsonl "
                            "(one {\"file_name\": ..., \"text\": ...} per line) and the images beside it")
        if not root.is_dir():
            raise DataError(f"no folder {source}; pass an image folder with metadata.jsonl")
        val_dir = next((root / d for d in ("test", "validation") if (root / d / "metadata.jsonl").is_file()), None)
        if (root / "train" / "metadata.jsonl").is_file() and val_dir is not None:
            self.train, self.val = self.read(root / "train"), self.read(val_dir)
        elif (root / "metadata.jsonl").is_file():
            pairs = self.read(root)
            cut = int(len(pairs) * (1 - val_fraction))
            self.train, self.val = pairs[:cut], pairs[cut:]
        else:
            raise DataError(f"{source} holds no metadata.jsonl (nor train/ with test/ or validation/ beside it); "
                            "an image folder needs one {\"file_name\": ..., \"text\": ...} line per image")
        if not self.train or not self.val:
            raise DataError(f"{source} holds {len(self.train)} training and {len(self.val)} validation images; "
                            "it needs at least one of each")
        self.labels = sorted({text for _, text in self.val})  # the zero-shot candidates
        self.images = {}
        self.order = (None, None)  # ((seed, epoch), permutation): the last epoch's shuffle

    @staticmethod
    def read(folder):
        import json

        pairs = []
        path = folder / "metadata.jsonl"
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise DataError(f"{path} line {n} is not JSON; each line must be {{\"file_name\": ..., \"text\": ...}}") from None
            if not isinstance(record, dict) or not isinstance(record.get("file_name"), str) or not isinstance(record.get("text"), str):
                raise DataError(f"{path} line {n} has no \"file_name\" and \"text\" strings; "
                                "each line must be {\"file_name\": ..., \"text\": ...}")
            image = folder / record["file_name"]
            if not image.is_file():
                raise DataError(f"{path} line {n} names {record['file_name']}, which is not in {folder}")
            pairs.append((image, record["text"]))
        return pairs

    def caption_corpus(self):
        return "\n".join(text for _, text in self.train)

    def pictures(self, split, preprocess, image_size):
        """(N, 3, S, S) of a split, preprocessed once and kept (the folder is expected to be small)."""
        from PIL import Image, UnidentifiedImageError

        key = (split, image_size)
        if key not in self.images:
            tensors = []
            for path, _ in getattr(self, split):
                try:
                    with Image.open(path) as image:
                        tensors.append(preprocess(image, image_size))
                except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
                    raise DataError(f"cannot read the image {path} ({e}); replace or remove it") from None
            self.images[key] = torch.stack(tensors)
        return self.images[key]

    def train_batch(self, examples, seed, preprocess, image_size):
        """Example g is position g % N of epoch g // N's shuffle of the N training images."""
        picks = [self.shuffle(seed, g) for g in examples]
        return self.pictures("train", preprocess, image_size)[picks], [self.train[i][1] for i in picks]

    def shuffle(self, seed, g):
        epoch, position = divmod(g, len(self.train))
        if self.order[0] != (seed, epoch):
            self.order = ((seed, epoch), np.random.default_rng([seed, epoch]).permutation(len(self.train)))
        return self.order[1][position]

    def validation_set(self, preprocess, image_size):
        """Every image against all distinct captions of the split; its own is the answer."""
        captions = [text for _, text in self.val]
        candidates = [list(range(len(self.labels)))] * len(captions)
        answers = [self.labels.index(text) for text in captions]
        return self.pictures("val", preprocess, image_size), captions, candidates, answers, None

    def describe(self):
        return (f"{len(self.train):,} training and {len(self.val):,} validation images, "
                f"{len(self.labels)} distinct validation captions")


class PairStream(IterableDataset):
    """Endless batches of {pixel_values, input_ids}, in an order that depends only on (seed, step).

    The slicing of a step among ranks and micro-batches is WindowStream's. Example g is the g-th
    picture made for a seed (shapes, which never repeat) or, for a folder of N images, the g % N-th of
    epoch g // N's shuffle.
    """

    def __init__(self, pipe, config, batch_size, seed=0, start_step=0, rank=0, world_size=1, grad_accum=1):
        super().__init__()
        self.pipe, self.config, self.batch_size, self.seed = pipe, config, batch_size, seed
        self.start_step, self.rank, self.world_size, self.grad_accum = start_step, rank, world_size, grad_accum

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        item = self.start_step * self.grad_accum + worker
        per_step = self.world_size * self.grad_accum * self.batch_size
        while True:
            step, micro = divmod(item, self.grad_accum)
            first = step * per_step + (micro * self.world_size + self.rank) * self.batch_size
            yield self.pipe.batch(range(first, first + self.batch_size), self.seed, self.config)
            item += n_workers


def folder_fingerprint(folder):
    """sha256 over the names, sizes and texts of an image folder's examples, so that a resumed run
    notices other data under the same --data."""
    return sha256("\n".join(f"{p.name}\t{p.stat().st_size}\t{t}" for p, t in folder.train + folder.val))


class ImagePipeline:
    """What the image pipelines share: pictures and texts from self.data, the texts tokenized by
    self.tokenizer, which they train, and batches streamed by PairStream."""

    def describe(self):
        return f"{self.data.describe()}, vocabulary {self.tokenizer.n_vocab}"

    def model_config(self):
        return {"vocab_size": self.tokenizer.n_vocab}

    def stream(self, config, batch_size, **kwargs):
        return PairStream(self, config, batch_size, **kwargs)

    def save(self, out_dir):
        self.tokenizer.save(out_dir)


class ImageText(ImagePipeline):
    """Image-caption pairs for a contrastive model: the sigmoid loss on held-out pairs, and zero-shot
    accuracy, the share of held-out images whose own caption ranks first among the candidates."""

    def __init__(self, source=None, vocab_size=512, preprocess=None, val_fraction=0.1):
        if preprocess is None:
            raise DataError("an image-text model file must define preprocess(image, image_size) for data.py to call")
        self.data = Shapes() if source is None else ImageFolder(source, val_fraction)
        self.preprocess = preprocess
        corpus = self.data.caption_corpus()
        self.tokenizer, key = train_tokenizer(corpus, vocab_size, special_tokens=(PAD,))
        self.fingerprint = {"images": "shapes" if source is None else folder_fingerprint(self.data), "tokenizer": key}
        self.val = None

    def check(self, config):
        if config.max_seq_len < 2:
            raise DataError("captions need max_seq_len of at least 2: one token and the padding the model pools")
        self.validation(config)  # reads (and checks) every image now, before anything is written
        self.data.train_batch([0], 0, self.preprocess, config.image_size)

    def unit(self, config):
        return "pairs", 1

    def validation(self, config):
        """(pixel_values, input_ids, candidates, answers, held_out, label_ids) of the validation split:
        image i is to pick label candidates[i, answers[i]] among the labels candidates[i]; held_out
        marks the shapes of combinations never trained on (None for a folder)."""
        if self.val is None or self.val[0].shape[-1] != config.image_size:
            pixels, captions, candidates, answers, held_out = self.data.validation_set(self.preprocess, config.image_size)
            # A fixed shuffle, so that a validation batch mixes captions as a training batch does (a
            # folder sorted by class, or the shapes in their order, would fill a batch with one).
            order = torch.from_numpy(np.random.default_rng(0).permutation(len(answers)))
            self.val = (pixels[order], caption_ids(self.tokenizer, captions, config.max_seq_len)[order],
                        torch.tensor(candidates)[order], torch.tensor(answers)[order],
                        None if held_out is None else torch.tensor(held_out)[order],
                        caption_ids(self.tokenizer, self.data.labels, config.max_seq_len))
        return self.val

    def batch(self, examples, seed, config):
        pixels, captions = self.data.train_batch(examples, seed, self.preprocess, config.image_size)
        return {"pixel_values": pixels, "input_ids": caption_ids(self.tokenizer, captions, config.max_seq_len)}

    def eval_examples(self, config, max_tokens=None):
        return len(self.data.val)

    @torch.no_grad()
    def evaluate(self, model, config, batch_size, device, autocast, max_tokens=None):
        """val_loss: the model's loss over batches of the validation pairs, as large as training's
        global batch (under DDP each rank holds its slice and the model gathers the captions, as in
        training). val_accuracy: zero-shot, each image against every candidate caption."""
        pixels, ids, candidates, answers, held_out, label_ids = self.validation(config)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        was_training = model.training
        model.eval()
        per_rank = max(1, min(batch_size, len(ids) // world))
        n_batches = len(ids) // (per_rank * world)
        # the sum of the batch losses, then right answers and images, overall and on held-out combinations
        sums = torch.zeros(5, dtype=torch.float64)
        for i in range(n_batches):
            mine = slice((i * world + rank) * per_rank, (i * world + rank + 1) * per_rank)
            with autocast():
                _, loss = model(pixels[mine].to(device), ids[mine].to(device))
            # Each rank's loss is world_size times its share of the batch's loss (see siglip.py).
            sums[0] += loss.float().item() / world
        for i in range(rank * batch_size, len(ids), world * batch_size):
            mine = slice(i, i + batch_size)
            with autocast():
                probs = model.classify(pixels[mine].to(device), label_ids.to(device)).float().cpu()
            # The most probable of each image's own candidates (a softmax over all labels keeps their order).
            correct = (probs.gather(1, candidates[mine]).argmax(-1) == answers[mine]).double()
            sums[1:3] += torch.tensor([correct.sum(), len(correct)])
            if held_out is not None:
                sums[3:5] += torch.tensor([correct[held_out[mine]].sum(), held_out[mine].sum()])
        model.train(was_training)
        if dist.is_initialized():
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        result = {"val_loss": sums[0].item() / n_batches, "val_accuracy": (sums[1] / sums[2]).item()}
        if held_out is not None:
            result["val_accuracy_seen"] = ((sums[1] - sums[3]) / (sums[2] - sums[4])).item()
            result["val_accuracy_held_out"] = (sums[3] / sums[4]).item()
        return result

    @torch.no_grad()
    def demo(self, model, device, max_new_tokens=6, seed=0, **kwargs):
        """A few validation images: the true caption, and the three candidates the model ranks first."""
        config = model.config
        pixels, _, candidates, answers, held_out, label_ids = self.validation(config)
        picks = np.random.default_rng(seed).permutation(len(answers))[: max(1, min(6, max_new_tokens))]
        if held_out is not None:  # show held-out combinations first: they are the interesting ones
            picks = sorted(picks, key=lambda i: not held_out[i])
        was_training = model.training
        model.eval()
        probs = model.classify(pixels[picks].to(device), label_ids.to(device)).float().cpu()
        model.train(was_training)
        lines = []
        for i, row in zip(picks, probs):
            mine = candidates[i]
            row = row[mine] / row[mine].sum()  # a distribution over this image's candidates
            best = row.argsort(descending=True)[:3]
            tag = " (combination never trained on)" if held_out is not None and held_out[i] else ""
            lines.append(f"{self.data.labels[mine[answers[i]]]}{tag} -> "
                         + ", ".join(f"{self.data.labels[mine[j]]} {row[j]:.2f}" for j in best))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ prefix LM

BOS, EOS = "<|bos|>", "<|eos|>"  # around every text of a prefix-LM example; PAD fills the rest


def text_length(config):
    """Text positions of a prefix-LM example: the context less the image tokens in front of the text."""
    return config.max_seq_len - config.n_image_tokens


def prefix_ids(tokenizer, prefix, length=None):
    """[bos] + prefix + "\n" with the tokenizer's special bos, the prefix cut (never bos or "\n") to leave
    one place of length for the suffix. sample.py asks a trained model the same way."""
    newline = tokenizer.encode_ordinary("\n")
    body = tokenizer.encode_ordinary(prefix)
    if length is not None:
        body = body[: max(0, length - 2 - len(newline))]
    return [tokenizer.special_tokens[BOS]] + body + newline


class ShapeQuestions:
    """Shapes as captioning and visual questions: each picture is asked to be captioned, or asked its
    colour, shape, place or size. Training example g of a seed is one picture and one question, both
    drawn from a generator seeded with (seed, g), never of a HELD_OUT combination; validation holds
    VAL_PER_COMBINATION fresh pictures of every combination, each asked every question."""

    QUESTIONS = {"caption": "caption en", "color": "answer en what color is the shape?",
                 "shape": "answer en what shape is it?", "place": "answer en where is the shape?",
                 "size": "answer en how big is the shape?"}
    VAL_PER_COMBINATION = 4

    def __init__(self):
        self.shapes = Shapes()

    @staticmethod
    def answer(kind, colour, shape, size, place, caption):
        return {"caption": caption, "color": colour, "shape": shape, "place": place, "size": size}[kind]

    def corpus(self):
        """Every prompt and answer the data can show, for the tokenizer."""
        return "\n".join([*self.QUESTIONS.values(), *self.shapes.labels])

    def train_example(self, g, seed, image_size):
        """(picture, prefix, suffix) of training example g."""
        rng = np.random.default_rng([seed, g])
        colour, shape = self.shapes.train_combos[rng.integers(len(self.shapes.train_combos))]
        image, caption, (size, place) = self.shapes.draw(rng, colour, shape, image_size)
        kind = list(self.QUESTIONS)[rng.integers(len(self.QUESTIONS))]
        return image, self.QUESTIONS[kind], self.answer(kind, colour, shape, size, place, caption)

    def prompts(self):
        return set(self.QUESTIONS.values())

    def train_batch(self, examples, seed, preprocess, image_size):
        triples = [self.train_example(g, seed, image_size) for g in examples]
        return preprocess([t[0] for t in triples], image_size), [t[1:] for t in triples]

    def validation_set(self, preprocess, image_size):
        """(pictures (M, 3, S, S), examples): one example (picture index, prefix, suffix, question, held
        out?) per picture and question."""
        pictures, examples = [], []
        for k, (colour, shape) in enumerate(self.shapes.combos):
            for i in range(self.VAL_PER_COMBINATION):
                # Three numbers, as Shapes' validation pictures, with a last one of its own.
                rng = np.random.default_rng([i, k, 2])
                image, caption, (size, place) = self.shapes.draw(rng, colour, shape, image_size)
                for kind, prompt in self.QUESTIONS.items():
                    answer = self.answer(kind, colour, shape, size, place, caption)
                    examples.append((len(pictures), prompt, answer, kind, (colour, shape) in self.shapes.HELD_OUT))
                pictures.append(image)
        return preprocess(pictures, image_size), examples

    def describe(self):
        n = len(self.shapes.combos) * self.VAL_PER_COMBINATION
        return (f"shapes with {len(self.QUESTIONS)} questions, {len(self.shapes.HELD_OUT)} colour-shape "
                f"combinations never trained on, {n} validation pictures")


class PrefixFolder(ImageFolder):
    """An image folder whose metadata.jsonl lines are {"file_name": ..., "prefix": ..., "suffix": ...},
    split as ImageFolder splits it; a training pair's text is the tuple (prefix, suffix)."""

    @staticmethod
    def read(folder):
        import json

        pairs = []
        path = folder / "metadata.jsonl"
        shape = '{"file_name": ..., "prefix": ..., "suffix": ...}'
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise DataError(f"{path} line {n} is not JSON; each line must be {shape}") from None
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str)
                                                       for k in ("file_name", "prefix", "suffix")):
                raise DataError(f"{path} line {n} lacks the \"file_name\", \"prefix\" and \"suffix\" strings; "
                                f"each line must be {shape}")
            image = folder / record["file_name"]
            if not image.is_file():
                raise DataError(f"{path} line {n} names {record['file_name']}, which is not in {folder}")
            pairs.append((image, (record["prefix"], record["suffix"])))
        return pairs

    def corpus(self):
        return "\n".join(f"{p}\n{s}" for _, (p, s) in self.train + self.val)

    def prompts(self):
        return {p for _, (p, _) in self.train + self.val}

    def validation_set(self, preprocess, image_size):
        examples = [(i, p, s, None, False) for i, (_, (p, s)) in enumerate(self.val)]
        return self.pictures("val", preprocess, image_size), examples

    def describe(self):
        return f"{len(self.train):,} training and {len(self.val):,} validation examples of an image, a prefix and a suffix"


class PrefixLM(ImagePipeline):
    """Image, prefix and suffix for a PaliGemma-style model: the text of an example is
    [bos, prefix, "\\n"][suffix, eos][pad ...], cut to the text length, and only suffix and eos are
    scored. val_loss is the mean suffix cross-entropy; val_accuracy the share of validation examples
    whose greedy answer, decoded up to eos, equals the suffix (both stripped)."""

    def __init__(self, source=None, vocab_size=512, preprocess=None, val_fraction=0.1):
        if preprocess is None:
            raise DataError("a prefix-LM model file must define preprocess(image, image_size) for data.py to call")
        self.data = ShapeQuestions() if source is None else PrefixFolder(source, val_fraction)
        self.preprocess = preprocess
        self.tokenizer, key = train_tokenizer(self.data.corpus(), vocab_size, special_tokens=(BOS, EOS, PAD))
        self.bos, self.eos, self.pad = (self.tokenizer.special_tokens[t] for t in (BOS, EOS, PAD))
        self.fingerprint = {"images": "shapes-qa" if source is None else folder_fingerprint(self.data), "tokenizer": key}
        self.val = None

    # -------------------------------------------------------------------------------- text

    def prompt_ids(self, prefix, length=None):
        return prefix_ids(self.tokenizer, prefix, length)

    def encode(self, pairs, length):
        """(input_ids (N, length), prefix_len (N,), targets (N, length)) of (prefix, suffix) pairs.

        Position t predicts token t + 1 where that token is the suffix or its eos, else -100: the last
        prefix place ("\\n") predicts the first suffix token, as paligemma.suffix_targets has it. A
        suffix too long for the row is cut, and then has no eos.
        """
        ids = np.full((len(pairs), length), self.pad, dtype=np.int64)
        targets = np.full((len(pairs), length), -100, dtype=np.int64)
        prefix_len = np.zeros(len(pairs), dtype=np.int64)
        for row, (prefix, suffix) in enumerate(pairs):
            p = self.prompt_ids(prefix, length)
            s = (self.tokenizer.encode_ordinary(suffix) + [self.eos])[: length - len(p)]
            ids[row, : len(p) + len(s)] = p + s
            targets[row, len(p) - 1 : len(p) + len(s) - 1] = s
            prefix_len[row] = len(p)
        return torch.from_numpy(ids), torch.from_numpy(prefix_len), torch.from_numpy(targets)

    def decode_answer(self, ids):
        """Text of generated ids up to the first eos, special tokens dropped."""
        ids = list(ids)
        if self.eos in ids:
            ids = ids[: ids.index(self.eos)]
        return self.tokenizer.decode([i for i in ids if i not in (self.bos, self.pad)])

    # ---------------------------------------------------------------------------- protocol

    def check(self, config):
        length = text_length(config)
        self.validation(config)  # reads (and checks) every image now, before anything is written
        self.data.train_batch([0], 0, self.preprocess, config.image_size)
        longest = max(self.data.prompts(), key=lambda p: len(self.prompt_ids(p)))
        need = len(self.prompt_ids(longest)) + 1
        if need > length:
            raise DataError(f"the prompt {longest!r} needs {need} text tokens with bos, \"\\n\" and one answer token, "
                            f"but max_seq_len {config.max_seq_len} leaves {length} after the image tokens; "
                            f"raise it (--set max_seq_len={config.max_seq_len - length + need})")

    def unit(self, config):
        return "examples", 1

    def validation(self, config):
        """(pixels (M, 3, S, S), examples) of the validation split, made once per image size."""
        if self.val is None or self.val[0].shape[-1] != config.image_size:
            self.val = self.data.validation_set(self.preprocess, config.image_size)
            # Tokens a greedy answer may need: the longest validation answer and its eos.
            self.answer_tokens = max(len(self.tokenizer.encode_ordinary(e[2])) + 1 for e in self.val[1])
        return self.val

    def batch(self, examples, seed, config):
        pixels, pairs = self.data.train_batch(examples, seed, self.preprocess, config.image_size)
        ids, prefix_len, targets = self.encode(pairs, text_length(config))
        return {"pixel_values": pixels, "input_ids": ids, "prefix_len": prefix_len, "targets": targets,
                "loss_weight": (targets != -100).sum()}

    def eval_examples(self, config, max_tokens=None):
        return len(self.validation(config)[1])

    def answer(self, model, pixels, prefixes, config, device, max_new_tokens=None):
        """Greedy answers (text up to eos) of the model to the prompts, one per picture."""
        prompts = [self.prompt_ids(p, text_length(config)) for p in prefixes]
        width = max(len(p) for p in prompts)
        room = text_length(config) - width
        n_new = max(1, min(room, max_new_tokens or room))
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=device)
        prefix_len = torch.tensor([len(p) for p in prompts], device=device)
        out = model.generate(pixels.to(device), ids, n_new, temperature=0, eos_id=self.eos, prefix_len=prefix_len)
        return [self.decode_answer(row) for row in out[:, width:].tolist()]

    @torch.no_grad()
    def evaluate(self, model, config, batch_size, device, autocast, max_tokens=None):
        """val_loss: suffix cross-entropy summed over every validation example, divided by the scored
        tokens; val_accuracy: exact matches of greedy answers, and for shapes per question
        (val_accuracy_<question>) and on the held-out combinations. Under DDP each rank takes every
        world_size-th batch and the sums are all-reduced, so the numbers are those of one process."""
        pixels, examples = self.validation(config)
        length = text_length(config)
        kinds = sorted({e[3] for e in examples if e[3] is not None})
        held = any(e[4] for e in examples)
        keys = ["all", *kinds] + (["held_out"] if held else [])
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        sums = torch.zeros(2 + 2 * len(keys), dtype=torch.float64)  # nats, tokens, then (right, asked) per key
        was_training = model.training
        model.eval()
        for start in range(rank * batch_size, len(examples), world * batch_size):
            chunk = examples[start : start + batch_size]
            pics = pixels[[e[0] for e in chunk]]
            ids, prefix_len, targets = self.encode([(e[1], e[2]) for e in chunk], length)
            with autocast():
                logits, _ = model(pics.to(device), ids.to(device), prefix_len.to(device))
            targets = targets.to(device)
            sums[0] += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                       reduction="sum").item()
            sums[1] += (targets != -100).sum().item()
            with autocast():
                answers = self.answer(model, pics, [e[1] for e in chunk], config, device, self.answer_tokens)
            for e, got in zip(chunk, answers):
                right = float(got.strip() == e[2].strip())
                for key in ("all", e[3]) + (("held_out",) if e[4] else ()):
                    if key in keys:
                        j = 2 + 2 * keys.index(key)
                        sums[j : j + 2] += torch.tensor([right, 1.0], dtype=torch.float64)
        model.train(was_training)
        if dist.is_initialized():
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        result = {"val_loss": (sums[0] / sums[1].clamp(min=1)).item()}
        for j, key in enumerate(keys):
            name = "val_accuracy" if key == "all" else f"val_accuracy_{key}"
            result[name] = (sums[2 + 2 * j] / sums[3 + 2 * j].clamp(min=1)).item()
        return result

    @torch.no_grad()
    def demo(self, model, device, max_new_tokens=6, seed=0, **kwargs):
        """A few validation examples, prompt -> the model's answer (the truth): one of each question, on
        held-out and trained combinations in turn, then any others."""
        config = model.config
        pixels, examples = self.validation(config)
        order = np.random.default_rng(seed).permutation(len(examples)).tolist()
        held = any(e[4] for e in examples)
        picks = []
        for j, kind in enumerate(dict.fromkeys(e[3] for e in examples)):
            picks += [i for i in order if examples[i][3] == kind and examples[i][4] == (held and j % 2 == 0)][:1]
        picks += [i for i in order if i not in picks]
        chosen = [examples[i] for i in picks[: max(1, min(6, max_new_tokens))]]
        was_training = model.training
        model.eval()
        answers = self.answer(model, pixels[[e[0] for e in chosen]], [e[1] for e in chosen], config, device,
                              self.answer_tokens)
        model.train(was_training)
        lines = []
        for e, got in zip(chosen, answers):
            tag = " [combination never trained on]" if e[4] else ""
            lines.append(f"{e[1]!r} -> {got.strip()!r} ({e[2]!r}){tag}")
        return "\n".join(lines)


PIPELINES = {"causal_lm": CausalLM, "image_text": ImageText, "prefix_lm": PrefixLM}


def takes_tokenizer(task):
    """Whether the pipeline of task can use a given tokenizer (train.py --init) instead of training one."""
    return task in PIPELINES and "tokenizer" in inspect.signature(PIPELINES[task]).parameters


def pipeline(task, module=None, **kwargs):
    """The pipeline TASK names, given what the model file offers (an image model's preprocess)."""
    if task not in PIPELINES:
        raise DataError(f"no data pipeline for TASK {task!r}; data.py knows {', '.join(sorted(PIPELINES))}")
    if getattr(module, "preprocess", None) is not None:
        kwargs["preprocess"] = module.preprocess
    return PIPELINES[task](**kwargs)
