"""Byte-level BPE: train a vocabulary, then encode and decode exactly like tiktoken.

Byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
Units") starts from single symbols and repeatedly joins the most frequent adjacent pair into a new
symbol. GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners") made it
byte-level: the 256 byte values are the starting symbols, so any string, in any script, encodes with
no unknown token. Text is first split by a regex into chunks (words, numbers, punctuation runs,
whitespace) and merges never cross a chunk boundary.

The vocabulary is a dict `mergeable_ranks: bytes -> rank`, as in tiktoken: a token's id is its rank,
and the rank is also the merge priority. Encoding a chunk starts from its bytes and repeatedly merges
the adjacent pair whose concatenation has the lowest rank (the leftmost one on a tie) until no
adjacent pair is in the vocabulary. With the same ranks and split pattern this gives exactly
tiktoken's ids; `train` produces ranks in that format, and `Tokenizer.save` writes tiktoken's rank
file, so a trained tokenizer can be handed to `tiktoken.Encoding` unchanged. Tokenizer also reads
tiktoken's rank files and Meta's Llama 3 tokenizer.model. (Hugging Face tokenizer.json files, which
rank pairs rather than tokens, are read by hf_tokenizer.py, built on this file.)

The file reads top to bottom: the split patterns, the merge of one chunk, `train`, and `Tokenizer`
(encode, decode, save, load). What makes it exact and fast comes after that: splitting by the tables
of Unicode 16.0, as tiktoken does, whichever Unicode version the installed `regex` knows (so that the
ids equal tiktoken's on every code point); a faster split of ASCII text; a heap for long chunks; and
a cache of the ids of chunks already seen. One known difference remains: where one special token is
a prefix of another (no encoding of tiktoken's or Llama 3's has such a pair), tiktoken picks among
those that start at the same place in the order of its hash map; `encode` takes the longest.

Shapes: `encode` returns a list[int] of token ids; `decode` takes any sequence of ints (or a tensor /
array with `.tolist()`).
"""

import base64
import heapq
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict, deque

import regex

# -----------------------------------------------------------------------------
# Split patterns: tiktoken's, Llama 3's and Qwen2's strings, letter for letter. `regex` understands \p{..}
# classes and possessive quantifiers, and its \s is Unicode White_Space like Rust's, so it splits as
# tiktoken and `tokenizers` do; `splitter(pattern)` (below) is `regex.compile(pattern).findall`, made
# exact and fast.

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# The `tokenizers` library's ByteLevel pre-tokenizer splits by this one (GPT-2's and SmolLM2's
# tokenizer.json). It is GPT-2's pattern written differently: its last `\s+` is reached only by a lone
# whitespace character before a non-space (a longer run matches `\s+(?!\S)` first), which GPT-2's `\s`
# takes alone too, and GPT-2's `\s++$` matches nothing that `\s+(?!\S)` would not.
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Meta's names for Llama 3.1 / 3.2 / 3.3's 256 special tokens, numbered right after the ranks
# (128000 for the real tokenizer.model). Llama 3.0 calls ids +4, +5, +8 and +10
# <|reserved_special_token_2..5|> instead; the other names are the same.
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]

# -----------------------------------------------------------------------------
# Encoding one chunk

_NO_RANK = 1 << 62  # larger than any rank: "this pair cannot merge"


def bpe_merge(piece: bytes, ranks: dict) -> list:
    """Token ids of one chunk: merge the lowest-ranked adjacent pair (leftmost on a tie) until none is left."""
    if len(piece) > _LONG_CHUNK:
        return _bpe_merge_long(piece, ranks)  # the same merges, without the quadratic scans (below)
    get = ranks.get
    # starts[i] is where part i begins; pair[i] is the rank of part i joined with part i + 1.
    starts = list(range(len(piece) + 1))
    pair = [get(piece[i : i + 2], _NO_RANK) for i in range(len(piece) - 1)]
    while pair:
        best = min(pair)
        if best == _NO_RANK:
            break
        i = pair.index(best)  # the leftmost of equal ranks, as tiktoken does
        del starts[i + 1], pair[i]
        if i < len(pair):
            pair[i] = get(piece[starts[i] : starts[i + 2]], _NO_RANK)
        if i > 0:
            pair[i - 1] = get(piece[starts[i - 1] : starts[i + 1]], _NO_RANK)
    return [ranks[piece[s:e]] for s, e in zip(starts, starts[1:])]


