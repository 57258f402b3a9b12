"""Hugging Face tokenizer.json files of byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2), read on top of
bpe.py and encoded with exactly the ids of the `tokenizers` library.

    tok = hf_tokenizer.load("tokenizer.json")  # or the folder that holds it
    ids = tok.encode(text, allowed_special="all")  # list[int]; tok.decode(ids) gives the text back

A tokenizer.json's model is a vocabulary (token -> id), spelled in GPT-2's byte-level alphabet, and a
list of merges: it ranks pairs, where tiktoken's rank files rank tokens. HFTokenizer follows the steps of
the `tokenizers` library (added tokens, normalizer, pre-tokenizers, the BPE model; its docstring lists
them) and shares the rest with bpe.py: the interface of `encode` and `decode`, the split patterns and
their Unicode 16.0 tables, the cache of chunk ids.
"""

import heapq
import json
import os
import unicodedata
from typing import NamedTuple

import regex

import bpe

# -----------------------------------------------------------------------------
# The byte-level alphabet


def _byte_level_alphabet() -> str:
    """GPT-2's printable stand-ins for the 256 bytes, as a string indexed by byte value.

    A byte that is a printable non-space Latin-1 character (! to ~, ¡ to ¬, ® to ÿ) stands for itself,
    and the other 68 (controls, space, no-break space, soft hyphen) take U+0100 onwards in byte order,
    so that Ġ (U+0120) is the space. A byte-level vocabulary spells its tokens in these characters.
    """
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    others = iter(range(0x100, 0x200))
    return "".join(chr(b) if b in printable else chr(next(others)) for b in range(256))


BYTE_LEVEL_ALPHABET = _byte_level_alphabet()
_BYTE_OF = {c: b for b, c in enumerate(BYTE_LEVEL_ALPHABET)}


def _byte_level_bytes(token: str) -> bytes:
    """What tokenizers' ByteLevel decoder makes of one token: the bytes its characters stand for, or, if
    one of them is not in the alphabet (an added token such as '<b c>'), the token's own UTF-8."""
    try:
        return bytes(map(_BYTE_OF.__getitem__, token))
    except KeyError:
        return token.encode("utf-8")


# -----------------------------------------------------------------------------
# The tokenizer


