"""Pre-tokenized token files: raw little-endian uint16/uint32 ids, memory-mapped, with a JSON sidecar.

A token file is three files side by side:

* ``<path>``: the token ids, one after the other, as little-endian ``uint16`` (vocabularies up to 65,536 ids)
  or ``uint32``; documents are concatenated, each followed by ``eos_id`` when the tokenizer has one,
* ``<path>.docs``: the document boundaries, little-endian ``int64``, in the ``cu_seqlens`` convention of
  flash-linear-attention's varlen API: ``[0, end_0, end_1, ..., num_tokens]`` (document ``i`` is tokens
  ``[end_(i-1), end_i)``, its EOS included; a run of tokens after the last document counts as one more),
* ``<path>.json``: the header, e.g.
  ``{"format": "mcdist-tokens", "version": 1, "dtype": "uint16", "num_tokens": 1234, "vocab_size": 256,
  "eos_id": 0, "num_documents": 3, "tokenizer": {"kind": "byte"},
  "boundaries": {"file": "train.bin.docs", "dtype": "int64", "count": 4}}``.

Files written before the boundaries existed have no ``boundaries`` entry; their documents are found from the
EOS ids (:meth:`TokenFile.boundaries`). :class:`TokenWriter` writes all three atomically (temporary names,
then renames: the ids first, the boundaries next, the header last, so a header always describes complete
files). :class:`TokenFile` opens them with ``numpy.memmap``: reading a
slice touches only the pages of that slice, which is what lets each sequence-parallel rank read just its own
piece of a million-token window (:meth:`TokenFile.read_window`).

Training windows: a file of ``N`` tokens holds ``W = (N - 1) // L`` non-overlapping windows of ``L`` inputs
(window ``w`` reads tokens ``[w·L, (w+1)·L + 1)``: ``L`` inputs and, shifted by one, their ``L`` labels).
:func:`window_for_sample` maps the global sample index ``i`` to a window: epoch ``i // W`` visits every window
once, in an order drawn from ``(seed, epoch)``. So a sample is a pure function of the seed and its index, which
makes resuming exact and the data independent of how many ranks read it.
"""

from __future__ import annotations

import json
import os
import uuid
from functools import lru_cache
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

FORMAT = "mcdist-tokens"
FORMAT_VERSION = 1
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
SIDECAR_SUFFIX = ".json"
BOUNDARIES_SUFFIX = ".docs"
BOUNDARY_DTYPE = np.dtype("<i8")
_BOUNDARY_BUFFER = 1 << 16  # boundaries held in memory before they are appended to the temporary file


class TokenFileError(ValueError):
    """A token file or its header is missing, corrupt, or does not fit what it is used for."""


def sidecar_path(path: str | os.PathLike) -> str:
    """The header file of the token file ``path``: ``<path>.json``."""
    return os.fspath(path) + SIDECAR_SUFFIX


def boundaries_path(path: str | os.PathLike) -> str:
    """The document boundaries file of the token file ``path``: ``<path>.docs``."""
    return os.fspath(path) + BOUNDARIES_SUFFIX


def dtype_for_vocab(vocab_size: int) -> str:
    """``"uint16"`` when every id of a ``vocab_size`` vocabulary fits in 16 bits, else ``"uint32"``."""
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size = {vocab_size!r} is invalid; expected a positive integer")
    if vocab_size > 2 ** 32:
        raise ValueError(f"vocab_size = {vocab_size} does not fit uint32 token ids; expected at most 2**32")
    return "uint16" if vocab_size <= 2 ** 16 else "uint32"


