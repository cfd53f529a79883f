"""The checkpoint's SentencePiece tokenizer, behaving exactly like the reference's.

The reference runs transformers 4.36's *slow* ``LlamaTokenizer`` (docs/model.md, "Tokenizer" and "The image in the prompt"). Its output
is what the model was prompted with, so token-for-token agreement needs its quirks, not a
"clean" SentencePiece call:

* special tokens written in the text (``<s>``, ``</s>``, ``<unk>``) are split out first and map
  to their ids, and ``tokenizer(text)`` *also* prepends BOS, hence the double BOS of a rendered
  chat that begins with ``<s>``;
* ``legacy`` (read from ``tokenizer_config.json``; absent means ``True`` in 4.36) changes how
  text right after a special token is encoded (no dummy ``▁`` prefix when ``legacy`` is false);
* decoding strips a leading ``▁``, skips special ids and, unless the config says otherwise,
  applies ``clean_up_tokenization_spaces`` (" ." -> "." and friends);
* the reference reads answers through ``TextIteratorStreamer``, whose segment-wise decoding
  (it restarts after every newline) is reproduced by :meth:`LlamaTokenizer.stream_decode`,
  because multi-turn chats re-tokenize those answers.

Only the ``sentencepiece`` library is used; the no-dummy-prefix variant needed for
``legacy=False`` is made by editing one field of the model protobuf directly.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm

SPIECE_UNDERLINE = "\u2581"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ADDED_TOKENS = "added_tokens.json"


class TokenizerError(ValueError):
    """The tokenizer files are missing or inconsistent."""


@dataclass(frozen=True)
class AddedToken:
    """A token matched verbatim in text before SentencePiece sees it (transformers' AddedToken)."""

    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    special: bool = True


class LlamaTokenizer:
    """SentencePiece tokenizer with transformers-4.36 slow ``LlamaTokenizer`` semantics."""

    def __init__(
        self,
        model_proto: bytes,
        *,
        legacy: bool = True,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = True,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str | None = None,
        added_tokens: list[AddedToken] | None = None,
    ) -> None:
        self.legacy = legacy
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(
            model_proto if legacy else _without_dummy_prefix(model_proto)
        )
        self.vocab_size = self.sp.GetPieceSize()

        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        specials = {bos_token, eos_token, unk_token} | ({pad_token} if pad_token else set())
        by_content = {t.content: t for t in (added_tokens or [])}
        for content in specials:  # specials are always added tokens, as in transformers
            if content not in by_content:
                by_content[content] = AddedToken(content, self._sp_id(content, content))
        self.added_tokens = by_content
        self.special_tokens = frozenset(specials)
        self.special_ids = frozenset(by_content[c].id for c in specials)
        self._id_to_added = {t.id: t.content for t in by_content.values()}
        alternatives = sorted(by_content, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(a) for a in alternatives) + ")")
        self._unk_len = len(self.sp.encode(unk_token, out_type=str))

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> LlamaTokenizer:
        """Load ``tokenizer.model`` with the options in the checkpoint's tokenizer JSON files."""
        directory = Path(directory)
        model_file = directory / TOKENIZER_FILE
        if not model_file.is_file():
            raise TokenizerError(
                f"{model_file} not found; the checkpoint must ship its SentencePiece model "
                f"({TOKENIZER_FILE}) next to config.json."
            )
        cfg = _read_json(directory / TOKENIZER_CONFIG)
        specials_map = _read_json(directory / SPECIAL_TOKENS_MAP)
        added_json = _read_json(directory / ADDED_TOKENS)

        def token(name: str, default: str | None) -> str | None:
            value = cfg.get(name, specials_map.get(name, default))
            if isinstance(value, dict):
                value = value.get("content")
            return value if value is not None else default

        added: list[AddedToken] = []
        for key, spec in (cfg.get("added_tokens_decoder") or {}).items():
            added.append(
                AddedToken(
                    content=spec["content"],
                    id=int(key),
                    lstrip=bool(spec.get("lstrip", False)),
                    rstrip=bool(spec.get("rstrip", False)),
                    single_word=bool(spec.get("single_word", False)),
                    special=bool(spec.get("special", True)),
                )
            )
        known = {t.content for t in added}
        added += [AddedToken(c, int(i)) for c, i in added_json.items() if c not in known]
        legacy = cfg.get("legacy")
        return cls(
            model_file.read_bytes(),
            legacy=True if legacy is None else bool(legacy),
            add_bos_token=bool(cfg.get("add_bos_token", True)),
            add_eos_token=bool(cfg.get("add_eos_token", False)),
            clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", True)),
            bos_token=token("bos_token", "<s>"),
            eos_token=token("eos_token", "</s>"),
            unk_token=token("unk_token", "<unk>"),
            pad_token=token("pad_token", None),
            added_tokens=added,
        )

    # ---------------------------------------------------------------- ids
    @property
    def bos_token_id(self) -> int:
        return self.added_tokens[self.bos_token].id

    @property
    def eos_token_id(self) -> int:
        return self.added_tokens[self.eos_token].id

    @property
    def unk_token_id(self) -> int:
        return self.added_tokens[self.unk_token].id

    def _sp_id(self, piece: str, what: str) -> int:
        i = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(i) != piece:
            raise TokenizerError(f"special token {what!r} is not in {TOKENIZER_FILE}.")
        return i

    def token_to_id(self, token: str) -> int:
        added = self.added_tokens.get(token)
        return added.id if added is not None else self.sp.piece_to_id(token)

    def id_to_token(self, index: int) -> str:
        if index in self._id_to_added:
            return self._id_to_added[index]
        if not 0 <= index < self.vocab_size:
            return self.unk_token  # ids the SentencePiece model lacks read as unknown
        return self.sp.id_to_piece(index)

    # ---------------------------------------------------------------- encoding
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``tokenizer(text).input_ids`` of the reference: BOS (+ EOS if configured) + tokens."""
        ids = [self.token_to_id(t) for t in self.tokenize(text)]
        if add_special_tokens:
            ids = ([self.bos_token_id] if self.add_bos_token else []) + ids
            ids = ids + ([self.eos_token_id] if self.add_eos_token else [])
        return ids

    def tokenize(self, text: str) -> list[str]:
        if self.legacy or not text:
            return self._split_and_tokenize(text)
        tokens = self._split_and_tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.special_tokens:
            tokens = tokens[1:]
        return tokens

    def _split_and_tokenize(self, text: str) -> list[str]:
        parts = self._split_re.split(text)
        for i, part in enumerate(parts):
            tok = self.added_tokens.get(part) if i % 2 else None
            if tok is None:
                continue
            left = parts[i - 1] if i > 0 else None
            right = parts[i + 1] if i + 1 < len(parts) else None
            if tok.rstrip and right:
                parts[i + 1] = right.lstrip()
            if tok.lstrip and left:
                parts[i - 1] = left.rstrip()
            if tok.single_word and left and left[-1] != " ":
                parts[i - 1] += part
                parts[i] = ""
            elif tok.single_word and right and right[0] != " ":
                parts[i + 1] = part + parts[i + 1]
                parts[i] = ""
        out: list[str] = []
        for i, part in enumerate(parts):
            if not part:
                continue
            if i % 2 and part in self.added_tokens:
                out.append(part)
            else:
                out.extend(self._sp_tokenize(part))
        return out

    def _sp_tokenize(self, text: str) -> list[str]:
        tokens = self.sp.encode(text, out_type=str)
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return tokens
        tokens = self.sp.encode(self.unk_token + text, out_type=str)
        return tokens[self._unk_len :] if len(tokens) >= self._unk_len else tokens

    # ---------------------------------------------------------------- decoding
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """``tokenizer.decode(ids, skip_special_tokens=...)`` of the reference."""
        tokens = [
            self.id_to_token(int(i))
            for i in ids
            if not (skip_special_tokens and self._is_special_id(int(i)))
        ]
        text = self._tokens_to_string(tokens) if tokens else ""
        return _clean_up(text) if self.clean_up_tokenization_spaces else text

    def _is_special_id(self, index: int) -> bool:
        return index in self.special_ids or not 0 <= index < self.vocab_size

    def _tokens_to_string(self, tokens: list[str]) -> str:
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        out, current, prev_special = "", [], False
        for i, tok in enumerate(tokens):
            if tok in self.special_tokens:
                if not prev_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp.decode(current) + tok
                prev_special, current = True, []
            else:
                current.append(tok)
                prev_special = False
        return out + self.sp.decode(current)

    def stream_decode(self, ids: list[int]) -> str:
        """The text ``TextIteratorStreamer(skip_prompt, skip_special_tokens)`` yields for ``ids``.

        The streamer decodes a growing token cache, emits text up to the last space, and empties
        the cache whenever the decoded text ends in a newline; the segment after a newline is
        then decoded on its own (so its leading ``▁`` is dropped). The concatenation of what it
        emits is the reference's answer string.
        """
        out: list[str] = []
        cache: list[int] = []
        print_len = 0
        for i in ids:
            cache.append(int(i))
            text = self.decode(cache)
            if text.endswith("\n"):
                out.append(text[print_len:])
                cache, print_len = [], 0
            elif text and _is_cjk(ord(text[-1])):
                out.append(text[print_len:])
                print_len += len(out[-1])
            else:
                piece = text[print_len : text.rfind(" ") + 1]
                out.append(piece)
                print_len += len(piece)
        if cache:
            out.append(self.decode(cache)[print_len:])
        return "".join(out)


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization``."""
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path} is not valid JSON ({exc}).") from None


