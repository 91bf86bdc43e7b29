"""Tokenizers: text <-> token ids, all behind one small interface (`Tokenizer`).

  HarmonyTokenizer  tiktoken's byte-level BPE: `cl100k_base` (the mini preset) or `o200k_harmony` (gpt-oss's
                    own: o200k_base plus the harmony chat-format special tokens, vocabulary 201,088)
  ByteTokenizer     raw UTF-8 bytes (ids 0..255) plus <|endoftext|> = 256
  CompactTokenizer  bytes + <|endoftext|> + the K most frequent multi-byte tokens of a tiktoken encoding in a
                    training corpus + Harmony's chat tokens: lossless like the base, but with a vocabulary small
                    enough that the LM head does not dominate a small model's compute

`TextStream` turns tokens that arrive one at a time (generation) into text, character by character.

A *spec* string names a tokenizer in configs and in a prepared data folder's meta.json: "cl100k_base",
"o200k_harmony", "bytes", or "BASE:K" (e.g. "cl100k_base:8192") for a compact tokenizer, whose kept tokens are
stored in the data folder's tokenizer.json by `ossgpt prepare`. `load_tokenizer(spec, directory)` builds any of them.

Special-token text inside ordinary input (a web page quoting "<|endoftext|>") is encoded as ordinary text
unless the caller lists it in `allowed_special`, so untrusted text can never inject control tokens.
"""

from __future__ import annotations

import base64
import codecs
import functools
import json
import re
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from unittest import mock

import tiktoken
from tiktoken_ext import openai_public

from ossgpt.errors import UserError

EOT = "<|endoftext|>"
REPLACEMENT = "\N{REPLACEMENT CHARACTER}".encode()  # U+FFFD, UTF-8's stand-in for what cannot be decoded
TOKENIZER_FILE = "tokenizer.json"
TIKTOKEN_ENCODINGS = ("cl100k_base", "o200k_harmony")
RANKS_OF = {"cl100k_base": "cl100k_base", "o200k_harmony": "o200k_base"}  # whose BPE ranks each encoding uses

# gpt-oss's special tokens on top of o200k_base's ranks (as in tiktoken's own o200k_harmony): fixed ids whatever
# the size of the base vocabulary, with every unnamed id up to 201,087 reserved.
HARMONY_SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|reserved_200000|>": 200000,
    "<|reserved_200001|>": 200001,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|reserved_200004|>": 200004,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|reserved_200009|>": 200009,
    "<|reserved_200010|>": 200010,
    "<|reserved_200011|>": 200011,
    "<|call|>": 200012,
} | {f"<|reserved_{i}|>": i for i in range(200013, 201088)}
# The ones the Harmony chat format writes (ossgpt.chat.harmony), in o200k_harmony's order: what a compact
# tokenizer adds so that small models can be trained to chat.
HARMONY_CHAT_TOKENS = ("<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|end|>", "<|message|>", "<|call|>")