def _rank_encoder(ranks: dict):
    """chunk -> ids by tiktoken's rule: the chunk's own rank if it has one (most chunks of real text are
    one token), else bpe_merge of its bytes."""

    def encode_chunk(chunk: str) -> list:
        piece = chunk.encode("utf-8")
        rank = ranks.get(piece)
        if rank is not None:
            return [rank]
        try:
            return bpe_merge(piece, ranks)
        except KeyError as e:
            raise ValueError(f"byte string {e.args[0]!r} has no rank; mergeable_ranks must hold all 256 single bytes") from None

    return encode_chunk


# -----------------------------------------------------------------------------
# Training


def train(texts, vocab_size: int, pattern: str = CL100K_PATTERN, special_tokens=None, verbose: bool = False) -> "Tokenizer":
    """Learn `vocab_size - 256` merges from a string or an iterable of strings.

    `vocab_size` counts the mergeable ranks: the 256 bytes plus the merges (fewer if the corpus runs
    out of pairs). Special tokens, a list of strings or a dict of string -> id, get the ids right after
    them (a list) or their own ids (a dict); they are cut out of the training text, never learned.
    The best pair is the most frequent one; on a tie, the one whose (left bytes, right bytes) sorts
    first. Should two different pairs ever spell the same bytes (random corpora never made it happen,
    but nothing here rules it out), the later merge reuses the earlier token, as the encoder would (it
    looks up the concatenated bytes), so every rank names distinct bytes.

    It is the textbook loop, made fast the usual way:
      1. split the corpus into chunks and count identical chunks once (a corpus has far fewer distinct
         chunks than chunks);
      2. count adjacent pairs, each weighted by its chunk's frequency;
      3. keep, for each pair, the set of distinct chunks that contain it;
      4. after a merge, rewrite only those chunks and adjust only the pair counts that changed;
      5. take the next merge from a max-heap whose stale entries are skipped when popped.
    """
    if not isinstance(vocab_size, int) or vocab_size < 256:
        raise ValueError(f"vocab_size must be an integer of at least 256 (the byte tokens), got {vocab_size!r}")
    texts = [texts] if isinstance(texts, str) else texts
    specials = list(dict.fromkeys(special_tokens or []))
    cut = _longest_first(specials) if specials else None
    split = splitter(pattern)
    t0 = time.perf_counter()

    # 1. Distinct chunks and how often each occurs.
    chunk_counts = Counter()
    for text in texts:
        for part in cut.split(text) if cut else (text,):
            chunk_counts.update(split(part))
    if not chunk_counts:
        raise ValueError("the training corpus is empty; pass some text to train on")
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    del chunk_counts

    # 2. and 3. Pair counts weighted by chunk frequency, and which chunks hold each pair.
    counts = defaultdict(int)
    where = defaultdict(set)
    for w, (word, f) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            counts[pair] += f
            where[pair].add(w)

    vocab = [bytes([b]) for b in range(256)]  # id -> bytes
    ranks = {t: i for i, t in enumerate(vocab)}
    # Max-heap by count, then smallest bytes: entries are (-count, left bytes, right bytes, pair).
    heap = [(-c, vocab[a], vocab[b], (a, b)) for (a, b), c in counts.items()]
    heapq.heapify(heap)
    merges = 0
    if verbose:
        print(f"bpe: {len(words)} distinct chunks, {len(counts)} pairs ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)

    while len(vocab) < vocab_size and heap:
        # 5. Lazy invalidation. Every pair has an entry whose count is at least its true count: a
        # count that grows gets a fresh entry, one that shrinks leaves its old entry too high. So the
        # first popped entry that is up to date is the true maximum; an outdated one goes back in.
        neg, _, _, pair = heapq.heappop(heap)
        count = counts.get(pair, 0)
        if count != -neg:
            if count > 0:
                heapq.heappush(heap, (-count, vocab[pair[0]], vocab[pair[1]], pair))
            continue
        a, b = pair
        merged = vocab[a] + vocab[b]
        new = ranks.get(merged)
        if new is None:
            new = ranks[merged] = len(vocab)
            vocab.append(merged)
        merges += 1

        # 4. Rewrite only the chunks that hold the pair, and record how the other pair counts change.
        delta = defaultdict(int)
        for w in where.pop(pair):
            word = words[w]
            if len(word) > 1:
                words[w] = _merge_word(word, a, b, new, freqs[w], delta, where, w)
        del counts[pair]
        for p, d in delta.items():
            c = counts[p] = counts[p] + d
            if c <= 0:
                del counts[p]
            elif d > 0:  # grown counts get a fresh heap entry; shrunk ones are caught when popped
                heapq.heappush(heap, (-c, vocab[p[0]], vocab[p[1]], p))

        if verbose and (merges % 500 == 0 or len(vocab) == vocab_size):
            print(f"bpe: {len(vocab)}/{vocab_size} tokens, last merge {merged!r} x{count} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr)

    if not isinstance(special_tokens, dict):
        special_tokens = {t: len(vocab) + i for i, t in enumerate(specials)}  # right after the ranks
    return Tokenizer(ranks, pattern, special_tokens)


def _merge_word(word: list, a: int, b: int, new: int, f: int, delta: dict, where: dict, w: int) -> list:
    """`word` with every (a, b), left to right, replaced by `new`; pair count changes go to `delta`.

    The left neighbour is read from the output, so in a b a b -> X X the second merge turns the
    (X, a) that the first one created into (X, X) instead of removing a (b, a) twice.
    """
    out, i, n = [], 0, len(word)
    index = word.index
    while True:
        try:
            j = index(a, i)
        except ValueError:
            break
        if j + 1 < n and word[j + 1] == b:
            out += word[i:j]
            if out:
                left = out[-1]
                delta[left, a] -= f
                delta[left, new] += f
                where[left, new].add(w)
            if j + 2 < n:
                right = word[j + 2]
                delta[b, right] -= f
                delta[new, right] += f
                where[new, right].add(w)
            out.append(new)
            i = j + 2
        else:
            out += word[i : j + 1]
            i = j + 1
    out += word[i:]
    return out


# -----------------------------------------------------------------------------
# The tokenizer


class _TokenizerBase:
    """What Tokenizer and hf_tokenizer.py's HFTokenizer share: tiktoken's `encode` interface to special
    tokens, the cache of chunk ids, and decoding. A subclass calls `_setup` and defines
    `_encode_text(text, allowed)`: the ids of `text` in which the special tokens in `allowed`, and no
    others, are encoded as special tokens."""

    def _setup(self, special_tokens: dict, decoder: dict, encode_chunk) -> None:
        self.special_tokens = special_tokens
        self._decoder = decoder  # id -> bytes, special tokens included
        self._n_vocab = max(decoder, default=-1) + 1
        self._special_regexes = {}  # frozenset of special tokens -> regex that finds them
        self._cache = _ChunkCache(encode_chunk)  # chunk -> ids; `ids_of(chunks)` gives theirs, one after another

    @property
    def n_vocab(self) -> int:
        """The largest id plus one, special tokens included."""
        return self._n_vocab

    # ---- encoding

    def encode_ordinary(self, text: str) -> list:
        """Ids of `text`, treating special-token strings as ordinary text."""
        return self._encode(text, frozenset())

    def encode(self, text: str, allowed_special=frozenset(), disallowed_special="all") -> list:
        """Ids of `text`. As in tiktoken, special tokens are encoded only if allowed, and text that
        contains a disallowed one (by default every special token not allowed) raises ValueError."""
        if allowed_special == "all":
            allowed_special = self.special_tokens.keys()
        allowed_special = frozenset(self.special_tokens.keys() & set(allowed_special))  # unknown names are ignored, as in tiktoken
        if disallowed_special == "all":
            disallowed_special = self.special_tokens.keys() - allowed_special
        if disallowed_special and (m := self._specials_regex(frozenset(disallowed_special)).search(text)):
            raise ValueError(
                f"text contains the special token {m.group()!r}; pass allowed_special={{{m.group()!r}}} to encode "
                f"it as a special token, or disallowed_special=() to encode it as ordinary text"
            )
        return self._encode(text, allowed_special)

    def _encode(self, text: str, allowed: frozenset) -> list:
        try:
            return self._encode_text(text, allowed)
        except UnicodeEncodeError:
            # Lone surrogates cannot be UTF-8 encoded; tiktoken replaces them (and joins valid
            # surrogate pairs) this way, so we do the same to give its ids.
            return self._encode_text(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), allowed)

    def _specials_regex(self, specials: frozenset):
        if specials not in self._special_regexes:
            self._special_regexes[specials] = _longest_first(specials)
        return self._special_regexes[specials]

    # ---- decoding

    def decode_bytes(self, ids) -> bytes:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        try:
            return b"".join(map(self._decoder.__getitem__, ids))
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]!r} is not in the vocabulary (n_vocab={self.n_vocab})") from None

    def decode(self, ids, errors: str = "replace") -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD, as in tiktoken."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)


