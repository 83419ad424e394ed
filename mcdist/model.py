"""The language model: embedding → blocks [RMSNorm → MC mixer → RMSNorm → SwiGLU MLP] → RMSNorm → LM head.

Decoding runs through the same forward: ``model(input_ids, cache=cache)`` with a :class:`DecodeCache` (the
convention of Hugging Face ``past_key_values``): an empty cache (``model.new_cache()``) makes the forward a
prefill, a filled one continues the sequence token by token (docs/inference.md)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mcdist.attention import AttentionLayer, KVCache
from mcdist.config import ModelConfig
from mcdist.layer import MemoryCachingLayer, at_least_float32
from mcdist.packing import (buckets, check_cu_seqlens, document_owners, documents_of, labels_at,
                            local_document_limit, padded_documents, run_documents)
from mcdist.parallel.layout import shard_sequence
from mcdist.readers import LayerCache

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = at_least_float32(x)
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """RMSNorm → mixer → RMSNorm → SwiGLU, both residual; ``mixer``: "mc" (Memory Caching) or "attention"."""

    def __init__(self, config: ModelConfig, mixer: str = "mc"):
        super().__init__()
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = AttentionLayer(config) if mixer == "attention" else MemoryCachingLayer(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, int(config.mlp_ratio * config.d_model))

    def forward(self, x: torch.Tensor, *, impl: Optional[str] = None,
                cache=None) -> torch.Tensor:  # cache: the mixer's (LayerCache or KVCache)
        x = x + self.mixer(self.mixer_norm(x), impl=impl, cache=cache)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class DecodeCache:
    """What the model keeps between decoded tokens: one cache per block, of its mixer's kind
    (:class:`~mcdist.readers.LayerCache` for an MC layer, :class:`~mcdist.attention.KVCache` for attention)."""

    layers: List[object]

    @property
    def position(self) -> int:
        """Tokens of the sequence taken so far."""
        return self.layers[0].position if self.layers and self.layers[0].filled else 0


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, vocab]
    loss: Optional[torch.Tensor] = None  # mean cross-entropy over labels != -100
    cache: Optional[DecodeCache] = None  # the updated cache, when the forward was given one


def _cross_entropy_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy of head(hidden) [n, vocab] against labels [n] (-100 ignored), in float32 or wider."""
    return F.cross_entropy(at_least_float32(head(hidden)), labels, ignore_index=IGNORE_INDEX, reduction="sum")


