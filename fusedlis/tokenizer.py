"""Tokenizers: a checkpoint's tokenizer.json (through `tokenizers`), else a byte-level fallback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Byte-level fallback: token id = UTF-8 byte value (0-255); ids >= 256 are specials and decode to nothing.

    Used when a checkpoint has no tokenizer.json (the embedded `tiny` model). Needs vocab_size >= 256.
    A BOS id, when given, is prepended by `encode`.
    """

    def __init__(self, vocab_size: int, bos_token_id: int | None = None,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        if vocab_size < 256:
            raise ValueError(f"byte-level fallback tokenizer needs vocab_size >= 256, model has {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id if bos_token_id is not None and bos_token_id < vocab_size else None
        self.eos_token_ids = tuple(eos_token_ids)

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer.json read with the `tokenizers` library (BOS added by its post-processor)."""

    def __init__(self, path: str | os.PathLike, bos_token_id: int | None = None,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        from tokenizers import Tokenizer as _T

        self._tok = _T.from_file(os.fspath(path))
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(checkpoint: str | os.PathLike | None, vocab_size: int, bos_token_id: int | None,
                   eos_token_ids: tuple[int, ...]) -> Tokenizer | None:
    """The checkpoint's tokenizer.json if present and `tokenizers` is installed, else the byte fallback
    (when the vocabulary is large enough), else None."""
    if checkpoint is not None:
        tj = Path(checkpoint) / "tokenizer.json"
        if tj.exists():
            try:
                return HFTokenizer(tj, bos_token_id, eos_token_ids)
            except ImportError:
                import warnings

                warnings.warn(f"{tj} found but the `tokenizers` package is missing; using the byte-level fallback",
                              stacklevel=2)
    if vocab_size >= 256:
        return ByteTokenizer(vocab_size, bos_token_id, eos_token_ids)
    return None