def _longest_first(strings):
    """A regex that finds any of `strings`: the leftmost, and of those starting there the longest."""
    return regex.compile("|".join(map(regex.escape, sorted(strings, key=len, reverse=True))))


class Tokenizer(_TokenizerBase):
    """Byte-level BPE with tiktoken's interface: ids equal tiktoken's for the same ranks and pattern."""

    def __init__(self, mergeable_ranks: dict, pattern: str, special_tokens: dict | None = None):
        special_tokens = dict(special_tokens or {})
        ids = set(mergeable_ranks.values())
        if len(ids) != len(mergeable_ranks):
            raise ValueError("mergeable_ranks gives the same rank to two tokens; every rank must be unique")
        clash = [t for t, i in special_tokens.items() if i in ids]
        if clash:
            raise ValueError(f"special token {clash[0]!r} reuses an id of mergeable_ranks; give it a free id")
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        self._split = splitter(pattern)
        decoder = {i: t for t, i in mergeable_ranks.items()}
        decoder.update((i, t.encode("utf-8")) for t, i in special_tokens.items())
        self._setup(special_tokens, decoder, _rank_encoder(mergeable_ranks))

    def __repr__(self):
        return f"<Tokenizer {len(self.mergeable_ranks)} ranks, {len(self.special_tokens)} special tokens>"

    def _encode_text(self, text: str, allowed: frozenset) -> list:
        if not allowed:
            return self._cache.ids_of(self._split(text))
        ids, start = [], 0
        for m in self._specials_regex(allowed).finditer(text):
            ids += self._cache.ids_of(self._split(text[start : m.start()]))
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        ids += self._cache.ids_of(self._split(text[start:]))
        return ids

    # ---- files

    def save(self, directory) -> None:
        """Write `tokenizer.tiktoken` (tiktoken's rank file) and `tokenizer.json` (pattern and specials)."""
        os.makedirs(directory, exist_ok=True)
        ranks = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        lines = "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks)
        meta = json.dumps({"pattern": self.pattern, "special_tokens": self.special_tokens}, indent=1, ensure_ascii=False)
        _write_atomic(os.path.join(directory, "tokenizer.tiktoken"), lines)
        _write_atomic(os.path.join(directory, "tokenizer.json"), meta + "\n")

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        path = os.path.join(directory, "tokenizer.json")
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
            pattern, special_tokens = meta["pattern"], meta["special_tokens"]
        except FileNotFoundError:
            raise FileNotFoundError(f"no {path}; save a tokenizer there first with Tokenizer.save") from None
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} is not a tokenizer.json with 'pattern' and 'special_tokens'; save it again") from None
        return cls.from_rank_file(os.path.join(directory, "tokenizer.tiktoken"), pattern, special_tokens)

    @classmethod
    def from_rank_file(cls, path, pattern: str, special_tokens: dict | None = None) -> "Tokenizer":
        """Load a tiktoken rank file: one `<base64 token> <rank>` per line."""
        return cls(read_rank_file(path), pattern, special_tokens)

    @classmethod
    def from_llama3(cls, path) -> "Tokenizer":
        """Load Meta's Llama 3 `tokenizer.model` (a tiktoken rank file) with Llama 3's pattern and specials."""
        ranks = read_rank_file(path)
        specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
        return cls(ranks, LLAMA3_PATTERN, specials)

    @classmethod
    def from_tiktoken(cls, name: str) -> "Tokenizer":
        """Wrap an encoding that `tiktoken.get_encoding(name)` can load."""
        import tiktoken

        enc = tiktoken.get_encoding(name)
        return cls(enc._mergeable_ranks, enc._pat_str, enc._special_tokens)