class MCLanguageModel(nn.Module):
    """A causal language model whose token mixers are Memory Caching layers.

    Args:
        config: ModelConfig.
    Shapes: forward(input_ids [B, T], labels [B, T] or None) -> ModelOutput(logits [B, T, vocab], loss).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, mixer) for mixer in config.mixers)
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.mlp.gate_up.weight, std=std)
            nn.init.normal_(block.mlp.down.weight, std=std / (2 * self.config.n_layers) ** 0.5)

    def new_cache(self) -> DecodeCache:
        """An empty decode cache: the next forward with it is a prefill."""
        return DecodeCache([KVCache() if isinstance(block.mixer, AttentionLayer) else LayerCache()
                            for block in self.blocks])

    def hidden_states(self, input_ids: torch.Tensor, *, impl: Optional[str] = None,
                      cache: Optional[DecodeCache] = None, cu_seqlens=None) -> torch.Tensor:
        """The final-normed hidden states [B, T, d_model]. ``cu_seqlens``: the documents packed in the one
        sequence input_ids [1, T] (mcdist.packing): each is computed as if alone."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T]; got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids; got dtype {input_ids.dtype}")
        if cache is not None and len(cache.layers) != len(self.blocks):
            raise ValueError(f"cache holds {len(cache.layers)} layers; this model has {len(self.blocks)} "
                             "(make it with model.new_cache())")
        x = self.embed(input_ids)
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("cu_seqlens with a decode cache: decode packed prompts as separate requests "
                                 "(mcdist.infer.complete), which batches them")
            if any(block.mixer.shard is not None for block in self.blocks):
                raise ValueError("packed documents (cu_seqlens) under sequence parallelism: loss_sum and "
                                 "document_share take them (the whole packed sequence on every rank, each rank "
                                 "computing its share of the positions); forward's logits follow the sp layout, "
                                 "which packed documents do not")
            return self.final_norm(run_documents(lambda rows: self._blocks(rows, impl, None), x, cu_seqlens))
        return self.final_norm(self._blocks(x, impl, cache))

    def _blocks(self, x: torch.Tensor, impl: Optional[str], cache: Optional[DecodeCache]) -> torch.Tensor:
        for index, block in enumerate(self.blocks):
            x = block(x, impl=impl, cache=None if cache is None else cache.layers[index])
        return x

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                cache: Optional[DecodeCache] = None, impl: Optional[str] = None, cu_seqlens=None,
                document_ids: Optional[torch.Tensor] = None) -> ModelOutput:
        """Logits [B, T, vocab] (and the mean loss over labels != -100 when given). With ``cache``: a prefill
        (empty cache) or the next tokens of the cached sequence; the cache is updated in place and returned.
        ``cu_seqlens``: int [n_docs + 1], the documents packed in input_ids [1, T] ([0, end_0, …, T]); each is
        computed exactly as if alone (docs/packing.md); or ``document_ids`` [1, T], a document id per token."""
        cu_seqlens = documents_of(cu_seqlens, document_ids)
        logits = self.lm_head(self.hidden_states(input_ids, impl=impl, cache=cache, cu_seqlens=cu_seqlens))
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}; got "
                                 f"{tuple(labels.shape)}")
            loss = F.cross_entropy(at_least_float32(logits).reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return ModelOutput(logits, loss, cache)

    def loss_sum(self, input_ids: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int = 0,
                 impl: Optional[str] = None, cu_seqlens=None, local_max: Optional[int] = None) -> torch.Tensor:
        """Σ cross-entropy (float32 or wider) over the labelled tokens (labels != -100) of input_ids [B, T].

        ``chunk_tokens > 0``: the logits are made and reduced ``chunk_tokens`` tokens at a time, each chunk under
        activation checkpointing, so neither the forward nor the backward ever holds more than one chunk's
        [chunk, vocab] logits (a long sequence's full logits are the largest activation by far: 128K tokens × a
        32K vocabulary are 16 GiB in float32). The same value and gradients as ``chunk_tokens = 0`` up to float
        summation order. ``cu_seqlens``: packed documents, as for ``forward``. Under sequence parallelism with
        ``cu_seqlens``, input_ids and labels are the *whole* packed sequence [1, T] on every rank of the group, and
        this rank's part of the sum is returned (the ranks' parts add up to the whole; ``local_max`` as for
        :meth:`document_share`: docs/packing.md)."""
        if cu_seqlens is not None and self.sequence_shard() is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}; got "
                                 f"{tuple(labels.shape)}")
            hidden, index = self.document_share(input_ids, cu_seqlens, impl=impl, local_max=local_max)
            return self._loss_of_hidden(hidden, labels_at(labels.reshape(-1), index), chunk_tokens)
        hidden = self.hidden_states(input_ids, impl=impl, cu_seqlens=cu_seqlens).flatten(0, 1)  # [B·T, d_model]
        return self._loss_of_hidden(hidden, labels.reshape(-1), chunk_tokens)

    def _loss_of_hidden(self, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        """Σ CE of the head over hidden [N, d_model] against labels [N], ``chunk_tokens`` rows at a time (each
        chunk under activation checkpointing) or all at once (0)."""
        if chunk_tokens <= 0:
            return _cross_entropy_sum(self.lm_head, hidden, labels)
        total = None
        for first in range(0, hidden.shape[0], chunk_tokens):
            part = checkpoint(_cross_entropy_sum, self.lm_head, hidden[first:first + chunk_tokens],
                              labels[first:first + chunk_tokens], use_reentrant=False)
            total = part if total is None else total + part
        return total

    def sequence_shard(self):
        """The shard context sequence parallelism gave the layers (its ``sp`` group and ``layout``), or None."""
        for block in self.blocks:
            if block.mixer.shard is not None:
                return block.mixer.shard
        return None

    def document_share(self, input_ids: torch.Tensor, cu_seqlens, *, impl: Optional[str] = None,
                       local_max: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The final hidden states of the packed documents input_ids [1, T] that this rank computes:
        ``(hidden [N, d_model], index [N])``, ``index`` each row's position in the packed sequence (−1: padding,
        to be ignored). In one process, every position in order. Under sequence parallelism (every rank of the
        group holds the whole packed sequence) the ranks' shares together hold every position once
        (docs/packing.md): a document of at most ``local_max`` tokens (default
        :func:`mcdist.packing.local_document_limit`; 0: none) is computed whole by one rank
        (:func:`mcdist.packing.document_owners`), with no communication and no padding beyond its length class;
        a longer one is right-padded to a multiple of the layout's unit (2·P·C zigzag, P·C contiguous) and
        sharded over the group as any sequence, a length class of them a batch."""
        shard = self.sequence_shard()
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"packed documents take input_ids [1, T]; got {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        if shard is None:
            return self.hidden_states(input_ids, impl=impl, cu_seqlens=cu_seqlens)[0], positions
        cu = check_cu_seqlens(cu_seqlens, T)
        P, rank, layout = shard.sp.size, shard.sp.rank, shard.layout
        unit = (2 * P if layout == "zigzag" else P) * self.config.segment_len
        starts, lengths = cu[:-1].tolist(), (cu[1:] - cu[:-1]).tolist()
        limit = local_document_limit(T, P, unit) if local_max is None else local_max
        owners = document_owners(lengths, P, limit)
        hidden, index = [], []

        def add(ids: torch.Tensor, where: torch.Tensor) -> None:
            hidden.append(self.hidden_states(ids, impl=impl).flatten(0, 1))
            index.append(where.flatten())

        whole = [i for i, owner in enumerate(owners) if owner >= 0]
        with self._unsharded():
            # one forward per length class any rank holds whole, on every rank (an empty one runs a single
            # ignored token), so every rank makes the same calls: FSDP gathers a block's weights at each call
            for group in buckets(lengths, whole):
                mine = [i for i in group if owners[i] == rank]
                if not mine:
                    add(input_ids.new_zeros(1, 1), positions.new_full((1, 1), -1))
                    continue
                width = max(lengths[i] for i in mine)
                add(padded_documents(input_ids[0], starts, lengths, mine, width, 0),
                    padded_documents(positions, starts, lengths, mine, width, -1))
        for group in buckets(lengths, [i for i, owner in enumerate(owners) if owner < 0]):
            width = -(-max(lengths[i] for i in group) // unit) * unit
            add(shard_sequence(padded_documents(input_ids[0], starts, lengths, group, width, 0), P, rank, layout),
                shard_sequence(padded_documents(positions, starts, lengths, group, width, -1), P, rank, layout))
        return torch.cat(hidden), torch.cat(index)

    @contextlib.contextmanager
    def _unsharded(self):
        """Inside, every layer computes in this process alone (a document one rank holds whole), then the shard
        contexts sequence parallelism gave the layers are back."""
        shards = [block.mixer.shard for block in self.blocks]
        for block in self.blocks:
            block.mixer.shard = None
        try:
            yield
        finally:
            for block, shard in zip(self.blocks, shards):
                block.mixer.shard = shard

    def logit_chunks(self, input_ids: torch.Tensor, *, chunk_tokens: int = 0, impl: Optional[str] = None):
        """The logits of input_ids [B, T], ``chunk_tokens`` positions at a time (all at once for 0): yields
        ``(first, logits [B, n, vocab])`` for positions ``[first, first + n)``; for evaluation, where only
        per-token reductions (loss, arg-max) of the logits are needed."""
        hidden = self.hidden_states(input_ids, impl=impl)  # [B, T, d_model]
        step = chunk_tokens if chunk_tokens > 0 else hidden.shape[1]
        for first in range(0, hidden.shape[1], step):
            yield first, self.lm_head(hidden[:, first:first + step])

