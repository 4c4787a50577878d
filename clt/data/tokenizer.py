"""Tokenizers: the built-in byte tokenizer (no download) and Hugging Face `tokenizers` JSON files.

Both expose the same small surface (`name`, `vocab_size`, `eos_id`, `bos_id`, `encode`, `decode`), which is
all that shard writing, evaluation (bits per byte) and the model's vocabulary size need. `encode` returns the
content ids only; `document_ids` adds the document's BOS/EOS, so every domain separates documents the same way.
"""

from __future__ import annotations

import pathlib
from typing import Protocol, Sequence

import numpy as np

EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message says how to fix it."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int
    bos_id: int | None

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255 and EOS is 256: any text, no download, and bits per byte is exact."""

    name = "byte"
    vocab_size = 257
    eos_id = 256
    bos_id = None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (e.g. a Llama or GPT-NeoX `tokenizer.json`)."""

    def __init__(self, path: str | pathlib.Path):
        path = pathlib.Path(path)
        # The file first: a typo in the path is the likelier mistake, and installing a package would not fix it.
        if not path.is_file():
            problem = "is a folder" if path.is_dir() else "does not exist"
            raise TokenizerError(f"tokenizer file {str(path)!r} {problem}: pass 'byte' or a tokenizer.json path")
        try:
            import tokenizers  # optional: only needed for non-byte vocabularies
        except ImportError as e:
            raise TokenizerError(
                f"tokenizer {str(path)!r} needs the Hugging Face tokenizers package: pip install tokenizers") from e
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
            raise TokenizerError(f"cannot load tokenizer {str(path)!r} ({e}): is it a tokenizers JSON file?") from e
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = self._special_id(EOS_TOKENS)
        if eos is None:
            raise TokenizerError(
                f"tokenizer {self.name!r} has none of the EOS tokens {list(EOS_TOKENS)}; documents must be "
                "separated by EOS: add one of them as a special token")
        self.eos_id: int = eos
        self.bos_id: int | None = self._special_id(BOS_TOKENS)

    def _special_id(self, candidates: Sequence[str]) -> int | None:
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        return None

    def encode(self, text: str) -> np.ndarray:
        # No special tokens here: document_ids adds BOS/EOS once, the same way for every tokenizer.
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)


def load_tokenizer(spec: str) -> Tokenizer:
    """"byte" for the built-in byte tokenizer, otherwise the path of a Hugging Face tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def document_ids(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """One document as stored in a shard: [BOS] + tokens + [EOS] (BOS only where the tokenizer has one)."""
    body = tokenizer.encode(text).astype(np.int64)
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return np.concatenate([np.asarray(head, np.int64), body, np.asarray([tokenizer.eos_id], np.int64)])
