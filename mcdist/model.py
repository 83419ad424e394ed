"""The language model: embedding → blocks [RMSNorm → MC mixer → RMSNorm → SwiGLU MLP] → RMSNorm → LM head.

Decoding runs through the same forward: ``model(input_ids, cache=cache)`` with a :class:`DecodeCache` (the
convention of Hugging Face ``past_key_values``): an empty cache (``model.new_cache()``) makes the forward a
prefill, a filled one continues the sequence token by token (docs/inference.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mcdist.attention import AttentionLayer, KVCache
from mcdist.config import ModelConfig
from mcdist.layer import MemoryCachingLayer, at_least_float32
from mcdist.packing import buckets, check_cu_seqlens, documents_of, padded_documents, run_documents
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
                raise ValueError("packed documents (cu_seqlens) under sequence parallelism: loss_sum takes them "
                                 "(the whole packed sequence on every rank); logits of packed documents are computed "
                                 "in one process")
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
                 impl: Optional[str] = None, cu_seqlens=None) -> torch.Tensor:
        """Σ cross-entropy (float32 or wider) over the labelled tokens (labels != -100) of input_ids [B, T].

        ``chunk_tokens > 0``: the logits are made and reduced ``chunk_tokens`` tokens at a time, each chunk under
        activation checkpointing, so neither the forward nor the backward ever holds more than one chunk's
        [chunk, vocab] logits (a long sequence's full logits are the largest activation by far: 128K tokens × a
        32K vocabulary are 16 GiB in float32). The same value and gradients as ``chunk_tokens = 0`` up to float
        summation order. ``cu_seqlens``: packed documents, as for ``forward``. Under sequence parallelism with
        ``cu_seqlens``, input_ids and labels are the *whole* packed sequence [1, T] on every rank of the group, and
        this rank's part of the sum is returned (the ranks' parts add up to the whole: docs/packing.md)."""
        shard = self.sequence_shard()
        if cu_seqlens is not None and shard is not None:
            return self._sharded_documents_loss_sum(input_ids, labels, cu_seqlens, shard, chunk_tokens, impl)
        hidden = self.hidden_states(input_ids, impl=impl, cu_seqlens=cu_seqlens).flatten(0, 1)  # [B·T, d_model]
        labels = labels.reshape(-1)
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

    def _sharded_documents_loss_sum(self, input_ids, labels, cu_seqlens, shard, chunk_tokens, impl):
        """Σ CE of packed documents under sequence parallelism: each length bucket of documents
        (mcdist.packing.buckets) is a batch, every document right-padded (ids 0, labels ignored) to the bucket's
        longest rounded up to what the layout divides, sharded as any batch; this rank's pieces are summed."""
        if input_ids.shape[0] != 1 or labels.shape != input_ids.shape:
            raise ValueError(f"packed documents take input_ids and labels [1, T]; got {tuple(input_ids.shape)} and "
                             f"{tuple(labels.shape)}")
        cu = check_cu_seqlens(cu_seqlens, input_ids.shape[1])
        P, layout = shard.sp.size, shard.layout
        unit = (2 * P if layout == "zigzag" else P) * self.config.segment_len
        starts, lengths = cu[:-1].tolist(), (cu[1:] - cu[:-1]).tolist()
        total = None
        for group in buckets(lengths):
            width = -(-max(lengths[i] for i in group) // unit) * unit
            ids = padded_documents(input_ids[0], starts, lengths, group, width, 0)
            targets = padded_documents(labels[0], starts, lengths, group, width, IGNORE_INDEX)
            part = self.loss_sum(shard_sequence(ids, P, shard.sp.rank, layout),
                                 shard_sequence(targets, P, shard.sp.rank, layout), chunk_tokens=chunk_tokens,
                                 impl=impl)
            total = part if total is None else total + part
        return total

    def logit_chunks(self, input_ids: torch.Tensor, *, chunk_tokens: int = 0, impl: Optional[str] = None):
        """The logits of input_ids [B, T], ``chunk_tokens`` positions at a time (all at once for 0): yields
        ``(first, logits [B, n, vocab])`` for positions ``[first, first + n)``; for evaluation, where only
        per-token reductions (loss, arg-max) of the logits are needed."""
        hidden = self.hidden_states(input_ids, impl=impl)  # [B, T, d_model]
        step = chunk_tokens if chunk_tokens > 0 else hidden.shape[1]
        for first in range(0, hidden.shape[1], step):
            yield first, self.lm_head(hidden[:, first:first + step])

