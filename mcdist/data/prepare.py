"""``mcdist data prepare``: turn text files into a token file (:mod:`mcdist.data.tokens`).

Inputs are documents, files or folders (a folder stands for every file under it that is not hidden, in sorted
order of their paths):

* a ``.jsonl`` file holds one document per line, the string under ``text_key`` (default ``"text"``),
* a ``.json`` file (records, or a list of them) and a ``.parquet`` file hold one document per record, the string
  under ``text_key``; they are read through Hugging Face ``datasets`` (``pip install datasets``), streaming,
* any other file is one document, read as UTF-8 (undecodable bytes are replaced, and counted).

``loader`` says who reads them: ``"builtin"`` (this module: ``.jsonl`` and text), ``"datasets"`` (every kind
through ``datasets.load_dataset(kind, data_files=[path], streaming=True)``: ``json``, ``parquet``, and ``text``
with one document per file), or ``"auto"`` (default: the built-in reader where it applies, ``datasets`` for
``.json`` and ``.parquet``). Both give the same documents where both apply (tested).

The demo corpus (``demo="stdlib"``) is the source of Python's own standard library, one document per ``.py``
file in sorted order of their paths (:func:`demo_inputs`): it needs no download, and the same Python version
gives the same tokens.

Documents are encoded in batches; ``workers > 1`` encodes them on that many processes, in order, so the file
does not depend on ``workers``.

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

import collections
import json
import multiprocessing
import os
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np

from mcdist.data.tokens import TokenWriter, dtype_for_vocab

BYTE_VOCAB_SIZE = 256
BYTE_EOS_ID = 0
COMMON_EOS_TOKENS = ("</s>", "<|endoftext|>", "<eos>", "[SEP]")
LOADERS = ("auto", "builtin", "datasets")
DEMOS = ("stdlib",)
# folders of the standard library that are not its sources (installed packages, the test suite with its
# deliberately malformed files, caches); _sysconfigdata* files describe the machine, not the library
STDLIB_SKIPPED_FOLDERS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
BATCH_DOCUMENTS = 256  # documents encoded together
BATCH_CHARACTERS = 1 << 22  # ... unless they hold more characters than this


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255)."""

    vocab_size = BYTE_VOCAB_SIZE
    eos_id: Optional[int] = BYTE_EOS_ID

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)  # [bytes]

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        return [self.encode(text) for text in texts]

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

    def encode_batch(self, texts: Sequence[str]) -> List[np.ndarray]:
        """The ids of each text; the Rust side spreads a batch over its thread pool."""
        return [np.asarray(encoding.ids, dtype=np.int64)
                for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

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


def input_kind(path: str) -> str:
    """``"jsonl"``, ``"json"``, ``"parquet"`` or ``"text"``, by the file's extension."""
    extension = os.path.splitext(path)[1].lower()
    return {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(extension, "text")


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """The files ``inputs`` name: a file as it is, a folder as every file under it whose path holds no hidden
    part (``.name``), in sorted order of their paths.

    Raises:
        FileNotFoundError: an input does not exist. ValueError: a folder holds no file.
    """
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = []
            for folder, subfolders, names in os.walk(path):
                subfolders[:] = [name for name in subfolders if not name.startswith(".")]
                found += [os.path.join(folder, name) for name in names if not name.startswith(".")]
            found = sorted(found, key=lambda item: os.path.relpath(item, path).split(os.sep))
            if not found:
                raise ValueError(f"input folder {path!r} holds no file; expected text, .jsonl, .json or .parquet "
                                 "files in it")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"input file {path!r} does not exist")
    return files


def stdlib_root() -> str:
    """The folder of Python's standard library sources (``sysconfig.get_paths()["stdlib"]``)."""
    return sysconfig.get_paths()["stdlib"]


def demo_inputs(name: str, root: Optional[str] = None) -> tuple[List[str], dict]:
    """The files of the demo corpus ``name`` and its description (stored in the header as ``source``).

    ``"stdlib"``: every ``.py`` file under ``root`` (default :func:`stdlib_root`), except those in the folders
    :data:`STDLIB_SKIPPED_FOLDERS`, hidden ones and ``_sysconfigdata*`` files, sorted by their path relative to
    ``root`` (one document each).
    """
    if name not in DEMOS:
        raise ValueError(f"demo = {name!r} is not a demo corpus; expected one of {', '.join(DEMOS)}")
    root = root or stdlib_root()
    if not os.path.isdir(root):
        raise FileNotFoundError(f"the standard library folder {root!r} does not exist")
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [sub for sub in subfolders if sub not in STDLIB_SKIPPED_FOLDERS and not sub.startswith(".")]
        found += [os.path.relpath(os.path.join(folder, item), root).split(os.sep) for item in names
                  if item.endswith(".py") and not item.startswith((".", "_sysconfigdata"))]
    if not found:
        raise ValueError(f"the standard library folder {root!r} holds no .py file")
    found.sort()
    files = [os.path.join(root, *parts) for parts in found]
    return files, {"demo": name, "root": root, "python": platform.python_version(), "files": len(files)}


def _import_datasets():
    try:
        import datasets
    except ImportError as error:
        raise ImportError("reading .json and .parquet inputs (or --loader datasets) needs the Hugging Face "
                          "`datasets` package, which is not installed; run `pip install datasets` (or "
                          "`pip install mcdist[data]`)") from error
    return datasets


@dataclass
class _Reader:
    loader: str = "auto"
    replaced_bytes: int = 0  # invalid UTF-8 sequences the built-in reader replaced
    replacement_characters: int = 0  # U+FFFD in text files read through datasets (replaced bytes among them)

    def documents(self, paths: Sequence[str], text_key: str) -> Iterator[str]:
        for path in paths:
            kind = input_kind(path)
            if self.loader == "datasets" or (self.loader == "auto" and kind in ("json", "parquet")):
                yield from self._through_datasets(path, kind, text_key)
            elif kind in ("json", "parquet"):
                raise ValueError(f"{path}: {kind} files are read through Hugging Face datasets; expected "
                                 "--loader auto or datasets")
            elif kind == "jsonl":
                yield from self._jsonl(path, text_key)
            else:
                yield self._text(path)

    @staticmethod
    def _jsonl(path: str, text_key: str) -> Iterator[str]:
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

    def _text(self, path: str) -> str:
        with open(path, "rb") as handle:
            raw = handle.read()
        text = raw.decode("utf-8", errors="replace")
        self.replaced_bytes += text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")  # invalid UTF-8
        return text

    def _through_datasets(self, path: str, kind: str, text_key: str) -> Iterator[str]:
        datasets = _import_datasets()
        builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "text": "text"}[kind]
        # a text file is one document, as the built-in reader takes it; invalid UTF-8 is replaced there too
        options = {"sample_by": "document", "encoding_errors": "replace"} if builder == "text" else {}
        key = "text" if builder == "text" else text_key
        try:
            records = iter(datasets.load_dataset(builder, data_files=[os.path.abspath(path)], split="train",
                                                 streaming=True, **options))
        except Exception as error:  # datasets raises many kinds (its own, pyarrow's, OSError) for unreadable input
            raise ValueError(f"{path}: datasets cannot open it as {builder} ({type(error).__name__}: {error})") \
                from error
        number = 0
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except Exception as error:
                raise ValueError(f"{path}: datasets cannot read it as {builder} after {number} records "
                                 f"({type(error).__name__}: {error})") from error
            number += 1
            text = record.get(key)
            if not isinstance(text, str):
                found = "no such field" if key not in record else f"a {type(text).__name__}"
                raise ValueError(f"{path}: record {number}: expected a string field {key!r}, found {found} (its "
                                 f"fields: {', '.join(sorted(record))}); set --text-key")
            if builder == "text":
                self.replacement_characters += text.count("\ufffd")
            yield text


