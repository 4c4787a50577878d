"""Tokenizers: the built-in byte tokenizer (no download), Hugging Face `tokenizers` JSON files, and Hugging Face
model folders (their tokenizer.json with the BOS/EOS ids of their config.json).

All expose the same small surface (`name`, `fingerprint`, `vocab_size`, `eos_id`, `bos_id`, `encode`, `decode`),
which is all that shard writing, evaluation (bits per byte) and the model's vocabulary size need. `encode` returns
the content ids only; `document_ids` adds the document's BOS/EOS, so every domain separates documents the same
way. `fingerprint` identifies the ids a tokenizer produces: training refuses data whose tokenizer is not the
model's. `write_hf_tokenizer` writes the files `transformers.AutoTokenizer` loads, for an exported model.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
from typing import Protocol, Sequence

import numpy as np

EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message says how to fix it."""


class Tokenizer(Protocol):
    name: str
    fingerprint: str
    vocab_size: int
    eos_id: int
    bos_id: int | None

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255 and EOS is 256: any text, no download, and bits per byte is exact."""

    name = "byte"
    fingerprint = "byte"
    vocab_size = 257
    eos_id = 256
    bos_id = None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path} is not readable JSON ({e}): re-download or re-save the model") from None


def _token_text(value: object) -> str | None:
    """A tokenizer_config.json special token: a string, or {"content": str} (AddedToken)."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (e.g. a Llama or GPT-NeoX `tokenizer.json`), or a model folder.

    For a folder, EOS is the id of config.json's `eos_token_id` (the first of a list), else generation_config.json's,
    else tokenizer_config.json's `eos_token`, else the first of EOS_TOKENS the vocabulary has. BOS is the
    folder's `bos_token_id` only when the tokenizer itself puts it first (Llama and Mistral do; Qwen's config
    names a BOS its tokenizer never adds), so the data starts documents as the model saw them."""

    def __init__(self, path: str | pathlib.Path):
        path = pathlib.Path(path)
        folder = path if path.is_dir() else None
        if folder is not None:
            path = folder / "tokenizer.json"
            if not path.is_file():
                raise TokenizerError(f"tokenizer folder {str(folder)!r} has no tokenizer.json: pass a Hugging Face "
                                     "model folder that has one, a tokenizer.json path, or 'byte'")
        # The file first: a typo in the path is the likelier mistake, and installing a package would not fix it.
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {str(path)!r} does not exist: pass 'byte', a tokenizer.json path or "
                                 "a Hugging Face model folder")
        try:
            import tokenizers  # optional: only needed for non-byte vocabularies
        except ImportError as e:
            raise TokenizerError(
                f"tokenizer {str(path)!r} needs the Hugging Face tokenizers package: pip install tokenizers") from e
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
            raise TokenizerError(f"cannot load tokenizer {str(path)!r} ({e}): is it a tokenizers JSON file?") from e
        self.name = str(folder.resolve()) if folder is not None else str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        bos, eos = self._folder_ids(folder) if folder is not None else (None, None)
        eos = eos if eos is not None else self._special_id(EOS_TOKENS)
        if eos is None:
            raise TokenizerError(
                f"tokenizer {self.name!r} has none of the EOS tokens {list(EOS_TOKENS)}; documents must be "
                "separated by EOS: add one of them as a special token")
        self.eos_id: int = eos
        if folder is None:
            self.bos_id: int | None = self._special_id(BOS_TOKENS)
        else:
            first = self._tok.encode("a", add_special_tokens=True).ids[:1]
            self.bos_id = bos if bos is not None and first == [bos] else None
        for label, special in (("EOS", self.eos_id), ("BOS", self.bos_id)):
            if special is not None and not 0 <= special < self.vocab_size:
                raise TokenizerError(f"tokenizer {self.name!r}: its {label} id {special} is outside its "
                                     f"{self.vocab_size} ids; check the folder's config.json")
        digest = hashlib.sha256(path.read_bytes())
        digest.update(f"|bos={self.bos_id}|eos={self.eos_id}".encode())
        self.fingerprint = digest.hexdigest()[:16]

    def _folder_ids(self, folder: pathlib.Path) -> tuple[int | None, int | None]:
        """(bos, eos) ids from a model folder's config.json, generation_config.json, then tokenizer_config.json."""
        found: dict[str, int | None] = {"bos": None, "eos": None}
        for name in ("config.json", "generation_config.json"):
            config = _json(folder / name)
            for key in found:
                value = config.get(f"{key}_token_id")
                if isinstance(value, list):
                    value = value[0] if value else None
                if found[key] is None and isinstance(value, int):
                    found[key] = value
        config = _json(folder / "tokenizer_config.json")
        for key in found:
            text = _token_text(config.get(f"{key}_token"))
            if found[key] is None and text is not None:
                found[key] = self._tok.token_to_id(text)
        return found["bos"], found["eos"]

    def _special_id(self, candidates: Sequence[str]) -> int | None:
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        return None

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._tok.id_to_token(token_id)

    def encode(self, text: str) -> np.ndarray:
        # No special tokens here: document_ids adds BOS/EOS once, the same way for every tokenizer.
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)


def load_tokenizer(spec: str) -> Tokenizer:
    """"byte" for the built-in byte tokenizer, otherwise a Hugging Face tokenizer.json or model folder."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def document_ids(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """One document as stored in a shard: [BOS] + tokens + [EOS] (BOS only where the tokenizer has one)."""
    body = tokenizer.encode(text).astype(np.int64)
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return np.concatenate([np.asarray(head, np.int64), body, np.asarray([tokenizer.eos_id], np.int64)])


# ----------------------------------------------------------------------------------------------------------
# Tokenizer files for an exported model.
# ----------------------------------------------------------------------------------------------------------
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def _byte_characters() -> list[str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's alphabet), indexed by byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer_json() -> dict:
    """A `tokenizers` JSON whose ids are ByteTokenizer's: byte b is id b, "<|endoftext|>" is 256.

    A BPE model with no merges over the 256 byte-level characters, behind a ByteLevel pre-tokenizer without
    its split regex: every byte becomes its own token, whose id is the byte's value."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    eos = {"id": ByteTokenizer.eos_id, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
           "rstrip": False, "normalized": False, "special": True}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": {c: b for b, c in enumerate(_byte_characters())}, "merges": []}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [eos], "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level, "model": model}


def write_hf_tokenizer(spec: str, out_dir: str | pathlib.Path) -> list[str]:
    """Write the tokenizer files of `spec` ("byte", a tokenizer.json, or a Hugging Face model folder) into
    `out_dir`, so `transformers.AutoTokenizer.from_pretrained(out_dir)` gives the same ids; returns the names."""
    out = pathlib.Path(out_dir)
    tok = load_tokenizer(spec)
    source = pathlib.Path(spec)
    if spec == "byte":
        (out / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json(), ensure_ascii=False) + "\n")
        bos, eos = None, "<|endoftext|>"
    elif source.is_dir():
        written = [n for n in _TOKENIZER_FILES if (source / n).is_file()]
        for name in written:
            shutil.copyfile(source / name, out / name)
        if "tokenizer_config.json" in written:
            return written
        bos, eos = tok.token(tok.bos_id), tok.token(tok.eos_id)
    else:
        shutil.copyfile(source, out / "tokenizer.json")
        bos, eos = tok.token(tok.bos_id), tok.token(tok.eos_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos,
              "add_bos_token": bos is not None, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]