# ---------------------------------------------------------------------------------------------------------------
class Tokenizer:
    """What every tokenizer offers.

    Subclasses set `spec`, `special_tokens` ({text: id}), `eot_token_id` and `vocab_size` (largest id + 1,
    special tokens included), and implement `encode_ordinary` and `_decode_bytes`.
    """

    spec: str
    special_tokens: dict[str, int]
    eot_token_id: int
    vocab_size: int

    @property
    def name(self) -> str:
        return self.spec

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text`, treating special-token text as ordinary text."""
        raise NotImplementedError

    def _decode_bytes(self, ids: list[int]) -> bytes:
        raise NotImplementedError

    def encode(self, text: str, return_tensors: str | None = None, allowed_special: str | Collection[str] = ()):
        """Token ids of `text`.

        allowed_special: special tokens ("all", or a collection of their texts) to encode as their ids where they
            appear in `text`; any other special-token text is encoded as ordinary text.
        Returns list[int], or with return_tensors="pt" a LongTensor of shape [1, T].
        """
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        else:
            allowed = set(allowed_special)
            unknown = sorted(allowed - set(self.special_tokens))
            if unknown:
                raise ValueError(f"not special tokens of {self.spec}: {', '.join(unknown)}")
        ids = self._encode(text, allowed)
        if return_tensors is None:
            return ids
        if return_tensors == "pt":
            import torch  # only callers that want tensors pay for importing torch

            return torch.tensor([ids], dtype=torch.long)
        raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")

    def _encode(self, text: str, allowed: set[str]) -> list[int]:
        """Encode the pieces between allowed special tokens as ordinary text, the special tokens as their ids."""
        if not allowed:
            return self.encode_ordinary(text)
        # Longest first, so that a special token that is a prefix of another does not shadow it.
        pattern = "(" + "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")"
        ids = []
        for i, piece in enumerate(re.split(pattern, text)):
            if i % 2:  # re.split puts the captured separators at odd positions
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def decode_bytes(self, ids) -> bytes:
        """The bytes that token ids stand for (special tokens as their text).

        ids: list[int], or a tensor/array of shape [T] or [1, T]. Useful to count bytes (bits per byte) and to
        stream text whose last token ends inside a multi-byte UTF-8 character.
        """
        return self._decode_bytes(as_id_list(ids))

    def decode(self, ids) -> str:
        """Text of token ids (see `decode_bytes`); invalid UTF-8 (e.g. a cut-off character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        """One token's bytes; U+FFFD's for an id this tokenizer does not have (a model's embedding may be padded
        past its tokenizer's vocabulary, and an untrained model may sample such an id)."""
        try:
            return self.decode_bytes([token])
        except (KeyError, ValueError):
            return REPLACEMENT

    def save(self, directory: str | Path) -> None:
        """Write `directory/tokenizer.json`, from which `load_tokenizer(spec, directory)` rebuilds this tokenizer."""
        state = {"spec": self.spec, **self._extra_state()}
        (Path(directory) / TOKENIZER_FILE).write_text(json.dumps(state) + "\n")

    def _extra_state(self) -> dict:
        """What, beyond the spec, `save` must record to rebuild this tokenizer."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size})"


class TextStream:
    """The text of tokens that arrive one at a time, as generation produces them.

        text = TextStream(tokenizer)
        for token in tokens:
            print(text.add(token), end="")
        print(text.finish())

    A token may end inside a multi-byte UTF-8 character (byte-level tokenizers split characters freely): `add`
    returns only whole characters, holding a cut one back until its last byte arrives; `finish` returns what is left,
    a character cut off for good as U+FFFD. The pieces join to `tokenizer.decode(tokens)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self._decoder.decode(self.tokenizer.token_bytes(token))

    def add_all(self, tokens: Iterable[int]) -> Iterator[str]:
        """The non-empty pieces of `tokens`, then what `finish` returns (if anything)."""
        for token in tokens:
            piece = self.add(token)
            if piece:
                yield piece
        rest = self.finish()
        if rest:
            yield rest

    def finish(self) -> str:
        rest = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return rest


def as_id_list(ids) -> list[int]:
    """A flat list of ints from a list, or from a tensor/array of shape [T] or [1, T]."""
    if hasattr(ids, "tolist"):  # torch tensors and numpy arrays, without importing either
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    ids = list(ids)
    if ids and isinstance(ids[0], list):
        if len(ids) != 1:
            raise ValueError(f"can decode one sequence at a time (shape [T] or [1, T]), got a batch of {len(ids)}")
        ids = ids[0]
    return [int(i) for i in ids]


