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

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from mcdist.attention import AttentionLayer, KVCache
from mcdist.parallel.layout import last_piece_owner, shard_sequence
from mcdist.parallel.model import parallelize_sequence, sequence_layers
from mcdist.parallel.ring_reader import broadcast
from mcdist.readers import LayerCache, cast_cache, select_cache_rows, stack_caches, take_rows

__all__ = ["Completion", "Request", "Session", "complete", "generate", "sample_next"]


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


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator=None) -> torch.Tensor:
    """Next token ids [B] from logits [B, vocab]: greedy when temperature is 0, else softmax(logits / T) over the
    top_k highest (all when 0), then over the smallest set of the most likely ids whose probabilities reach
    top_p (nucleus sampling; 1 keeps all), drawn with ``generator`` (one torch.Generator, or a list with one per
    row)."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature = {temperature}, top_k = {top_k}, top_p = {top_p}; expected temperature "
                         ">= 0, top_k >= 0 and 0 < top_p <= 1")
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(ordered, -1)
        before = torch.cumsum(probs, -1) - probs  # the mass of the ids more likely than each one
        drop = before >= top_p  # the most likely id is always kept (its mass before is 0)
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
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



@dataclass
class Request:
    """One prompt to continue (:func:`complete`): its ids, how many new tokens at most, how to sample them
    (``temperature`` 0 = greedy; ``top_k``, ``top_p`` as :func:`sample_next`), stop sequences (the continuation
    ends after the first new tokens that end with one of them, the stop sequence included) and the seed of its
    own generator."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: Sequence[Sequence[int]] = field(default_factory=list)
    seed: int = 0

    def problem(self, vocab_size: int) -> Optional[str]:
        """What is wrong with this request for a model of ``vocab_size`` ids, in one line, or None."""
        ids = list(self.prompt_ids)
        if not ids:
            return "prompt_ids is empty; expected at least one token id"
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            return "prompt_ids must be integers"
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            return f"prompt id {bad[0]} is outside the vocabulary; expected ids in [0, {vocab_size})"
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 0:
            return f"max_new_tokens = {self.max_new_tokens!r}; expected an integer >= 0"
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            return f"temperature = {self.temperature!r}; expected a number >= 0"
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            return f"top_k = {self.top_k!r}; expected an integer >= 0"
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            return f"top_p = {self.top_p!r}; expected a number in (0, 1]"
        for stop in self.stop_ids:
            if not isinstance(stop, (list, tuple)) or not stop or any(
                    isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size for i in stop):
                return (f"stop_ids entry {stop!r} is invalid; expected a non-empty list of ids in "
                        f"[0, {vocab_size})")
        return None


@dataclass
class Completion:
    new_ids: List[int]
    finish_reason: str  # "length" (max_new_tokens reached) or "stop" (ended with a stop sequence)


def _stopped(new_ids: List[int], stops) -> bool:
    return any(len(new_ids) >= len(stop) and new_ids[-len(stop):] == list(stop) for stop in stops)


def _paddable(model) -> bool:
    """Whether prompts of different lengths can share a decode batch (docs/inference.md, "Batching"): every
    mixer is a Memory Caching layer (an attention layer's keys would need per-row positions and masks)."""
    return not any(isinstance(block.mixer, AttentionLayer) for block in model.blocks)


def _layer_rows(cache, index: torch.Tensor):
    if isinstance(cache, KVCache):  # every tensor field is [B, ...]
        return KVCache(**{name: take_rows(getattr(cache, name), index) for name in KVCache.__dataclass_fields__})
    return select_cache_rows(cache, index)


def _cast(cache, dtype: torch.dtype) -> None:
    if isinstance(cache, KVCache):
        cache.keys, cache.values = cache.keys.to(dtype), cache.values.to(dtype)
    else:
        cast_cache(cache, dtype)


