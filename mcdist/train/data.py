"""The data of one rank of a run: its dp rows and its sp pieces of every training and evaluation batch.

Training sample ``i`` of a synthetic task (mqar, passkey) is a pure function of ``(train.seed, i)``
(:func:`sample_seed`), so any ``dp × sp`` layout trains on the same global batches; evaluation draws the same
``eval_batches`` batches every time from one generator seeded with ``train.seed + EVAL_SEED_OFFSET``, never the
training batches. docs/training.md describes the data of each task.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from mcdist.config import RunConfig
from mcdist.data.mqar import make_mqar_batch
from mcdist.data.passkey import make_passkey_batch
from mcdist.data.rows import mqar_row, passkey_row
from mcdist.data.tokens import TokenFile, window_for_sample
from mcdist.packing import cu_seqlens_of_rows
from mcdist.parallel.layout import rank_pieces, shard_sequence
from mcdist.parallel.mesh import Mesh

__all__ = ["EVAL_SEED_OFFSET", "TRAIN_SPLIT", "RankData", "sample_seed"]

TRAIN_SPLIT = 0  # the split of training samples in sample_seed
EVAL_SEED_OFFSET = 1_000_003  # the evaluation generator's seed is train.seed + this
_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, split: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of ``split``: splitmix64 of the three, so nearby indices decorrelate."""
    value = (seed * 0x9E3779B97F4A7C15 + split * 0xD1B54A32D192ED03 + index) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (value ^ (value >> 31)) & ((1 << 63) - 1)