# ----------------------------------------------------------------- protobuf edit
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _without_dummy_prefix(model_proto: bytes) -> bytes:
    """The model with ``normalizer_spec.add_dummy_prefix = false`` (what 4.36 does for legacy=False).

    ``ModelProto.normalizer_spec`` is field 3 and ``NormalizerSpec.add_dummy_prefix`` is its
    field 3 (varint). Appending ``add_dummy_prefix = 0`` to the sub-message overrides an earlier
    value (protobuf keeps the last occurrence), which is what ``MergeFrom`` produces.
    """
    override = bytes([3 << 3 | 0, 0])
    out = bytearray()
    pos, found = 0, False
    while pos < len(model_proto):
        start = pos
        key, pos = _varint(model_proto, pos)
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(model_proto, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, body = _varint(model_proto, pos)
            pos = body + length
            if field_no == 3:
                payload = model_proto[body:pos] + override
                out += _encode_varint(key) + _encode_varint(len(payload)) + payload
                found = True
                continue
        else:
            raise TokenizerError(
                f"{TOKENIZER_FILE} is not a SentencePiece model (wire type {wire})."
            )
        out += model_proto[start:pos]
    if not found:
        out += _encode_varint(3 << 3 | 2) + _encode_varint(len(override)) + override
    return bytes(out)