# ---------------------------------------------------------------------------------------------------------------
class HarmonyTokenizer(Tokenizer):
    """A tiktoken encoding: "cl100k_base" or "o200k_harmony".

    vocab_file: a .tiktoken BPE ranks file to use instead of tiktoken's download/cache (for o200k_harmony, the
        o200k_base ranks). The special tokens keep their fixed ids whatever the file, so a small ranks file works.
    Without vocab_file, tiktoken loads the ranks itself: from TIKTOKEN_CACHE_DIR, else by downloading them.
    """

    def __init__(self, encoding: str = "cl100k_base", vocab_file: str | Path | None = None):
        if encoding not in TIKTOKEN_ENCODINGS:
            raise UserError(f"unknown tiktoken encoding {encoding!r}; choose one of: {', '.join(TIKTOKEN_ENCODINGS)}")
        self.encoding = _load_encoding(encoding, None if vocab_file is None else str(vocab_file))
        self.spec = encoding
        self.special_tokens = {s: self.encoding.encode_single_token(s) for s in self.encoding.special_tokens_set}
        self.eot_token_id = self.special_tokens[EOT]
        self.vocab_size = self.encoding.max_token_value + 1

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def _encode(self, text: str, allowed: set[str]) -> list[int]:
        return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def _decode_bytes(self, ids: list[int]) -> bytes:
        return self.encoding.decode_bytes(ids)


@functools.cache  # parsing a ranks file takes a noticeable fraction of a second; do it once per process
def _load_encoding(name: str, vocab_file: str | None) -> tiktoken.Encoding:
    if vocab_file is None and name in tiktoken.list_encoding_names():
        return _tiktoken_encoding(name)
    # Build it: from a given ranks file, or (a tiktoken older than o200k_harmony) from tiktoken's o200k_base.
    base_name = RANKS_OF[name]
    if vocab_file is None:
        base = _tiktoken_encoding(base_name)
        # tiktoken's README extends encodings this way, through these attributes.
        pat_str, ranks, special_tokens = base._pat_str, base._mergeable_ranks, base._special_tokens
    else:
        recipe = _recipe_without_ranks(base_name)
        pat_str, ranks, special_tokens = recipe["pat_str"], read_bpe_ranks(vocab_file), recipe["special_tokens"]
    if name == "o200k_harmony":
        special_tokens = {**special_tokens, **HARMONY_SPECIAL_TOKENS}
    return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens)


def _tiktoken_encoding(name: str) -> tiktoken.Encoding:
    """tiktoken's own encoding, with a one-line UserError when its ranks file can be neither read nor downloaded."""
    try:
        return tiktoken.get_encoding(name)
    except (OSError, ValueError, ImportError) as err:  # no network (requests' errors are OSErrors), bad hash
        ranks_file = f"{RANKS_OF.get(name, name)}.tiktoken"
        raise UserError(
            f"cannot load the {name} vocabulary ({ranks_file}): not in tiktoken's cache and the download failed "
            f"({type(err).__name__}); set TIKTOKEN_CACHE_DIR to a tiktoken cache folder holding it, "
            f"or pass --vocab-file (vocab_file=) with the path of {ranks_file}"
        ) from err


def _recipe_without_ranks(name: str) -> dict:
    """tiktoken's recipe for encoding `name` (its regex `pat_str` and `special_tokens`), without loading its ranks.

    tiktoken keeps each regex inside its constructor function, so run the constructor with the ranks loader
    stubbed out rather than copying the pattern here.
    """
    with mock.patch.object(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {}):
        return openai_public.ENCODING_CONSTRUCTORS[name]()


def read_bpe_ranks(path: str | Path) -> dict[bytes, int]:
    """A .tiktoken ranks file (lines of "base64(token) rank") as {token bytes: rank}.

    Not tiktoken.load.load_tiktoken_bpe: that copies every file it reads into tiktoken's cache folder, which fails
    when the folder is read-only (a shared cache) and otherwise fills it with copies of local files.
    """
    try:
        lines = Path(path).read_bytes().splitlines()
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    except OSError as err:
        raise UserError(f"cannot read vocab file {path}: {err.strerror or err}; pass a .tiktoken file's path") from err
    except ValueError as err:
        raise UserError(f"vocab file {path} is not a .tiktoken ranks file (lines of 'base64-token rank')") from err