def read_rank_file(path) -> dict:
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"no rank file at {path}; pass the path of a .tiktoken / tokenizer.model file") from None
    ranks, seen = {}, set()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            token, rank = base64.b64decode(token, validate=True), int(rank)
        except ValueError:
            raise ValueError(f"{path}, line {lineno}: expected '<base64 token> <rank>', got {line[:80]!r}") from None
        if rank in seen:
            raise ValueError(f"{path}, line {lineno}: rank {rank} appears twice; every rank must be unique")
        if token in ranks:
            raise ValueError(f"{path}, line {lineno}: token {token!r} appears twice; every token must be unique")
        seen.add(rank)
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path} holds no ranks; it is not a tiktoken rank file")
    return ranks


def _write_atomic(path, text: str) -> None:
    """Write to a temp file beside path, then rename it onto path: a crash never leaves half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"  # open() gives it the usual permissions, unlike mkstemp's 0600
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -----------------------------------------------------------------------------
# What makes it exact: the Unicode version. What \p{L}, \p{N}, \p{M}, \s, ... match comes from the tables
# of one Unicode version, and each library has its own. tiktoken 0.8 to 0.14 (Rust's regex crate) and the
# `tokenizers` library 0.22 and 0.23 (Oniguruma) split by Unicode 16.0 (tiktoken 0.7 by 15.0). `regex`
# follows the newest Unicode: its releases 2024.9.11 to 2025.9.18 have 16.0, 2025.10.22 has 17.0,
# 2026.9.29 has 18.0. (Each of these was measured by running every code point through every class in each
# library.) To a newer `regex`, a character that Unicode 17 or 18 assigned is a letter, mark or digit,
# while tiktoken finds it unassigned, and the two split text around it differently: Hebrew with U+05C8
# encodes to other ids under o200k, for one. `regex` cannot be asked for an older version's tables, so the
# text it splits is translated first: every code point that Unicode 17.0 and 18.0 assigned becomes U+FDD0,
# a noncharacter, which every Unicode version leaves unassigned, and U+0295, which Unicode 17 moved from
# Ll to Lo, becomes U+0138, an Ll letter in every version. The translation keeps each character in its
# place, so the chunks are then cut from the original text at the same offsets. A `regex` release with
# Unicode 19 will need its additions listed here (the tests run all of Unicode through both libraries).

# The code points that Unicode 17.0 and 18.0 assigned, as `regex` 2026.11.19 knows them.
_ASSIGNED_AFTER_UNICODE_16 = """
0558 058B-058C 05C8-05C9 088F 0B53-0B54 0C5C 0CDC 1ACF-1AF0 208F 209D-209F 20C1-20C4 2B96 2E60-2E63
A7CE-A7CF A7D2 A7D4 A7DD A7E2 A7F1 AB6C-AB6D FBC3-FBD2 FD90-FD91 FDC8-FDCE 107BB-107BF 10940-10959
10EC5-10EC7 10EC9-10EEE 10EF0-10EFB 11B0A 11B60-11B67 11DB0-11DDB 11DE0-11DE9 11DF0-11DF1 1246F
12475-1247F 12550-12686 16EA0-16EB8 16EBB-16ED3 16FF2-16FF6 187F8-187FF 18CD6-18CDA 18D09-18D20
18D80-18DF2 18E00-19191 191A0-191D2 1B123-1B128 1B168 1CCFA-1CCFC 1CEBA-1CED0 1CED2-1CED4 1CEDD-1CEFD
1D127-1D128 1D1EB-1D1FF 1D250-1D281 1D6A6 1DB00-1DB1C 1DF1F-1DF24 1DF2B-1DF81 1DF90-1DF96 1DFCD-1DFFF
1E6C0-1E6DE 1E6E0-1E6F5 1E6FE-1E6FF 1F1AE 1F6D8-1F6D9 1F777-1F77A 1F7DA-1F7DB 1F7F1-1F7FF 1F8D0-1F8D8
1FA54-1FA57 1FA8A-1FA8E 1FAC8 1FACC-1FACD 1FADD 1FAEA-1FAEB 1FAEF 1FAF9-1FAFA 1FBFA 2B73A-2B73F 2B81E
2CEA2-2CEAD 323B0-33479 3D000-3FC3F
"""
_RANGES_AFTER_UNICODE_16 = [(int(a, 16), int(b or a, 16)) for a, _, b in (r.partition("-") for r in _ASSIGNED_AFTER_UNICODE_16.split())]
_TO_UNICODE_16 = {c: 0xFDD0 for a, b in _RANGES_AFTER_UNICODE_16 for c in range(a, b + 1)} | {0x295: 0x138}
# Finding them must be fast, as all text is searched. `re` tests a character against BMP ranges with a
# bitmap but against astral ranges one range at a time (20 times slower here), so this set takes every
# astral character, to be looked up one by one.
_MAYBE_AFTER_UNICODE_16 = re.compile(
    "[\u0295" + "".join(f"{chr(a)}-{chr(b)}" for a, b in _RANGES_AFTER_UNICODE_16 if b < 0x10000) + "\U00010000-\U0010FFFF]"
)


def _as_unicode_16(text: str) -> str:
    """`text` with the characters above translated, each in its place; `text` itself if it has none."""
    if not text.isascii():
        for m in _MAYBE_AFTER_UNICODE_16.finditer(text):
            if ord(m.group()) in _TO_UNICODE_16:
                return text.translate(_TO_UNICODE_16)
    return text


# -----------------------------------------------------------------------------
# What makes it fast: splitting text into chunks is most of the work of encoding. Three rewrites of the
# patterns above, each exact:

# `regex` runs possessive quantifiers (`++`, `?+`, ...) about 20% slower than plain greedy ones. In
# GPT-2's and cl100k's patterns nothing that follows a possessive quantifier can fail in a way that
# backtracking would repair (`\s+$` included: a run of whitespace reaches the end of the text or it
# does not), so these plain versions split identically; the tests check them against tiktoken.
_FASTER_EQUIVALENT = {
    GPT2_PATTERN: r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+$|\s+(?!\S)|\s""",
    CL100K_PATTERN: r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+$|\s*[\r\n]|\s+(?!\S)|\s""",
}

# On text without a non-ASCII character \p{L} is [a-zA-Z], \p{N} is [0-9], the other letter and
# mark classes are empty, and `re.ASCII`'s \s is exactly the ASCII part of Unicode's White_Space. So
# these translations split ASCII text exactly as the originals do, and the standard library's `re`
# runs them about twice as fast as `regex` runs the originals.
_ASCII_EQUIVALENT = {
    GPT2_PATTERN: r"""'(?:[sdmt]|ll|ve|re)| ?[a-zA-Z]+| ?[0-9]+| ?[^\sa-zA-Z0-9]+|\s+$|\s+(?!\S)|\s""",
    CL100K_PATTERN: r"""'(?i:[sdmt]|ll|ve|re)|[^\r\na-zA-Z0-9]?[a-zA-Z]+|[0-9]{1,3}| ?[^\sa-zA-Z0-9]+[\r\n]*|\s+$|\s*[\r\n]|\s+(?!\S)|\s""",
    O200K_PATTERN: r"""[^\r\na-zA-Z0-9]?[A-Z]*[a-z]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\na-zA-Z0-9]?[A-Z]+[a-z]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[0-9]{1,3}| ?[^\sa-zA-Z0-9]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    LLAMA3_PATTERN: r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\na-zA-Z0-9]?[a-zA-Z]+|[0-9]{1,3}| ?[^\sa-zA-Z0-9]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    QWEN2_PATTERN: r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\na-zA-Z0-9]?[a-zA-Z]+|[0-9]| ?[^\sa-zA-Z0-9]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}
# tokenizers' ByteLevel regex makes GPT-2's chunks (see above), so it takes GPT-2's faster forms.
_FASTER_EQUIVALENT[BYTE_LEVEL_PATTERN] = _FASTER_EQUIVALENT[GPT2_PATTERN]
_ASCII_EQUIVALENT[BYTE_LEVEL_PATTERN] = _ASCII_EQUIVALENT[GPT2_PATTERN]
_LONG_ASCII = re.compile(r"[\x00-\x7f]{256,}")
_CUT = re.compile(r"(?<=\S) ")  # `re`'s \S excludes a few non-White_Space controls too: fewer cuts, still safe


def splitter(pattern: str):
    """A function text -> chunks, equal to `regex.compile(pattern).findall` on Unicode 16's tables
    (see "the Unicode version" above) but faster.

    Mostly-ASCII text is cut into long ASCII stretches, split by `re` with the ASCII translation, and
    the rest, split by `regex`. The cuts go before a space that follows a non-space: in all the
    known patterns no chunk runs from a non-space into a following space (a chunk takes a space only
    as its first character or within a run of whitespace), and whether a chunk matches depends on
    nothing to its left, nor (lookaheads and `$` being reached only inside runs of whitespace) on
    anything right of such a cut. So splitting the pieces separately gives the same chunks.
    """
    compiled = regex.compile(_FASTER_EQUIVALENT.get(pattern, pattern))

    def slow(text: str) -> list:
        translated = _as_unicode_16(text)
        if translated is text:
            return compiled.findall(text)
        return [text[m.start() : m.end()] for m in compiled.finditer(translated)]

    if pattern not in _ASCII_EQUIVALENT:
        return slow
    fast = re.compile(_ASCII_EQUIVALENT[pattern], re.ASCII).findall

    def split(text: str) -> list:
        if text.isascii():
            return fast(text)
        chunks, done = [], 0
        for run in _LONG_ASCII.finditer(text):
            cut = _CUT.search(text, run.start(), run.end())
            start = 0 if run.start() == 0 else cut.start() if cut else run.end()
            end = run.end()
            if end < len(text):  # back off to the last cut inside the run
                end = text.rfind(" ", start + 1, end)
                while end > start and text[end - 1].isspace():
                    end = text.rfind(" ", start + 1, end)
            if end > start:
                chunks += slow(text[done:start])
                chunks += fast(text[start:end])
                done = end
        chunks += slow(text[done:])
        return chunks

    return split


# A long chunk (a run of 100k identical letters, say) would make bpe_merge's linear scan per merge
# quadratic; past this many bytes it takes _bpe_merge_long's heap instead.
_LONG_CHUNK = 64


def _bpe_merge_long(piece: bytes, ranks: dict) -> list:
    """bpe_merge's merges in O(n log n): a heap of (rank, start) over a linked list of parts.

    Heap entries go stale when a neighbour merges; an entry is used only if the part still starts there
    and its pair with the next part still has that rank (a rank names one byte string, so that suffices).
    """
    get = ranks.get
    n = len(piece)
    nxt = list(range(1, n + 2))  # nxt[s]: where the part starting at s ends; n + 1 past the last
    prv = list(range(-1, n))
    alive = [True] * (n + 1)
    heap = [(r, i) for i in range(n - 1) if (r := get(piece[i : i + 2])) is not None]
    heapq.heapify(heap)
    while heap:
        r, s = heapq.heappop(heap)
        if not alive[s] or nxt[s] >= n:
            continue
        e = nxt[nxt[s]]
        if get(piece[s:e]) != r:
            continue
        alive[nxt[s]] = False  # the part starting at s absorbs its right neighbour
        nxt[s] = e
        if e <= n:
            prv[e] = s
        if e < n and (r := get(piece[s : nxt[e]])) is not None:
            heapq.heappush(heap, (r, s))
        p = prv[s]
        if p >= 0 and (r := get(piece[p:e])) is not None:
            heapq.heappush(heap, (r, p))
    ids, s = [], 0
    while s < n:
        ids.append(ranks[piece[s : nxt[s]]])
        s = nxt[s]
    return ids


class _ChunkCache(dict):
    """chunk (str) -> its token ids; a chunk seen for the first time is encoded on the spot.

    Real text repeats chunks so often that after the first few kilobytes almost every chunk is a cache
    hit, which costs a dict lookup instead of a merge; the cache is cleared when it grows past SIZE."""

    SIZE = 1 << 20

    def __init__(self, encode_chunk):
        self.encode_chunk = encode_chunk

    def __missing__(self, chunk: str) -> list:
        ids = self[chunk] = self.encode_chunk(chunk)
        return ids

    def ids_of(self, chunks: list) -> list:
        """The ids of `chunks`, one after another."""
        if len(self) > self.SIZE:
            self.clear()
        ids = []
        # The loop's work happens in C: a cache hit is a dict lookup, and `extend` copies the ids.
        deque(map(ids.extend, map(self.__getitem__, chunks)), maxlen=0)
        return ids


# -----------------------------------------------------------------------------
# Demo: train on the standard library's pydoc topics and check the result against tiktoken.

if __name__ == "__main__":
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    t0 = time.perf_counter()
    tok = train(text, vocab_size=1024, special_tokens=["<|endoftext|>"])
    print(f"trained {len(tok.mergeable_ranks)} ranks on {len(text.encode()) / 1e3:.0f} KB of pydoc topics in {time.perf_counter() - t0:.2f}s")
    first = sorted(tok.mergeable_ranks.items(), key=lambda kv: kv[1])[256:266]
    print("first merges:", " ".join(repr(t.decode("utf-8", "replace")) for t, _ in first))
    t0 = time.perf_counter()
    ids = tok.encode(text)
    dt = time.perf_counter() - t0
    print(f"encoded to {len(ids)} tokens: {len(text.encode()) / len(ids):.2f} bytes per token, {len(text.encode()) / dt / 1e6:.1f} MB/s")
    sample = "Hello wörld! 你好 🙂 <|endoftext|>  def f(x):\r\n    return x ** 2"
    sample_ids = tok.encode(sample, allowed_special="all")
    assert tok.decode(sample_ids) == sample and tok.decode(ids) == text
    print(f"round trip ok: {sample!r} ->", [tok.decode_bytes([i]) for i in sample_ids])
    try:
        import tiktoken
    except ImportError:
        tiktoken = None
    if tiktoken is not None:
        enc = tiktoken.Encoding("demo", pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks, special_tokens=tok.special_tokens)
        same = enc.encode(text) == ids and enc.encode(sample, allowed_special="all") == sample_ids
        print(f"tiktoken with our ranks gives the same ids: {same}")
        assert same
