"""``mcdist data prepare``: turn text files into a token file (:mod:`mcdist.data.tokens`).

Inputs are documents:

* a ``.jsonl`` file holds one document per line, the string under ``text_key`` (default ``"text"``),
* any other file is one document, read as UTF-8 (undecodable bytes are replaced, and counted).

Tokenizers:

* ``"byte"`` (built in): the UTF-8 bytes, ids 0..255, vocabulary 256; each document ends with id 0 (the NUL
  byte, which does not occur in text) as end-of-document.
* a path to a Hugging Face ``tokenizer.json``: encoded with the ``tokenizers`` package (``pip install
  tokenizers``), without added special tokens; each document ends with ``eos_token`` when given, else with the
  first of ``</s>``, ``<|endoftext|>``, ``<eos>``, ``[SEP]`` the vocabulary has, else with nothing.

With ``val_fraction > 0`` the last documents (at least one, never all) go to a second file, the validation
set (``train.val_data_path``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np

from mcdist.data.tokens import TokenWriter, dtype_for_vocab

BYTE_VOCAB_SIZE = 256
BYTE_EOS_ID = 0
COMMON_EOS_TOKENS = ("</s>", "<|endoftext|>", "<eos>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255)."""

    vocab_size = BYTE_VOCAB_SIZE
    eos_id: Optional[int] = BYTE_EOS_ID

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)  # [bytes]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"kind": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class HuggingFaceTokenizer:
    """A ``tokenizer.json`` through the ``tokenizers`` package (imported only when used)."""

    def __init__(self, path: str, eos_token: Optional[str] = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as error:
            raise ImportError(f"tokenizer {path!r} needs the Hugging Face `tokenizers` package, which is not "
                              "installed; run `pip install tokenizers` (or use --tokenizer byte)") from error
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
        try:
            self._tokenizer = Tokenizer.from_file(path)
        except Exception as error:  # the Rust side raises a plain Exception for a malformed file
            raise ValueError(f"{path}: not a valid tokenizer.json ({error})") from error
        self.path = path
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        if eos_token is not None:
            self.eos_id = self._tokenizer.token_to_id(eos_token)
            if self.eos_id is None:
                raise ValueError(f"eos token {eos_token!r} is not in the vocabulary of {path}")
        else:
            found = [self._tokenizer.token_to_id(name) for name in COMMON_EOS_TOKENS]
            self.eos_id = next((i for i in found if i is not None), None)
        self.eos_token = None if self.eos_id is None else self._tokenizer.id_to_token(self.eos_id)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def describe(self) -> dict:
        return {"kind": "huggingface", "path": os.path.abspath(self.path), "vocab_size": self.vocab_size,
                "eos_id": self.eos_id, "eos_token": self.eos_token}


def load_tokenizer(name: str, eos_token: Optional[str] = None):
    """``"byte"`` → :class:`ByteTokenizer`; a path → :class:`HuggingFaceTokenizer`."""
    if name == "byte":
        if eos_token is not None:
            raise ValueError("--eos-token applies to a tokenizer.json; the byte tokenizer ends documents with id 0")
        return ByteTokenizer()
    return HuggingFaceTokenizer(name, eos_token)


@dataclass
class _Reader:
    replaced_bytes: int = 0

    def documents(self, paths: Sequence[str], text_key: str) -> Iterator[str]:
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"input file {path!r} does not exist")
            if path.endswith(".jsonl"):
                with open(path, encoding="utf-8") as handle:
                    for number, line in enumerate(handle, 1):
                        if not line.strip():
                            continue
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as error:
                            raise ValueError(f"{path}:{number}: not a JSON line ({error})") from error
                        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                            raise ValueError(f"{path}:{number}: expected an object with a string field "
                                             f"{text_key!r} (set --text-key)")
                        yield record[text_key]
            else:
                with open(path, "rb") as handle:
                    raw = handle.read()
                text = raw.decode("utf-8", errors="replace")
                self.replaced_bytes += text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")  # invalid UTF-8
                yield text


def _val_path(output: str) -> str:
    stem = output[:-len(".bin")] if output.endswith(".bin") else output
    return stem + ".val.bin"


def prepare_tokens(inputs: Sequence[str], output: str, *, tokenizer: str = "byte", eos_token: Optional[str] = None,
                   dtype: Optional[str] = None, val_fraction: float = 0.0, text_key: str = "text") -> dict:
    """Tokenize ``inputs`` into the token file ``output`` (and ``<output stem>.val.bin`` with a validation split).

    Args:
        inputs: text or ``.jsonl`` files (see the module docstring).
        output: the token file to write (``<output>.json`` is its header).
        tokenizer: ``"byte"`` or a path to a ``tokenizer.json``.
        eos_token: the end-of-document token of a ``tokenizer.json`` (default: a common name, if present).
        dtype: ``"uint16"``, ``"uint32"`` or ``None`` (smallest that fits the vocabulary).
        val_fraction: share of documents, taken from the end, written to the validation file; in ``[0, 1)``.
        text_key: the field of a ``.jsonl`` record that holds the text.

    Returns:
        ``{"train": header, "val": header or None, "train_path", "val_path", "replaced_bytes"}``.
    """
    if not inputs:
        raise ValueError("no input files; expected one or more text or .jsonl files")
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction = {val_fraction!r} is invalid; expected a number in [0, 1)")
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file {path!r} does not exist")
    coder = load_tokenizer(tokenizer, eos_token)
    dtype = dtype or dtype_for_vocab(coder.vocab_size)
    reader = _Reader()

    # documents are streamed; the validation split needs their count first, which a second pass provides
    num_documents = sum(1 for _ in _Reader().documents(inputs, text_key)) if val_fraction > 0 else 0
    num_val = 0
    if val_fraction > 0:
        if num_documents < 2:
            raise ValueError(f"val_fraction = {val_fraction} needs at least 2 documents; the inputs hold "
                             f"{num_documents}")
        num_val = min(max(1, round(num_documents * val_fraction)), num_documents - 1)
    writers: List[TokenWriter] = [TokenWriter(output, vocab_size=coder.vocab_size, dtype=dtype,
                                              eos_id=coder.eos_id, tokenizer=coder.describe())]
    val_path = _val_path(output) if num_val else None
    if val_path:
        writers.append(TokenWriter(val_path, vocab_size=coder.vocab_size, dtype=dtype, eos_id=coder.eos_id,
                                   tokenizer=coder.describe()))
    try:
        for index, text in enumerate(reader.documents(inputs, text_key)):
            writer = writers[1] if val_path and index >= num_documents - num_val else writers[0]
            writer.write(coder.encode(text))
            writer.end_document()
        headers = [writer.close() for writer in writers]
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    return {"train_path": output, "train": headers[0], "val_path": val_path,
            "val": headers[1] if val_path else None, "replaced_bytes": reader.replaced_bytes}
