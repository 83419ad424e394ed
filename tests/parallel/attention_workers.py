"""Worker functions for the attention baseline's distributed tests (module level, so spawned processes can import
them)."""

import json

import torch
import torch.distributed as dist

from checks import relative_error  # inf, never NaN, on a NaN or inf: safe under an all-reduce MAX
from mcdist.config import ModelConfig
from mcdist.model import MCLanguageModel
from mcdist.parallel.comm import SPGroup
from mcdist.parallel.layout import shard_sequence
from mcdist.parallel.model import parallelize_sequence

VOCAB = 32


def model_config(pattern: str, conv_size: int = 0) -> ModelConfig:
    # init_std 0.3: attention weights far from uniform, so a wrong mask or position shows
    return ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=len(pattern.split(",")), n_heads=2, segment_len=4,
                       chunk_len=2, minibatch_len=2, top_k=2, layer_pattern=pattern, init_std=0.3, conv_size=conv_size)


def worst_over_ranks(error: float) -> float:
    every = torch.tensor([error], dtype=torch.float64)
    dist.all_reduce(every, op=dist.ReduceOp.MAX)
    return float(every)


def forward_case(rank, world, layout, pattern, seq_len, conv_size=0):
    """Relative errors, SP against one process, of the logits, the embedding output's gradient and every parameter
    gradient (all-reduced over the ranks), for a model with ``pattern``'s mixers."""
    torch.manual_seed(0)
    reference = MCLanguageModel(model_config(pattern, conv_size)).double()
    model = MCLanguageModel(model_config(pattern, conv_size)).double()
    model.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, seq_len), generator=generator)
    upstream = torch.randn(2, seq_len, VOCAB, generator=generator, dtype=torch.float64)
    full = reference(ids, impl="chunked").logits
    (full * upstream).sum().backward()

    parallelize_sequence(model, SPGroup(dist.group.WORLD, rank, world, tuple(range(world))), layout)
    local = model(shard_sequence(ids, world, rank, layout), impl="chunked").logits
    (local * shard_sequence(upstream, world, rank, layout)).sum().backward()
    errors = {"logits": relative_error(local, shard_sequence(full, world, rank, layout))}
    for (name, p_ref), p in zip(reference.named_parameters(), model.parameters(), strict=True):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        errors[name] = relative_error(grad, p_ref.grad)
    return {name: worst_over_ranks(error) for name, error in errors.items()}


def decode_case(rank, world, layout, pattern, prompt_len, new_tokens, conv_size=0):
    """Relative error of an SP Session's next-token logits (prefill + decode) against one process's full forward,
    and the keys each attention layer holds on each rank."""
    from mcdist.infer import Session
    from mcdist.attention import KVCache

    torch.manual_seed(0)
    model = MCLanguageModel(model_config(pattern, conv_size)).double()
    ids = torch.randint(0, VOCAB, (2, prompt_len + new_tokens), generator=torch.Generator().manual_seed(1))
    full = model(ids, impl="chunked").logits
    session = Session(model, sp=SPGroup(dist.group.WORLD, rank, world, tuple(range(world))), layout=layout,
                      impl="chunked")
    steps = [session.prefill(ids[:, :prompt_len])]
    steps += [session.decode(ids[:, t]) for t in range(prompt_len, prompt_len + new_tokens - 1)]
    error = relative_error(torch.stack(steps, 1), full[:, prompt_len - 1:-1])
    held = [float(cache.keys.shape[1]) for cache in session.cache.layers if isinstance(cache, KVCache)]
    counts = [torch.zeros(len(held), dtype=torch.float64) for _ in range(world)]
    dist.all_gather(counts, torch.tensor(held, dtype=torch.float64))
    return {"error": worst_over_ranks(error), "held": torch.stack(counts).tolist(),
            "tokens": prompt_len + new_tokens - 1}


def attention_worker(rank, world, forward_cases, decode_cases, out_path, conv_size=0):
    """Every case's errors, keyed by its parameters joined with '-'; written by rank 0 as JSON. ``conv_size``: the
    short convolution of every layer (0: none)."""
    results = {}
    for case in forward_cases:
        results["-".join(map(str, case))] = forward_case(rank, world, *case, conv_size=conv_size)
    for case in decode_cases:
        results["-".join(map(str, case))] = decode_case(rank, world, *case, conv_size=conv_size)
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)