# ---------------------------------------------------------------------------------------------------------------
class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, and <|endoftext|> as 256. Lossless, with no vocabulary file at all."""

    spec = "bytes"

    def __init__(self):
        self.special_tokens = {EOT: 256}
        self.eot_token_id = 256
        self._token_bytes = [bytes([b]) for b in range(256)] + [EOT.encode()]  # id -> bytes

    @property
    def vocab_size(self) -> int:
        return len(self._token_bytes)

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _decode_bytes(self, ids: list[int]) -> bytes:
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            raise ValueError(f"{self.spec} token ids lie in [0, {self.vocab_size}), got {min(ids)}..{max(ids)}")
        return b"".join(self._token_bytes[i] for i in ids)


class CompactTokenizer(ByteTokenizer):
    """A small vocabulary derived from a tiktoken encoding: the byte tokenizer plus K kept multi-byte tokens, plus
    the Harmony chat tokens.

    Ids: 0..255 bytes, 256 <|endoftext|>, 257.. the kept base tokens (`kept_token_ids`, most frequent first), then
    the 7 HARMONY_CHAT_TOKENS (<|return|> ... <|call|>). The chat tokens come last so that adding them left every
    earlier id as it was: a tokenizer.json saved before they existed loads with the same ids for all its tokens.
    Text is encoded with the base encoding; each base token becomes its compact id if kept, else its bytes.
    Build one with `fit`; `save` and `load` round-trip it through tokenizer.json.
    """

    def __init__(self, base: HarmonyTokenizer, kept_token_ids: Sequence[int], spec: str | None = None):
        super().__init__()
        self.base = base
        self.kept_token_ids = [int(t) for t in kept_token_ids]
        self.spec = spec or f"{base.spec}:{len(self.kept_token_ids)}"
        try:
            kept_bytes = [base.encoding.decode_single_token_bytes(t) for t in self.kept_token_ids]
        except KeyError as err:
            raise UserError(f"kept token {err} is not a token of {base.spec}; re-run `ossgpt prepare`") from err
        if len(set(kept_bytes)) != len(kept_bytes) or any(len(b) < 2 for b in kept_bytes):
            raise UserError(f"kept tokens of {self.spec} must be distinct multi-byte tokens; re-run `ossgpt prepare`")
        first = len(self._token_bytes)
        # base id -> compact ids; filled lazily with byte expansions of the tokens that were not kept
        self._expansion = {t: [first + i] for i, t in enumerate(self.kept_token_ids)}
        self._token_bytes += kept_bytes
        for text in HARMONY_CHAT_TOKENS:
            self.special_tokens[text] = len(self._token_bytes)
            self._token_bytes.append(text.encode())

    @classmethod
    def fit(
        cls,
        base_encoding: str,
        texts_or_token_counts: Iterable[str] | Mapping[int, int],
        size: int,
        vocab_file: str | Path | None = None,
    ) -> CompactTokenizer:
        """Keep the `size` most frequent multi-byte base tokens (ties: lower base id first).

        texts_or_token_counts: training texts, or {base token id: count} already counted from them.
        The vocabulary is 257 + size + 7 ids, fewer when the corpus has fewer distinct multi-byte tokens.
        """
        if size < 1:
            raise UserError(f"a compact vocabulary needs at least 1 kept token, got {size}")
        base = HarmonyTokenizer(base_encoding, vocab_file)
        if isinstance(texts_or_token_counts, Mapping):
            counts = Counter(texts_or_token_counts)
        else:
            texts = [texts_or_token_counts] if isinstance(texts_or_token_counts, str) else texts_or_token_counts
            counts = Counter(t for text in texts for t in base.encode_ordinary(text))
        multi_byte = [t for t in counts if len(base.encoding.decode_single_token_bytes(t)) > 1]
        kept = sorted(multi_byte, key=lambda t: (-counts[t], t))[:size]
        return cls(base, kept, spec=f"{base_encoding}:{size}")

    @classmethod
    def load(cls, directory: str | Path, vocab_file: str | Path | None = None) -> CompactTokenizer:
        """The compact tokenizer saved in `directory/tokenizer.json`."""
        state = _read_state(directory)
        if "kept_token_ids" not in state:
            raise UserError(f"{Path(directory) / TOKENIZER_FILE} holds no compact tokenizer; re-run `ossgpt prepare`")
        base_spec, _ = split_spec(state["spec"])
        return cls(HarmonyTokenizer(base_spec, vocab_file), state["kept_token_ids"], spec=state["spec"])

    def _extra_state(self) -> dict:
        return {"base_encoding": self.base.spec, "kept_token_ids": self.kept_token_ids}

    def encode_ordinary(self, text: str) -> list[int]:
        return self.from_base_ids(self.base.encode_ordinary(text))

    def from_base_ids(self, base_ids: Iterable[int]) -> list[int]:
        """Compact ids of a base-encoding token sequence: kept tokens as their ids, others as their bytes."""
        ids = []
        for t in base_ids:
            expansion = self._expansion.get(t)
            if expansion is None:  # byte ids equal byte values, so a token's bytes are its expansion
                expansion = self._expansion[t] = list(self.base.encoding.decode_single_token_bytes(t))
            ids.extend(expansion)
        return ids


# ---------------------------------------------------------------------------------------------------------------
def split_spec(spec: str) -> tuple[str, int | None]:
    """("cl100k_base", None) for "cl100k_base", ("cl100k_base", 8192) for "cl100k_base:8192"; UserError if unknown."""
    base, sep, size = spec.partition(":")
    known = base in TIKTOKEN_ENCODINGS or (base == ByteTokenizer.spec and not sep)
    if not known or (sep and not (size.isdigit() and int(size) > 0)):
        raise UserError(
            f"unknown tokenizer {spec!r}; choose {', '.join(TIKTOKEN_ENCODINGS)}, {ByteTokenizer.spec}, "
            f"or BASE:K for a compact vocabulary of K tokens (e.g. cl100k_base:8192)"
        )
    return base, int(size) if sep else None


def load_tokenizer(
    spec: str | None, directory: str | Path | None = None, vocab_file: str | Path | None = None
) -> Tokenizer:
    """The tokenizer named by `spec`.

    directory: a prepared data folder; needed for compact specs ("BASE:K"), whose kept tokens live in its
        tokenizer.json. With spec=None the spec is read from that file.
    vocab_file: a .tiktoken ranks file for the tiktoken encoding (see HarmonyTokenizer).
    """
    if spec is None:
        if directory is None:
            raise UserError("no tokenizer given: pass a tokenizer spec or a prepared data folder")
        spec = _read_state(directory)["spec"]
    base, size = split_spec(spec)
    if size is None:
        return ByteTokenizer() if base == ByteTokenizer.spec else HarmonyTokenizer(base, vocab_file)
    if directory is None:
        raise UserError(
            f"tokenizer {spec} is fitted to a corpus: pass the folder `ossgpt prepare --tokenizer {spec}` wrote"
        )
    saved = _read_state(directory)["spec"]
    if saved != spec:
        raise UserError(f"{directory} was prepared with tokenizer {saved}, not {spec}; re-run `ossgpt prepare`")
    return CompactTokenizer.load(directory, vocab_file)


def saved_state(directory: str | Path) -> dict | None:
    """What `Tokenizer.save` wrote to directory/tokenizer.json (a JSON object with its "spec"), or None if there
    is no such file, or it is another program's (a Hugging Face download's tokenizer.json)."""
    try:
        state = json.loads((Path(directory) / TOKENIZER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("spec"), str) else None  # every one has a spec


def _read_state(directory: str | Path) -> dict:
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{path} not found; run `ossgpt prepare` to build the data folder with its tokenizer")
    state = saved_state(directory)
    if state is None:
        raise UserError(f"{path} is not a tokenizer file written by ossgpt; re-run `ossgpt prepare`")
    return state