def _batches(documents: Iterator[str]) -> Iterator[List[str]]:
    batch, characters = [], 0
    for text in documents:
        batch.append(text)
        characters += len(text)
        if len(batch) >= BATCH_DOCUMENTS or characters >= BATCH_CHARACTERS:
            yield batch
            batch, characters = [], 0
    if batch:
        yield batch


_WORKER_CODER = None


def _start_worker(tokenizer: str, eos_token: Optional[str]) -> None:
    global _WORKER_CODER
    os.environ["RAYON_NUM_THREADS"] = "1"  # one thread per worker process: the workers are the parallelism
    _WORKER_CODER = load_tokenizer(tokenizer, eos_token)


def _encode_in_worker(texts: List[str]) -> List[np.ndarray]:
    return _WORKER_CODER.encode_batch(texts)


def _encoded(batches: Iterator[List[str]], coder, workers: int, tokenizer: str,
             eos_token: Optional[str]) -> Iterator[List[np.ndarray]]:
    """The ids of each batch, in order: in this process, or on ``workers`` processes with at most
    ``2 · workers`` batches in flight (so a streamed corpus is never held whole)."""
    if workers == 1:
        for batch in batches:
            yield coder.encode_batch(batch)
        return
    # spawned, not forked: the tokenizers package refuses its thread pool in a fork of a process that used it
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_start_worker,
                                                   initargs=(tokenizer, eos_token)) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Progress:
    """Documents and tokens so far, on stderr: a tqdm bar when tqdm is installed, else a line every 10 s."""

    def __init__(self, enabled: bool, total: Optional[int], what: str):
        self.enabled, self.total, self.what = enabled, total, what
        self.documents = self.tokens = 0
        self._bar, self._last = None, time.monotonic()
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, unit=" doc", desc=what, file=sys.stderr, dynamic_ncols=True)

    def update(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(documents)
            self._bar.set_postfix_str(f"{self.tokens:,} tokens", refresh=False)
        elif time.monotonic() - self._last >= 10.0:
            self._last = time.monotonic()
            of = f" of {self.total:,}" if self.total is not None else ""
            print(f"{self.what}: {self.documents:,}{of} documents, {self.tokens:,} tokens", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _val_path(output: str) -> str:
    stem = output[:-len(".bin")] if output.endswith(".bin") else output
    return stem + ".val.bin"


def prepare_tokens(inputs: Sequence[str], output: str, *, tokenizer: str = "byte", eos_token: Optional[str] = None,
                   dtype: Optional[str] = None, val_fraction: float = 0.0, text_key: str = "text",
                   loader: str = "auto", workers: int = 1, progress: bool = False,
                   demo: Optional[str] = None) -> dict:
    """Tokenize ``inputs`` into the token file ``output`` (and ``<output stem>.val.bin`` with a validation split).

    Args:
        inputs: files or folders of text, ``.jsonl``, ``.json`` or ``.parquet`` (see the module docstring);
            empty with ``demo``.
        output: the token file to write (``<output>.docs`` holds its document boundaries, ``<output>.json`` its
            header).
        tokenizer: ``"byte"`` or a path to a ``tokenizer.json``.
        eos_token: the end-of-document token of a ``tokenizer.json`` (default: a common name, if present).
        dtype: ``"uint16"``, ``"uint32"`` or ``None`` (smallest that fits the vocabulary).
        val_fraction: share of documents, taken from the end, written to the validation file; in ``[0, 1)``.
        text_key: the field of a ``.jsonl``, ``.json`` or ``.parquet`` record that holds the text.
        loader: ``"auto"``, ``"builtin"`` or ``"datasets"`` (who reads the inputs; see the module docstring).
        workers: processes that encode (1: this one, where a ``tokenizer.json`` uses the Rust thread pool).
        progress: show documents and tokens so far on stderr.
        demo: ``"stdlib"``: tokenize the demo corpus (:func:`demo_inputs`) instead of ``inputs``.

    Returns:
        ``{"train": header, "val": header or None, "train_path", "val_path", "replaced_bytes",
        "replacement_characters", "files"}``.
    """
    if loader not in LOADERS:
        raise ValueError(f"loader = {loader!r} is invalid; expected one of {', '.join(LOADERS)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers = {workers!r} is invalid; expected a positive integer")
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction = {val_fraction!r} is invalid; expected a number in [0, 1)")
    source = None
    if demo is not None:
        if inputs:
            raise ValueError(f"demo = {demo!r} and input files were given together; expected one of them")
        files, source = demo_inputs(demo)
        loader = "builtin"  # .py files, each one document
    elif not inputs:
        raise ValueError("no input files; expected one or more text, .jsonl, .json or .parquet files or folders")
    else:
        files = expand_inputs(inputs)
    coder = load_tokenizer(tokenizer, eos_token)
    dtype = dtype or dtype_for_vocab(coder.vocab_size)
    reader = _Reader(loader)

    # documents are streamed; the validation split needs their count first, which a second pass provides
    num_documents = sum(1 for _ in _Reader(loader).documents(files, text_key)) if val_fraction > 0 else 0
    num_val = 0
    if val_fraction > 0:
        if num_documents < 2:
            raise ValueError(f"val_fraction = {val_fraction} needs at least 2 documents; the inputs hold "
                             f"{num_documents}")
        num_val = min(max(1, round(num_documents * val_fraction)), num_documents - 1)
    options = dict(vocab_size=coder.vocab_size, dtype=dtype, eos_id=coder.eos_id, tokenizer=coder.describe(),
                   source=source)
    writers: List[TokenWriter] = [TokenWriter(output, **options)]
    val_path = _val_path(output) if num_val else None
    if val_path:
        writers.append(TokenWriter(val_path, **options))
    bar = _Progress(progress, num_documents or (len(files) if all(input_kind(path) == "text" for path in files)
                                                else None), f"tokenizing {os.path.basename(output)}")
    try:
        index = 0
        for ids in _encoded(_batches(reader.documents(files, text_key)), coder, workers, tokenizer, eos_token):
            for document in ids:
                writer = writers[1] if val_path and index >= num_documents - num_val else writers[0]
                writer.write(document)
                writer.end_document()
                index += 1
            bar.update(len(ids), sum(int(document.size) for document in ids) + len(ids) * (coder.eos_id is not None))
        headers = [writer.close() for writer in writers]
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        bar.close()
    return {"train_path": output, "train": headers[0], "val_path": val_path,
            "val": headers[1] if val_path else None, "replaced_bytes": reader.replaced_bytes,
            "replacement_characters": reader.replacement_characters, "files": len(files)}


def decode_text(tokenizer, ids) -> str:
    """The text of ``ids`` with ``tokenizer`` (:func:`load_tokenizer`'s); an id past the tokenizer's vocabulary (a
    model may have more) reads as U+FFFD."""
    pieces, run = [], []
    for token in ids:
        if token < tokenizer.vocab_size:
            run.append(token)
        else:
            pieces += [tokenizer.decode(run), "\ufffd"]
            run = []
    return "".join(pieces + [tokenizer.decode(run)])