class TokenWriter:
    """Stream token ids into a new token file; nothing appears under ``path`` until :meth:`close`.

    Args:
        path: the token file to write (its boundaries go to ``<path>.docs``, its header to ``<path>.json``); an
            existing file of that name is replaced.
        vocab_size: ids must lie in ``[0, vocab_size)``.
        dtype: ``"uint16"``, ``"uint32"`` or ``None`` (the smallest that fits ``vocab_size``).
        eos_id: appended after each document by :meth:`end_document`; ``None`` = documents are not separated.
        tokenizer: a JSON-able description of the tokenizer, stored in the header.
        source: a JSON-able description of where the text came from (``mcdist data prepare --demo``), stored in
            the header when given.

    Use as a context manager: an exception inside the ``with`` removes the temporary file and writes nothing.
    """

    def __init__(self, path: str | os.PathLike, *, vocab_size: int, dtype: Optional[str] = None,
                 eos_id: Optional[int] = None, tokenizer: Optional[dict] = None, source: Optional[dict] = None):
        self.path = os.fspath(path)
        self.dtype = dtype or dtype_for_vocab(vocab_size)
        if self.dtype not in TOKEN_DTYPES:
            raise ValueError(f"dtype = {self.dtype!r} is invalid; expected one of {sorted(TOKEN_DTYPES)}")
        if vocab_size > np.iinfo(TOKEN_DTYPES[self.dtype]).max + 1:
            raise ValueError(f"vocab_size = {vocab_size} does not fit dtype {self.dtype}; expected uint32")
        if eos_id is not None and not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id = {eos_id} is outside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.tokenizer = tokenizer or {}
        self.source = source
        self.num_tokens = 0
        self.num_documents = 0
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tmp = os.path.join(folder, f".{os.path.basename(self.path)}.tmp-{tag}")
        self._tmp_header = self._tmp + SIDECAR_SUFFIX
        self._tmp_boundaries = self._tmp + BOUNDARIES_SUFFIX
        self._handle = open(self._tmp, "wb")
        self._boundary_handle = open(self._tmp_boundaries, "wb")
        self._ends = [0]  # boundaries not yet appended to the temporary file
        self._last_end = 0
        self._num_boundaries = 0
        self._closed = False

    def write(self, ids: Iterable[int] | np.ndarray | torch.Tensor) -> None:
        """Append ``ids`` (any integer sequence) after checking they lie in the vocabulary."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        array = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).reshape(-1)
        if array.size == 0:
            return
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size}) of {self.path}")
        self._handle.write(array.astype(TOKEN_DTYPES[self.dtype]).tobytes())
        self.num_tokens += int(array.size)

    def end_document(self) -> None:
        """Close one document: append ``eos_id`` (when there is one), count it and record where it ends."""
        if self.eos_id is not None:
            self.write([self.eos_id])
        self.num_documents += 1
        self._add_boundary(self.num_tokens)

    def _add_boundary(self, end: int) -> None:
        self._ends.append(end)
        self._last_end = end
        if len(self._ends) >= _BOUNDARY_BUFFER:
            self._flush_boundaries()

    def _flush_boundaries(self) -> None:
        if self._ends:
            self._boundary_handle.write(np.asarray(self._ends, dtype=BOUNDARY_DTYPE).tobytes())
            self._num_boundaries += len(self._ends)
            self._ends = []

    def header(self) -> dict:
        count = self._num_boundaries + len(self._ends) + (self.num_tokens != self._last_end)
        header = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": self.dtype, "num_tokens": self.num_tokens,
                  "vocab_size": self.vocab_size, "eos_id": self.eos_id, "num_documents": self.num_documents,
                  "tokenizer": self.tokenizer,
                  "boundaries": {"file": os.path.basename(boundaries_path(self.path)),
                                 "dtype": BOUNDARY_DTYPE.name, "count": count}}
        if self.source is not None:
            header["source"] = self.source
        return header

    def close(self) -> dict:
        """Finish the files: fsync, rename the ids into place, then the boundaries, then the header. Returns the
        header."""
        if self._closed:
            raise RuntimeError(f"TokenWriter for {self.path} is already closed")
        if self.num_tokens != self._last_end:  # tokens after the last document: one more, unterminated
            self._add_boundary(self.num_tokens)
        self._flush_boundaries()
        for handle in (self._handle, self._boundary_handle):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        header = self.header()
        with open(self._tmp_header, "w", encoding="utf-8") as out:
            out.write(json.dumps(header, indent=2, sort_keys=True) + "\n")
            out.flush()
            os.fsync(out.fileno())
        # a stale header would describe the new ids wrongly while they are renamed: remove it first
        if os.path.exists(sidecar_path(self.path)):
            os.unlink(sidecar_path(self.path))
        os.replace(self._tmp, self.path)
        os.replace(self._tmp_boundaries, boundaries_path(self.path))
        os.replace(self._tmp_header, sidecar_path(self.path))
        _fsync_folder(self.path)
        self._closed = True
        return header

    def abort(self) -> None:
        """Drop everything written so far. Before :meth:`close` started renaming, the target files are left as
        they were; a failure between its renames leaves a token file without a header, which readers refuse."""
        if not self._closed:
            self._handle.close()
            self._boundary_handle.close()
            self._closed = True
        for leftover in (self._tmp, self._tmp_boundaries, self._tmp_header):
            if os.path.exists(leftover):
                os.unlink(leftover)

    def __enter__(self) -> "TokenWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def _fsync_folder(path: str) -> None:
    """Make the renames into the folder of ``path`` durable (where the platform allows opening a folder)."""
    try:
        handle = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the renames themselves are atomic
    finally:
        os.close(handle)


def write_tokens(path: str | os.PathLike, tokens: Sequence[int] | np.ndarray | torch.Tensor, *, vocab_size: int,
                 dtype: Optional[str] = None, eos_id: Optional[int] = None,
                 tokenizer: Optional[dict] = None) -> dict:
    """Write ``tokens`` (one flat sequence) as a token file; returns its header. See :class:`TokenWriter`."""
    with TokenWriter(path, vocab_size=vocab_size, dtype=dtype, eos_id=eos_id, tokenizer=tokenizer) as writer:
        writer.write(tokens)
    return writer.header()


def read_header(path: str | os.PathLike) -> dict:
    """Read and check ``<path>.json`` against the size of ``path``; raises :class:`TokenFileError`."""
    path = os.fspath(path)
    header_path = sidecar_path(path)
    if not os.path.isfile(path):
        raise TokenFileError(f"token file {path!r} does not exist (write one with `mcdist data prepare`)")
    if not os.path.isfile(header_path):
        raise TokenFileError(f"token file {path!r} has no header {header_path!r}; expected the JSON file that "
                             "`mcdist data prepare` writes beside it")
    try:
        with open(header_path, encoding="utf-8") as handle:
            header = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenFileError(f"{header_path}: unreadable header ({error})") from error
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TokenFileError(f"{header_path}: not an mcdist token header (expected \"format\": \"{FORMAT}\")")
    version = header.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise TokenFileError(f"{header_path}: version {version!r} is not supported; expected <= {FORMAT_VERSION}")
    dtype = header.get("dtype")
    if dtype not in TOKEN_DTYPES:
        raise TokenFileError(f"{header_path}: dtype {dtype!r} is invalid; expected one of {sorted(TOKEN_DTYPES)}")
    for key in ("num_tokens", "vocab_size"):
        if not isinstance(header.get(key), int) or header[key] < 0:
            raise TokenFileError(f"{header_path}: {key} = {header.get(key)!r} is invalid; expected an integer >= 0")
    expected = header["num_tokens"] * TOKEN_DTYPES[dtype].itemsize
    actual = os.path.getsize(path)
    if actual != expected:
        raise TokenFileError(f"{path}: {actual} bytes, but its header says {header['num_tokens']} {dtype} tokens = "
                             f"{expected} bytes (truncated, or the two files come from different writes)")
    if "boundaries" in header:
        _check_boundaries_entry(path, header_path, header["boundaries"])
    return header


def _check_boundaries_entry(path: str, header_path: str, entry) -> None:
    if (not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or entry.get("dtype") != "int64"
            or not isinstance(entry.get("count"), int) or entry["count"] < 1):
        raise TokenFileError(f"{header_path}: boundaries = {entry!r} is invalid; expected {{\"file\": name, "
                             "\"dtype\": \"int64\", \"count\": entries >= 1}")
    docs = os.path.join(os.path.dirname(os.path.abspath(path)), entry["file"])
    if not os.path.isfile(docs):
        raise TokenFileError(f"{path}: its boundaries file {docs!r} (named in {header_path}) does not exist")
    expected = entry["count"] * BOUNDARY_DTYPE.itemsize
    if os.path.getsize(docs) != expected:
        raise TokenFileError(f"{docs}: {os.path.getsize(docs)} bytes, but {header_path} says {entry['count']} int64 "
                             f"boundaries = {expected} bytes (truncated, or the files come from different writes)")


class TokenFile:
    """A token file opened read-only through a memory map.

    Args:
        path: the token file (its header is ``<path>.json``).
        record_reads: keep the ``(start, length)`` of every read in :attr:`reads` (tests use it to check that a
            rank reads only its own slice).
    """

    def __init__(self, path: str | os.PathLike, *, record_reads: bool = False):
        self.path = os.fspath(path)
        self.header = read_header(self.path)
        self.num_tokens: int = self.header["num_tokens"]
        self.vocab_size: int = self.header["vocab_size"]
        self.eos_id: Optional[int] = self.header.get("eos_id")
        self.dtype: str = self.header["dtype"]
        entry = self.header.get("boundaries")
        self.boundaries_path: Optional[str] = (
            None if entry is None else os.path.join(os.path.dirname(os.path.abspath(self.path)), entry["file"]))
        self._memmap = None
        self._boundaries = None
        self.reads: Optional[list] = [] if record_reads else None

    def _tokens(self) -> np.ndarray:
        if self._memmap is None:  # opened on first use, so a TokenFile pickles cheaply into worker processes
            if self.num_tokens == 0:
                self._memmap = np.zeros(0, dtype=TOKEN_DTYPES[self.dtype])
            else:
                self._memmap = np.memmap(self.path, dtype=TOKEN_DTYPES[self.dtype], mode="r",
                                         shape=(self.num_tokens,))
        return self._memmap

    def __len__(self) -> int:
        return self.num_tokens

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_memmap"] = None
        state["_boundaries"] = None
        return state

    @property
    def boundaries_source(self) -> Optional[str]:
        """Where the document boundaries come from: ``"file"`` (``<path>.docs``), ``"eos"`` (a file written
        before boundaries files existed: the EOS ids), or ``None`` (neither: the documents are unknown)."""
        if self.boundaries_path is not None:
            return "file"
        return "eos" if self.eos_id is not None else None

    def boundaries(self) -> np.ndarray:
        """The document boundaries of the whole file, int64 ``[num_documents + 1]``: ``[0, end_0, ...,
        num_tokens]`` (the ``cu_seqlens`` convention), from ``<path>.docs``, else from the EOS ids.

        Raises:
            TokenFileError: the boundaries file is corrupt (not ``0``-first, ``num_tokens``-last, non-decreasing),
                or the file has neither a boundaries file nor an ``eos_id``.
        """
        if self._boundaries is None:
            source = self.boundaries_source
            if source is None:
                raise TokenFileError(f"{self.path}: its documents are unknown (no boundaries file and no eos_id in "
                                     "its header); expected a token file written by `mcdist data prepare`")
            if source == "file":
                ends = np.memmap(self.boundaries_path, dtype=BOUNDARY_DTYPE, mode="r")
                if ends[0] != 0 or ends[-1] != self.num_tokens or (ends.size > 1 and np.any(np.diff(ends) < 0)):
                    raise TokenFileError(f"{self.boundaries_path}: not the boundaries of {self.path}; expected "
                                         f"non-decreasing offsets from 0 to num_tokens = {self.num_tokens}")
            else:
                ends = np.flatnonzero(self._tokens() == self.eos_id).astype(np.int64) + 1  # [documents]
                tail = [self.num_tokens] if ends.size == 0 or ends[-1] != self.num_tokens else []
                ends = np.concatenate([np.zeros(1, dtype=np.int64), ends, np.asarray(tail, dtype=np.int64)])
            self._boundaries = ends
        return self._boundaries

    def read_boundaries(self, start: int, length: int) -> torch.Tensor:
        """The document boundaries of tokens ``[start, start + length)`` relative to ``start``: int32
        ``[k + 1]``, ``[0, ..., length]``, the ``cu_seqlens`` of the ``k`` documents (or parts of documents)
        that slice holds, as flash-linear-attention's varlen API takes them. Empty documents do not appear.

        Reads only the boundaries inside the slice (a binary search in ``<path>.docs``), or, for a file without
        one, the slice's own tokens (a document starts after each EOS).
        """
        if start < 0 or length <= 0 or start + length > self.num_tokens:
            raise IndexError(f"{self.path}: tokens [{start}, {start + length}) are outside [0, {self.num_tokens}) "
                             "or empty")
        if length >= 2 ** 31:
            raise ValueError(f"length = {length} does not fit int32 cu_seqlens; expected fewer than 2**31 tokens")
        if self.boundaries_source == "eos":
            tokens = self._tokens()[start:start + length - 1]  # an EOS at the slice's last token starts nothing
            inside = np.flatnonzero(tokens == self.eos_id).astype(np.int64) + 1  # [k - 1], relative to start
        else:
            ends = self.boundaries()
            first = int(np.searchsorted(ends, start, side="right"))
            last = int(np.searchsorted(ends, start + length, side="left"))
            inside = np.unique(np.asarray(ends[first:last], dtype=np.int64)) - start  # [k - 1]
        values = np.concatenate([np.zeros(1, dtype=np.int64), inside, np.asarray([length], dtype=np.int64)])
        return torch.from_numpy(values.astype(np.int32))  # [k + 1]

    def window_boundaries(self, window: int, seq_len: int) -> torch.Tensor:
        """:meth:`read_boundaries` of the inputs of window ``window`` (tokens ``[window · L, (window + 1) · L)``),
        the ``cu_seqlens`` of the sequence :meth:`read_window` returns."""
        count = self.num_windows(seq_len)
        if not 0 <= window < count:
            raise IndexError(f"{self.path}: window {window} is outside [0, {count}) for seq_len {seq_len}")
        return self.read_boundaries(window * seq_len, seq_len)

    def read(self, start: int, length: int) -> torch.Tensor:
        """Tokens ``[start, start + length)`` as an int64 tensor ``[length]`` (only those bytes are read)."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"{self.path}: tokens [{start}, {start + length}) are outside [0, {self.num_tokens})")
        if self.reads is not None:
            self.reads.append((start, length))
        return torch.from_numpy(np.array(self._tokens()[start:start + length], dtype=np.int64))  # [length]

    def num_windows(self, seq_len: int) -> int:
        """How many non-overlapping windows of ``seq_len`` inputs (+1 label token) the file holds."""
        return max(self.num_tokens - 1, 0) // seq_len

    def read_window(self, window: int, seq_len: int,
                    pieces: Optional[Sequence[tuple]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token labels of window ``window``, or only of the given ``pieces`` of it.

        Args:
            window: window index in ``[0, num_windows(seq_len))``.
            seq_len: the window's length L.
            pieces: ``(start, length)`` offsets inside the window, in the order to concatenate them (a rank's
                ``mcdist.parallel.layout.rank_pieces``); ``None`` = the whole window. Each piece reads its
                ``length`` tokens plus the one after it (the label of its last position) and nothing else.

        Returns:
            ``(input_ids, labels)``, int64 ``[sum of lengths]`` each; ``labels[j]`` is the token after
            ``input_ids[j]``.
        """
        count = self.num_windows(seq_len)
        if not 0 <= window < count:
            raise IndexError(f"{self.path}: window {window} is outside [0, {count}) for seq_len {seq_len}")
        return self.read_sequence(window * seq_len, seq_len, pieces)

    def read_sequence(self, base: int, seq_len: int,
                      pieces: Optional[Sequence[tuple]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`read_window` of the ``seq_len`` inputs starting at token ``base`` (any offset: the first token
        of a document, for evaluation); tokens ``[base, base + seq_len + 1)`` must lie in the file."""
        if base < 0 or base + seq_len + 1 > self.num_tokens:
            raise IndexError(f"{self.path}: tokens [{base}, {base + seq_len + 1}) are outside [0, {self.num_tokens})")
        ids, labels = [], []
        for start, length in (pieces if pieces is not None else [(0, seq_len)]):
            if start < 0 or length <= 0 or start + length > seq_len:
                raise ValueError(f"piece ({start}, {length}) lies outside a window of {seq_len} tokens")
            chunk = self.read(base + start, length + 1)  # [length + 1]
            ids.append(chunk[:-1])
            labels.append(chunk[1:])
        return torch.cat(ids), torch.cat(labels)


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_windows: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2 ** 63))
    return torch.randperm(num_windows, generator=generator)  # [W]


def window_for_sample(sample: int, num_windows: int, seed: int, *, shuffle: bool = True) -> int:
    """The window that global sample ``sample`` reads: epoch ``sample // W`` in an order drawn from the seed.

    ``shuffle=False`` reads the windows in file order (validation).
    """
    if num_windows <= 0:
        raise ValueError("the token file holds no complete window; expected more than seq_len tokens")
    if sample < 0:
        raise ValueError(f"sample = {sample} is invalid; expected an index >= 0")
    epoch, offset = divmod(sample, num_windows)
    if not shuffle:
        return offset
    return int(_epoch_order(seed, epoch, num_windows)[offset])