@torch.no_grad()
def complete(model, requests: Sequence[Request], *, sp=None, layout: str = "zigzag", impl: Optional[str] = None,
             cache_dtype: Optional[torch.dtype] = None, max_batch: int = 16) -> List[Completion]:
    """Continue every request; returns one :class:`Completion` per request, in order.

    Requests decode together in batches of at most ``max_batch`` (docs/inference.md, "Batching"): in one process
    an MC model batches prompts of equal length modulo ``segment_len`` (each prompt is prefilled alone, then the
    caches are stacked with placeholder segments in front of the shorter ones, which no read sees); under
    sequence parallelism, or with attention layers, prompts of equal length. A finished row leaves its batch.
    Each request samples with its own generator (``Request.seed``), so a completion is the same whatever batch
    it was in (tested: equal to one request at a time). ``cache_dtype``: the dtype the cached segment states
    (and an attention layer's keys and values) are kept in, e.g. torch.bfloat16; None keeps the model's.
    Under ``sp`` every rank calls with the same requests and returns the same completions (rank 0 draws)."""
    if max_batch < 1:
        raise ValueError(f"max_batch = {max_batch}; expected >= 1")
    vocab = model.config.vocab_size
    for number, request in enumerate(requests):
        reason = request.problem(vocab)
        if reason:
            raise ValueError(f"request {number}: {reason}")
    session = Session(model, sp=sp, layout=layout, impl=impl)  # validates, and parallelizes under sp
    one_process = session.sp is None
    pad = one_process and _paddable(model)
    C = model.config.segment_len
    groups: dict = {}
    for number, request in enumerate(requests):
        length = len(request.prompt_ids)
        groups.setdefault(length % C if pad else length, []).append(number)
    results: List[Optional[Completion]] = [None] * len(requests)
    for key in sorted(groups):
        members = groups[key]
        for start in range(0, len(members), max_batch):
            batch = members[start:start + max_batch]
            for number, completion in zip(batch, _complete_batch(session, [requests[i] for i in batch],
                                                                 cache_dtype)):
                results[number] = completion
    return results


def _complete_batch(session: Session, requests: List[Request], cache_dtype) -> List[Completion]:
    model, impl = session.model, session.impl
    results = [Completion([], "length") for _ in requests]
    live = [row for row, request in enumerate(requests) if request.max_new_tokens > 0]
    if not live:
        return results
    requests = [requests[row] for row in live]
    device = model.embed.weight.device
    prompts = [list(request.prompt_ids) for request in requests]
    if len({len(prompt) for prompt in prompts}) == 1:
        run = Session(model, sp=session.sp, layout=session.layout, impl=impl)
        logits = run.prefill(torch.tensor(prompts, dtype=torch.int64, device=device))
        cache = run.cache
    else:  # one process, MC layers only: each prompt alone, then one stacked cache (readers.stack_caches)
        alone = [Session(model, impl=impl) for _ in prompts]
        logits = torch.cat([run.prefill(torch.tensor([prompt], dtype=torch.int64, device=device))
                            for run, prompt in zip(alone, prompts)])
        C = model.config.segment_len
        cache = type(alone[0].cache)([stack_caches([run.cache.layers[i] for run in alone], C)
                                      for i in range(len(model.blocks))])
    if cache_dtype is not None:
        for layer_cache in cache.layers:
            _cast(layer_cache, cache_dtype)
    generators = [torch.Generator().manual_seed(request.seed) for request in requests]
    new: List[List[int]] = [[] for _ in requests]
    active = list(range(len(requests)))
    while True:
        drawn = torch.cat([sample_next(logits[j:j + 1], temperature=requests[i].temperature,
                                       top_k=requests[i].top_k, top_p=requests[i].top_p, generator=generators[i])
                           for j, i in enumerate(active)])
        if session.sp is not None:
            drawn = broadcast(drawn, 0, session.sp)
        keep = []
        for j, (i, token) in enumerate(zip(active, drawn.tolist())):
            new[i].append(token)
            if _stopped(new[i], requests[i].stop_ids):
                results[live[i]] = Completion(new[i], "stop")
            elif len(new[i]) == requests[i].max_new_tokens:
                results[live[i]] = Completion(new[i], "length")
            else:
                keep.append(j)
        if not keep:
            return results
        if len(keep) < len(active):
            index = torch.tensor(keep, dtype=torch.int64, device=device)
            cache.layers = [_layer_rows(layer_cache, index) for layer_cache in cache.layers]
            drawn = drawn[index]
            active = [active[j] for j in keep]
        logits = model.lm_head(model.hidden_states(drawn[:, None], impl=impl, cache=cache)[:, -1])