def load(path) -> "HFTokenizer":
    """Read `path`, a tokenizer.json or the folder that holds one, whose model is byte-level BPE."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {path}; pass a Hugging Face tokenizer.json or the folder that holds one") from None
    except ValueError:
        raise ValueError(f"{path} is not JSON; pass a Hugging Face tokenizer.json") from None
    return HFTokenizer(config, path)


class HFTokenizer(bpe._TokenizerBase):
    """Byte-level BPE read from a Hugging Face tokenizer.json, with the ids of the `tokenizers` library.

    Encoding follows tokenizers' steps:
      1. Added tokens, special or not, are cut out of the text first: the leftmost match, the longest of
         those that start there, with the token's lstrip, rstrip and single_word options. A token marked
         `normalized` is looked for after step 2, in the normalized text between the others. Special tokens
         count only where `encode` allows them (tokenizers' encode_special_tokens=True allows none), the
         others always.
      2. The normalizer, if any (NFC: Qwen2's), rewrites each stretch of text between added tokens. NFC
         here is Python's unicodedata, with the tables of Python's Unicode version (14.0 in Python 3.11,
         16.0 in 3.14): a mark newer than that may be ordered or composed otherwise than by tokenizers.
      3. The pre-tokenizers split it into pieces, in order: Split by a regex (Llama 3's, Qwen2's), whose
         matches and the text between them all become pieces; Digits (which tokenizers decides by Rust's
         own tables, those of the Rust it was built with: in tokenizers 0.23 these know the 13 digits of
         Unicode 17, which Unicode 16's tables here do not); and last ByteLevel, which may put a
         space before each piece and split it by bpe.BYTE_LEVEL_PATTERN, and spells each piece's UTF-8
         bytes in BYTE_LEVEL_ALPHABET, the characters the vocabulary is written in.
      4. The BPE model encodes each piece. With ignore_merges set (Llama 3), a piece that is a token of
         the vocabulary is that token. Otherwise each character becomes its token (one missing from the
         vocabulary becomes the unk token, its <0xNN> bytes with byte_fallback, or nothing), and then,
         again and again, the adjacent pair that comes first in the merge list is merged (the leftmost of
         equal pairs) into the token that spells both, until no adjacent pair is on the list.

    That last rule is not tiktoken's, which merges the adjacent pair whose concatenation has the lowest
    rank, whether or not that pair was ever a merge. The two agree when the list holds every way of
    writing each token as two tokens, ordered by the rank of the token they make, with ignore_merges
    (tiktoken looks a whole chunk up before merging) - which is how transformers converts tiktoken's rank
    files, Llama 3's among them - as long as two different pairs that make the same token are never both
    at hand (tiktoken merges the leftmost, tokenizers the first listed). A list with one pair per token, as
    training writes it, can leave out a pair that tiktoken would merge: with the merges a+b, b+c and a+bc,
    tokenizers encodes abc as ab, c (ab+c is not on the list) and tiktoken, which ranks the token abc, as
    abc. So the list is not turned into ranks: HFTokenizer merges by the list, and emits the vocabulary's
    ids, which need not follow the list's order.

    Not applied: the post-processor (encode never adds tokens such as Llama 3's begin-of-text; their ids
    come from the model's config), truncation and padding. decode writes the bytes of every token,
    special ones included, as tokenizers' (0.23) decode(ids, skip_special_tokens=False) does.
    """

    def __init__(self, config: dict, name: str = "tokenizer.json"):
        if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
            hint = "; read it with Tokenizer.load" if isinstance(config, dict) and "pattern" in config else ""
            raise ValueError(f"{name} has no 'model': it is not a Hugging Face tokenizer.json{hint}")
        self.name = name
        vocab, encode_chunk = _hf_bpe(config["model"], name)
        self._nfc = _hf_normalizer(config.get("normalizer"), name)
        self._pre_tokenizers = _hf_pre_tokenizers(config.get("pre_tokenizer"), name)
        decoder = config.get("decoder")
        if decoder is not None and decoder.get("type") != "ByteLevel":
            raise ValueError(f"{name}: the decoder is {decoder.get('type')}, not ByteLevel, so the vocabulary is not byte-level; use the tokenizers library for it")
        self._added = _hf_added_tokens(config.get("added_tokens") or [], vocab, name)
        self._vocab_size = len(vocab)
        decoder = {i: _byte_level_bytes(t) for t, i in vocab.items()}
        decoder.update((t.id, _byte_level_bytes(self._as_matched(t))) for t in self._added)
        self._setup({t.content: t.id for t in self._added if t.special}, decoder, encode_chunk)
        self._matchers = {}  # (normalized, allowed special tokens) -> (regex, matched text -> _AddedToken)

    def __repr__(self):
        return f"<HFTokenizer {self._vocab_size} tokens, {len(self._added)} added tokens, from {self.name}>"

    def _encode_text(self, text: str, allowed: frozenset) -> list:
        ids = []
        for part in self._cut(text, False, allowed):
            if isinstance(part, int):
                ids.append(part)
                continue
            if self._nfc:
                part = unicodedata.normalize("NFC", part)
            for piece in self._cut(part, True, allowed):
                if isinstance(piece, int):
                    ids.append(piece)
                else:
                    ids += self._cache.ids_of(self._pre_tokenize(piece))
        return ids

    def _cut(self, text: str, normalized: bool, allowed: frozenset) -> list:
        """`text` as pieces of text (str) and the ids of the added tokens between them (int), as
        tokenizers' AddedVocabulary.find_matches finds them."""
        finder, tokens = self._matcher(normalized, allowed)
        if finder is None:
            return [text] if text else []
        parts, done = [], 0
        for m in finder.finditer(text):
            token, (start, stop) = tokens[m.group()], m.span()
            if token.single_word:
                before = start > 0 and _WORD.match(bpe._as_unicode_16(text[start - 1]))
                after = stop < len(text) and _WORD.match(bpe._as_unicode_16(text[stop]))
                if before or after:
                    continue  # inside a longer word; tokenizers searches on after it
            if token.lstrip:
                while start > done and _SPACE.match(text[start - 1]):
                    start -= 1
            if token.rstrip:
                while stop < len(text) and _SPACE.match(text[stop]):
                    stop += 1
            if done < start:
                parts.append(text[done:start])
            parts.append(token.id)
            done = stop
        if done < len(text):
            parts.append(text[done:])
        return parts

    def _as_matched(self, token: "_AddedToken") -> str:
        """The text an added token is found as, and decoded from: normalized if it is looked for in
        normalized text."""
        return unicodedata.normalize("NFC", token.content) if token.normalized and self._nfc else token.content

    def _matcher(self, normalized: bool, allowed: frozenset):
        if (normalized, allowed) not in self._matchers:
            tokens = {self._as_matched(t): t for t in self._added if t.normalized == normalized and (not t.special or t.content in allowed)}
            self._matchers[normalized, allowed] = (bpe._longest_first(tokens) if tokens else None), tokens
        return self._matchers[normalized, allowed]

    def _pre_tokenize(self, text: str) -> list:
        pieces = [text]
        for split in self._pre_tokenizers:
            pieces = [p for piece in pieces for p in split(piece)]
        return pieces


# -----------------------------------------------------------------------------
# The BPE model: vocabulary and merge list


def _hf_bpe(model: dict, name: str):
    """The vocabulary (token -> id) and a function piece -> ids for a tokenizer.json's BPE model."""
    kind = model.get("type", "BPE" if "merges" in model else None)
    if kind != "BPE":
        raise ValueError(f"{name}: the model is {kind}, not BPE; HFTokenizer reads byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2), so use the tokenizers library for it")
    if model.get("dropout"):
        raise ValueError(f"{name}: the model has dropout {model['dropout']}, which makes encoding random; set it to null")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ValueError(f"{name}: the model marks subwords with a prefix or suffix, which byte-level BPE does not; use the tokenizers library for it")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{name}: the model's vocab is not a mapping of tokens to ids; re-save the file with the tokenizers library")
    if len(set(vocab.values())) != len(vocab):
        raise ValueError(f"{name}: two tokens of the vocab share an id; every id must be unique")
    # The merge list: (left id, right id) -> (place on the list, id of the merged token). A pair listed
    # twice keeps its last place, as in tokenizers.
    pairs = {}
    for rank, merge in enumerate(model.get("merges") or []):
        parts = merge.split(" ") if isinstance(merge, str) else merge  # "a b" in older files, ["a", "b"] in newer
        if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(t, str) and t in vocab for t in parts) and parts[0] + parts[1] in vocab):
            raise ValueError(f"{name}: merge {rank} ({merge!r}) is not two tokens of the vocab that make a third; re-save the file with the tokenizers library")
        left, right = parts
        pairs[vocab[left], vocab[right]] = rank, vocab[left + right]
    unk = model.get("unk_token")
    if unk is not None and unk not in vocab:
        raise ValueError(f"{name}: the unk_token {unk!r} is not in the vocab; add it or set unk_token to null")
    return vocab, _merge_list_encoder(vocab, pairs, model.get("ignore_merges", False), vocab.get(unk), model.get("fuse_unk", False), model.get("byte_fallback", False))


def _merge_list_encoder(vocab: dict, pairs: dict, ignore_merges: bool, unk_id, fuse_unk: bool, byte_fallback: bool):
    """piece -> ids by tokenizers' BPE model (step 4 of HFTokenizer's docstring)."""
    to_byte_level = str.maketrans(dict(enumerate(BYTE_LEVEL_ALPHABET)))

    def encode_chunk(piece: str) -> list:
        word = piece.encode("utf-8").decode("latin-1").translate(to_byte_level)
        if ignore_merges and word in vocab:
            return [vocab[word]]
        ids, unk = [], None  # unk: an unknown character not yet written (tokenizers writes it before the next known one)
        for char in word:
            if char in vocab:
                if unk is not None:
                    ids.append(unk)
                    unk = None
                ids.append(vocab[char])
                continue
            if byte_fallback:
                fallback = [vocab.get(f"<0x{b:02X}>") for b in char.encode("utf-8")]
                if None not in fallback:
                    ids += fallback
                    continue
            if unk_id is not None:
                if unk is not None and not fuse_unk:
                    ids.append(unk)
                unk = unk_id
        if unk is not None:
            ids.append(unk)
        return _merge_by_list(ids, pairs)

    return encode_chunk


def _merge_by_list(ids: list, pairs: dict) -> list:
    """Merge the adjacent pair that comes first in the merge list, the leftmost of equals, until no adjacent
    pair is on it. As tokenizers does it: a heap of (place on the list, position, merged id) over a linked
    list of symbols, where an entry whose position no longer holds its pair is skipped when popped."""
    n = len(ids)
    heap = []
    for i, pair in enumerate(zip(ids, ids[1:])):
        if pair in pairs:
            rank, merged = pairs[pair]
            heap.append((rank, i, merged))
    heapq.heapify(heap)
    nxt = list(range(1, n + 1))  # nxt[i]: the position of the symbol after the one at i (n: none)
    prv = list(range(-1, n - 1))
    alive = [True] * n
    while heap:
        _, i, new = heapq.heappop(heap)
        j = nxt[i]
        if not alive[i] or j >= n:
            continue
        current = pairs.get((ids[i], ids[j]))
        if current is None or current[1] != new:  # the symbols at i changed since the entry was pushed
            continue
        ids[i], alive[j], nxt[i] = new, False, nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
        if prv[i] >= 0 and (ids[prv[i]], new) in pairs:
            rank, merged = pairs[ids[prv[i]], new]
            heapq.heappush(heap, (rank, prv[i], merged))
        if nxt[i] < n and (new, ids[nxt[i]]) in pairs:
            rank, merged = pairs[new, ids[nxt[i]]]
            heapq.heappush(heap, (rank, i, merged))
    return [ids[i] for i in range(n) if alive[i]]


# -----------------------------------------------------------------------------
# Added tokens

_SPACE = regex.compile(r"\s")  # Unicode's White_Space, as the \s of Rust's regex crate
_WORD = regex.compile(r"\w")  # letters, marks, decimal digits, connector punctuation and joiners, as Rust's \w


class _AddedToken(NamedTuple):
    id: int
    content: str
    special: bool
    single_word: bool
    lstrip: bool
    rstrip: bool
    normalized: bool


def _hf_added_tokens(tokens: list, vocab: dict, name: str) -> list:
    """The added tokens, with the ids tokenizers gives them whatever ids the file says (it warns when they
    differ): a token of the vocabulary keeps its id there, and the others are numbered on, in the file's
    order, after the vocabulary and after the added tokens before them."""
    added = {}  # content -> _AddedToken; a content given twice keeps its first id and its last options
    for token in tokens:
        try:
            content, special = token["content"], token.get("special", False)
        except (KeyError, TypeError):
            raise ValueError(f"{name}: the added token {token!r} has no content; re-save the file with the tokenizers library") from None
        if not content:
            continue  # tokenizers ignores empty added tokens
        i = added[content].id if content in added else vocab.get(content, max(len(vocab), max((t.id + 1 for t in added.values()), default=0)))
        added[content] = _AddedToken(
            i, content, special, token.get("single_word", False), token.get("lstrip", False), token.get("rstrip", False),
            token.get("normalized", not special),
        )
    return list(added.values())


# -----------------------------------------------------------------------------
# Normalizer and pre-tokenizers


def _hf_normalizer(normalizer, name: str) -> bool:
    """Whether the text is NFC-normalized: the one normalizer supported, alone or in a Sequence."""
    steps = normalizer.get("normalizers", []) if normalizer and normalizer.get("type") == "Sequence" else [normalizer]
    kinds = [step.get("type") for step in steps if step is not None]
    for kind in kinds:
        if kind != "NFC":
            raise ValueError(f"{name}: the normalizer {kind} rewrites the text, which HFTokenizer does not (it supports NFC only); use the tokenizers library for it")
    return bool(kinds)


def _hf_pre_tokenizers(pre_tokenizer, name: str) -> list:
    """The pre-tokenizer as a list of functions piece -> pieces: Split and Digits steps, then ByteLevel."""
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer and pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    steps = [step for step in steps if step is not None]
    for kind in (step.get("type") for step in steps):
        if kind not in ("Split", "Digits", "ByteLevel"):
            raise ValueError(f"{name}: the pre-tokenizer {kind} is not supported; HFTokenizer reads Split and Digits steps and a final ByteLevel, so use the tokenizers library for it")
    if [step.get("type") for step in steps].count("ByteLevel") != 1 or steps[-1].get("type") != "ByteLevel":
        raise ValueError(
            f"{name}: the pre-tokenizer does not end with its one ByteLevel step, so the vocabulary is not byte-level "
            f"(a SentencePiece-style one spells spaces as ▁); use the tokenizers library for it"
        )
    splits = []
    for step in steps[:-1]:
        if step["type"] == "Split":
            pattern = step.get("pattern", {})
            if step.get("behavior") != "Isolated" or step.get("invert") or not ("Regex" in pattern or "String" in pattern):
                raise ValueError(f"{name}: a Split with behavior {step.get('behavior')}, invert {step.get('invert')} and pattern {pattern} is not supported; HFTokenizer reads Isolated splits by a Regex or String")
            splits.append(_isolating_splitter(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"])))
        else:  # Digits
            splits.append(_isolating_splitter(r"\p{N}" if step.get("individual_digits") else r"\p{N}+"))
    byte_level = steps[-1]
    prefix_space = byte_level.get("add_prefix_space", True)  # tokenizers' defaults
    split = bpe.splitter(bpe.BYTE_LEVEL_PATTERN) if byte_level.get("use_regex", True) else None

    def byte_level_step(piece: str) -> list:
        if prefix_space and not piece.startswith(" "):
            piece = " " + piece
        return split(piece) if split else [piece]

    if prefix_space or split:  # without either, ByteLevel leaves the pieces as they are
        splits.append(byte_level_step)
    return splits


# The patterns whose alternatives between them match every character, so that their chunks cover the text.
_COVERING = {bpe.GPT2_PATTERN, bpe.CL100K_PATTERN, bpe.O200K_PATTERN, bpe.LLAMA3_PATTERN, bpe.QWEN2_PATTERN, bpe.BYTE_LEVEL_PATTERN}


def _isolating_splitter(pattern: str):
    """tokenizers' Split with behavior Isolated: each match is a piece, and so is each stretch of text
    between matches."""
    if pattern in _COVERING:
        return bpe.splitter(pattern)  # no text between matches, and bpe.py's fast split
    finditer = regex.compile(pattern).finditer

    def split(text: str) -> list:
        pieces, done = [], 0
        for m in finditer(bpe._as_unicode_16(text)):
            start, end = m.span()
            if done < start:
                pieces.append(text[done:start])
            if start < end:
                pieces.append(text[start:end])
            done = end
        if done < len(text):
            pieces.append(text[done:])
        return pieces

    return split