class RankData:
    """The micro-batches one rank trains and evaluates on: its dp rows, and its sp pieces of each row.

    Args:
        run_config: the run (task, sizes, seed, parallel layout).
        mesh: this rank's place in the dp × sp mesh.
        record_reads: token files record every read (tests check that a rank reads only its slice).

    Synthetic tasks (mqar, passkey) draw each training sample from its own seed :func:`sample_seed`
    ``(seed, TRAIN_SPLIT, sample)``, and only this rank's pieces of it (:mod:`mcdist.data.rows`); evaluation draws
    ``eval_batches`` whole batches from one generator seeded with ``seed + EVAL_SEED_OFFSET`` (the batches
    ``mcdist eval`` scores). Token files: sample ``i`` reads window ``window_for_sample(i)`` (every window once
    per epoch, shuffled by the seed); evaluation reads the first windows of ``val_data_path`` in order, or, with
    no validation file, windows of the training file drawn with the evaluation seed (not held out).
    """

    def __init__(self, run_config: RunConfig, mesh: Mesh, *, record_reads: bool = False):
        cfg = run_config.train
        self.task = cfg.task
        self.config = run_config
        self.seed = cfg.seed
        self.seq_len = cfg.seq_len
        self.batch_size = cfg.batch_size
        self.grad_accum = cfg.grad_accum
        self.local_batch = cfg.batch_size // mesh.dp
        self.first_row = mesh.dp_rank * self.local_batch
        self.sp, self.sp_rank, self.layout = mesh.sp, mesh.sp_rank, run_config.parallel.layout
        self.pieces = rank_pieces(cfg.seq_len, mesh.sp, mesh.sp_rank, self.layout)
        self.train_file = self.val_file = None
        self.packed = cfg.packed
        # packed documents under sp: every rank of the group reads whole windows, and the model cuts them into
        # batches of documents and shards those (MCLanguageModel.loss_sum; docs/packing.md)
        self.whole_window = [(0, cfg.seq_len)]
        if self.task == "tokens":
            self.train_file = TokenFile(cfg.data_path, record_reads=record_reads)
            if cfg.val_data_path:
                self.val_file = TokenFile(cfg.val_data_path, record_reads=record_reads)

    @property
    def local_seq_len(self) -> int:
        return sum(length for _, length in self.pieces)

    def fingerprint(self) -> dict:
        """What identifies the data beyond the config's fields (token files: size, vocabulary, dtype)."""
        if self.train_file is None:
            return {}
        header = self.train_file.header
        return {"num_tokens": header["num_tokens"], "vocab_size": header["vocab_size"], "dtype": header["dtype"]}

    def _synthetic(self, count: int, generator: torch.Generator,
                   depth: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.config.model
        if self.task == "mqar":
            return make_mqar_batch(count, self.seq_len, self.config.train.num_kv_pairs, model.vocab_size, generator)
        return make_passkey_batch(count, self.seq_len, model.vocab_size, generator, depth=depth)

    def labelled(self, labels: torch.Tensor) -> int:
        """The labelled tokens of this rank's share (labels != −100): with packed documents under sp every rank of
        the group holds the whole rows, which the group's rank 0 alone counts."""
        if self.packed and self.sp > 1 and self.sp_rank != 0:
            return 0
        return int((labels != -100).sum())

    def train_documents(self, step: int, micro: int) -> Optional[torch.Tensor]:
        """With ``train.packed``: the cu_seqlens of the rows of :meth:`train_batch` ``(step, micro)`` laid end to
        end as one sequence (:meth:`_token_documents`). None otherwise (the model reads across documents)."""
        if not self.packed:
            return None
        first = (step * self.grad_accum + micro) * self.batch_size + self.first_row
        return self._token_documents(self.train_file, range(first, first + self.local_batch), True, self.seed)

    def _token_documents(self, file: TokenFile, samples, shuffle: bool, seed: int) -> torch.Tensor:
        """The cu_seqlens of the windows of ``samples`` laid end to end (mcdist.packing.cu_seqlens_of_rows): each
        row starts a document, and within a row the token file's own document boundaries (``<path>.docs``; for a
        file written before those, a document starts after each eos_id) cut it."""
        count = file.num_windows(self.seq_len)
        rows = [file.window_boundaries(window_for_sample(sample, count, seed, shuffle=shuffle), self.seq_len)
                for sample in samples]
        return cu_seqlens_of_rows(len(rows), self.seq_len, rows)

    def _shard(self, x: torch.Tensor) -> torch.Tensor:
        return shard_sequence(x, self.sp, self.sp_rank, self.layout) if self.sp > 1 else x

    def _token_rows(self, file: TokenFile, samples, shuffle: bool, seed: int, whole: bool = False):
        count = file.num_windows(self.seq_len)
        pieces = self.whole_window if whole else self.pieces
        rows = [file.read_window(window_for_sample(sample, count, seed, shuffle=shuffle), self.seq_len, pieces)
                for sample in samples]
        return torch.stack([ids for ids, _ in rows]), torch.stack([labels for _, labels in rows])

    def train_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of micro-batch ``micro`` of optimizer step ``step`` (0-based).

        Returns:
            ``(input_ids, labels)``, int64 ``[batch_size / dp, seq_len / sp]`` each (labels aligned with inputs).
        """
        first = (step * self.grad_accum + micro) * self.batch_size + self.first_row
        samples = range(first, first + self.local_batch)
        if self.train_file is not None:
            return self._token_rows(self.train_file, samples, True, self.seed, whole=self.packed)
        rows = [self._synthetic_row(sample_seed(self.seed, TRAIN_SPLIT, sample)) for sample in samples]
        return torch.stack([ids for ids, _ in rows]), torch.stack([labels for _, labels in rows])

    def _synthetic_row(self, row_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's pieces of one training row, drawn piece by piece (:mod:`mcdist.data.rows`)."""
        pieces = self.pieces if self.sp > 1 else None
        vocab = self.config.model.vocab_size
        if self.task == "mqar":
            return mqar_row(row_seed, self.seq_len, self.config.train.num_kv_pairs, vocab, pieces)
        return passkey_row(row_seed, self.seq_len, vocab, pieces)

    def eval_batches(self, num_batches: int, *, depth: Optional[float] = None,
                     seed: Optional[int] = None, documents: bool = False) -> Iterator[tuple]:
        """This rank's part of each of the ``num_batches`` evaluation batches (the same ones at every eval).

        ``depth`` (passkey only) places every passkey at that depth in [0, 1]; ``seed`` replaces the evaluation
        seed ``train.seed + EVAL_SEED_OFFSET`` (the generator of the synthetic batches, the window order of a
        training file read without a validation file). ``documents``: yield ``(input_ids, labels, cu_seqlens)``,
        the cu_seqlens of the rows end to end for packed runs (``train.packed``; under sp every rank of the group
        then holds the whole rows, as in training), else None."""
        seed = self.seed + EVAL_SEED_OFFSET if seed is None else seed
        rows = slice(self.first_row, self.first_row + self.local_batch)
        packed = documents and self.packed
        if self.train_file is not None:
            file = self.val_file or self.train_file
            for index in range(num_batches):
                first = index * self.batch_size + self.first_row
                samples = range(first, first + self.local_batch)
                batch = self._token_rows(file, samples, self.val_file is None, seed, whole=packed)
                if documents:
                    cu = self._token_documents(file, samples, self.val_file is None, seed) if packed else None
                    batch = (*batch, cu)
                yield batch
            return
        generator = torch.Generator().manual_seed(seed)
        for _ in range(num_batches):
            ids, labels = self._synthetic(self.batch_size, generator, depth)  # [B, T] each: the whole global batch
            yield (self._shard(ids[rows]), self._shard(labels[rows])) + ((None,) if documents else ())
