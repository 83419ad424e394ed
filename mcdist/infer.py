"""Inference (docs/inference.md): prefill a prompt into a cache, then decode one token at a time without re-reading it.

Decoding runs through the model's own forward (``MCLanguageModel.forward(..., cache=...)``): a forward with an
empty :class:`~mcdist.model.DecodeCache` is a prefill (every layer runs its parallel path over the prompt and keeps
what later tokens read: the closed segments' states and contexts, the online memory, the open segment's running
context, for deep memory the open mini-batch); a forward with a filled one advances every layer by one token at a
time through the layer's decode reader (``mcdist.readers.DecodeReader``). Cost per token: O(N·d²) for the read,
O(d²) for the memory; the prompt is never read again.

:class:`Session` is a thin convenience over that: it keeps the cache and returns next-token logits. Under
sequence parallelism (``Session(model, sp=group)``) the model's layers get the group's shard context
(``mcdist.parallel.parallelize_sequence``), the prompt is prefilled over the group on the largest prefix the
layout divides (the rest of the prompt is decoded), each rank keeps the cached states of its own segments, and
only the cached read of a decoded token is split (each rank reads its own states; one all-gather of the partials
merges them). Exactness (tested): prefill + decode equals the full forward on the whole sequence (float64 to
1e-10), in one process and under SP.
"""

from __future__ import annotations

from typing import Optional

import torch

from mcdist.parallel.layout import last_piece_owner, shard_sequence
from mcdist.parallel.model import parallelize_sequence, sequence_layers
from mcdist.parallel.ring_reader import broadcast

__all__ = ["Session", "generate", "sample_next"]


class Session:
    """Prefill a prompt, then decode token by token, for a batch of sequences.

    Args:
        model: an MCLanguageModel.
        sp: the sequence-parallel group (``mcdist.parallel.comm.SPGroup``) to spread the prompt and the cached
            states over, or None for one process. The model's layers are given the group's shard context (the
            model then expects this rank's slices in plain forwards too); a model already parallelized over a
            group is used as it is. Every rank of the group makes the same calls with the same token ids.
        layout: how the prompt is sharded under SP ('zigzag' or 'contiguous').
        impl: kernel choice ('auto', 'chunked', 'triton'; default 'auto').

    ``prefill(input_ids [B, L])`` and ``decode(token_ids [B])`` return the next-token logits [B, vocab] (the same
    on every rank). ``position`` counts the tokens taken so far.
    """

    def __init__(self, model, *, sp=None, layout: str = "zigzag", impl: Optional[str] = None):
        if layout not in ("zigzag", "contiguous"):
            raise ValueError(f"layout = {layout!r}; expected 'zigzag' or 'contiguous'")
        layers = sequence_layers(model)
        for layer in layers:
            if layer.config.segmentation != "constant":
                raise ValueError(f"inference supports segmentation = 'constant' only; got "
                                 f"{layer.config.segmentation!r}")
        shards = [layer.shard for layer in layers if layer.shard is not None]
        if shards:
            if sp is not None and (sp.ranks != shards[0].sp.ranks or layout != shards[0].layout):
                raise ValueError("the model is parallelized over another sp group or layout than the one given")
            sp, layout = shards[0].sp, shards[0].layout
        elif sp is not None and sp.size > 1:
            parallelize_sequence(model, sp, layout)
        self.model, self.layout, self.impl = model, layout, impl
        self.sp = sp if sp is not None and sp.size > 1 else None
        self.cache = None

    @property
    def position(self) -> int:
        return self.cache.position if self.cache is not None else 0

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Take the prompt [B, L] (L ≥ 1); returns the logits [B, vocab] after its last token."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, L] with L >= 1; got shape {tuple(input_ids.shape)}")
        if self.cache is not None:
            raise RuntimeError("prefill was already called on this Session; start a new Session for a new prompt")
        model = self.model
        self.cache = model.new_cache()
        self.batch = input_ids.shape[0]
        if self.sp is None:
            return self._logits(model.hidden_states(input_ids, impl=self.impl, cache=self.cache)[:, -1])
        P, C = self.sp.size, model.config.segment_len
        unit = (2 * P if self.layout == "zigzag" else P) * C
        head = input_ids.shape[1] - input_ids.shape[1] % unit
        if head == 0:  # too short to shard: every token goes through the decode step
            dtype, device = model.embed.weight.dtype, model.embed.weight.device
            for layer, cache in zip(sequence_layers(model), self.cache.layers):
                layer.start_cache(cache, input_ids.shape[0], dtype, device, group_size=P)
            return self._decode_tokens(input_ids)
        local = shard_sequence(input_ids[:, :head], P, self.sp.rank, self.layout)
        hidden = model.hidden_states(local, impl=self.impl, cache=self.cache)
        if head < input_ids.shape[1]:
            return self._decode_tokens(input_ids[:, head:])
        # the last prompt token lives on the rank holding the sequence's last piece, last in its local order
        return self._logits(broadcast(hidden[:, -1], last_piece_owner(head, P, self.layout), self.sp))

    @torch.no_grad()
    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Take one token per sequence [B]; returns the logits [B, vocab] after it."""
        if self.cache is None:
            raise RuntimeError("call prefill(prompt) before decode")
        batch = self.batch
        if token_ids.dim() != 1 or token_ids.shape[0] != batch:
            raise ValueError(f"token_ids must be [B] with B = {batch}; got shape {tuple(token_ids.shape)}")
        return self._decode_tokens(token_ids[:, None])

    def _decode_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._logits(self.model.hidden_states(input_ids, impl=self.impl, cache=self.cache)[:, -1])


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, generator=None) -> torch.Tensor:
    """Next token ids [B] from logits [B, vocab]: greedy when temperature is 0, else softmax(logits / T) over the
    top_k highest (all when 0), drawn with ``generator`` (one torch.Generator, or a list with one per row)."""
    if temperature < 0 or top_k < 0:
        raise ValueError(f"temperature = {temperature}, top_k = {top_k}; expected both >= 0")
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, -1).cpu()
    if isinstance(generator, (list, tuple)):
        drawn = torch.cat([torch.multinomial(row[None], 1, generator=g)[0] for row, g in zip(probs, generator)])
    else:
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return drawn.to(logits.device)


@torch.no_grad()
def generate(session: Session, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, eos_id: Optional[int] = None) -> torch.Tensor:
    """Prefill ``input_ids`` [B, L] and decode ``max_new_tokens``; returns the new ids [B, n] (n stops early when
    every sequence has produced ``eos_id``; a sequence that has is padded with ``eos_id`` after it). Every row
    samples with its own generator seeded with ``seed``, so a row continues as it would alone. Under SP, rank 0
    draws each token and sends it to the others, so every rank continues the same sequences."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens = {max_new_tokens}; expected >= 0")
    generators = [torch.Generator().manual_seed(seed) for _ in range(input_ids.shape[0])]
    logits = session.prefill(input_ids)
    new, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_k=top_k, generator=generators)
        if session.sp is not None:
            token = broadcast(token, 0, session.sp)
        if eos_id is not None:
            token = torch.where(done, torch.full_like(token, eos_id), token)  # a finished row repeats eos_id
            done |= token == eos_id
        new.append(token)
        if eos_id is not None and bool(done.all()):
            break
        if step + 1 < max_new_tokens:
            logits = session.decode(token)
    return torch.stack(new, 1) if new else input_ids.new_zeros(input_ids.shape[0], 0)

