"""Worker functions for the distributed tests (module level, so spawned processes can import them)."""

import itertools
import json

import torch
import torch.distributed as dist

from checks import relative_error  # inf, never NaN, on a NaN or inf: safe under max() and an all-reduce MAX
from mcdist.config import AGGREGATIONS, MEMORY_KINDS, STATE_INITS, ModelConfig
from mcdist.layer import MemoryCachingLayer
from mcdist.parallel.comm import SPGroup
from mcdist.parallel.layout import shard_sequence
from mcdist.parallel.model import parallelize_layer


def layer_case(memory, aggregation, state_init, layout, world, rank, dtype, seq_len=None):
    """Relative errors of the SP layer against one process on this rank's slice: [output, input gradient, all
    parameter gradients jointly, the worst single parameter gradient], and the bytes the ring received."""
    C = 4
    seq_len = seq_len or 2 * world * C * 2  # two segments per piece under zigzag
    torch.manual_seed(0)
    config = ModelConfig(d_model=8, n_heads=2, memory=memory, aggregation=aggregation, state_init=state_init,
                         segment_len=C, chunk_len=2, minibatch_len=2, top_k=2, inner_lr=0.1)
    reference = MemoryCachingLayer(config).to(dtype)
    layer = MemoryCachingLayer(config).to(dtype)
    layer.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, seq_len, 8, generator=generator, dtype=torch.float64).to(dtype)
    upstream = torch.randn(2, seq_len, 8, generator=generator, dtype=torch.float64).to(dtype)

    x_full = x.clone().requires_grad_()
    y_full = reference(x_full, impl="chunked")
    (y_full * upstream).sum().backward()

    sp = SPGroup(dist.group.WORLD, rank, world, tuple(range(world)))
    parallelize_layer(layer, sp, layout)
    x_local = shard_sequence(x, world, rank, layout).clone().requires_grad_()
    y_local = layer(x_local, impl="chunked")
    (y_local * shard_sequence(upstream, world, rank, layout)).sum().backward()

    out_error = relative_error(y_local, shard_sequence(y_full, world, rank, layout))
    input_error = relative_error(x_local.grad, shard_sequence(x_full.grad, world, rank, layout))
    grads, reference_grads = [], []
    for p_ref, p in zip(reference.parameters(), layer.parameters(), strict=True):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        grads.append(grad)
        reference_grads.append(p_ref.grad)
    joint = relative_error(grads, reference_grads, joint=True)
    each = relative_error(grads, reference_grads)  # the worst single parameter gradient
    return [out_error, input_error, joint, each], dict(sp.stats.received)


def layer_cases_worker(rank, world, layouts, dtype_name, out_path):
    dtype = getattr(torch, dtype_name)
    results = {}
    for layout, memory, aggregation, state_init in itertools.product(layouts, MEMORY_KINDS, AGGREGATIONS,
                                                                       STATE_INITS):
        errors, received = layer_case(memory, aggregation, state_init, layout, world, rank, dtype)
        errors = torch.tensor(errors, dtype=torch.float64)
        dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        results["-".join([layout, memory, aggregation, state_init])] = errors.tolist()
        if (memory, aggregation, state_init) == ("linear", "grm", "independent"):
            every_rank = [None] * world
            dist.all_gather_object(every_rank, received)
            results[f"bytes-{layout}"] = every_rank  # what each rank received for this layer
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)


def model_steps_worker(rank, world, cases, out_path):
    """model_step for each (dp, sp, layout, memory, aggregation, state_init) case; errors to out_path."""
    results = {}
    for case in cases:
        results["-".join(map(str, case))] = model_step(rank, world, *case)
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)


def model_step(rank, world, dp, sp, layout, memory, aggregation, state_init, conv_size=0):
    """One training step of the whole model under dp × sp against one process on the whole batch."""
    from mcdist.config import ParallelConfig
    from mcdist.model import MCLanguageModel
    from mcdist.parallel.mesh import build_mesh
    from mcdist.parallel.data_parallel import all_reduce_sum
    from mcdist.parallel.data_parallel import global_token_count
    from mcdist.parallel.model import parallelize

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, memory=memory, aggregation=aggregation,
                         state_init=state_init, segment_len=4, chunk_len=2, minibatch_len=2, top_k=2, inner_lr=0.1,
                         conv_size=conv_size)
    reference = MCLanguageModel(config).double()
    model = MCLanguageModel(config).double()
    model.load_state_dict(reference.state_dict())
    seq_len = 2 * sp * 4 * 2
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 32, (2 * dp, seq_len), generator=generator)
    labels = torch.randint(0, 32, (2 * dp, seq_len), generator=generator)
    labels[:, ::3] = -100

    def step(net):
        torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1).step()

    loss_ref = reference(ids, labels, impl="chunked").loss
    loss_ref.backward()
    reference_grads = [p.grad.clone() for p in reference.parameters()]
    step(reference)

    mesh = build_mesh(ParallelConfig(dp=dp, sp=sp, layout=layout))
    parallelize(model, mesh, layout)
    rows = slice(2 * mesh.dp_rank, 2 * mesh.dp_rank + 2)
    local_ids = shard_sequence(ids[rows], sp, mesh.sp_rank, layout)
    local_labels = shard_sequence(labels[rows], sp, mesh.sp_rank, layout)
    share = model.loss_sum(local_ids, local_labels, impl="chunked") / global_token_count(local_labels)
    share.backward()
    for p in model.parameters():  # the exact gradient: the plain sum over every rank (DDP's: test_data_parallel)
        dist.all_reduce(p.grad)
    loss = all_reduce_sum(share)
    errors = {"loss": relative_error(loss, loss_ref)}
    errors["grads"] = relative_error([p.grad for p in model.parameters()], reference_grads)  # the worst one
    step(model)
    errors["params"] = relative_error(list(model.parameters()), list(reference.parameters()))
    values = torch.tensor([errors["loss"], errors["grads"], errors["params"]], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return dict(zip(["loss", "grads", "params"], values.tolist()))


def failing_worker(rank, world, out_dir):
    """Rank 1 raises before a collective; every other rank must fail naming rank 1, not hang."""
    import os

    from mcdist.parallel.failure import guarded

    @guarded
    def body():
        if rank == 1:
            raise ValueError("planted failure")
        tensor = torch.ones(1)
        dist.all_reduce(tensor)

    try:
        body()
    except Exception as error:  # record what each rank saw
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as handle:
            handle.write(f"{type(error).__name__}: {error}")


def inference_worker(rank, world, cases, out_path):
    """For each (layout, memory, aggregation, state_init, prompt_len, new_tokens[, conv_size]): the relative error
    of the next-token logits of an SP Session (prefill + decode) against one process's full forward, over every
    step."""
    from mcdist.infer import Session
    from mcdist.model import MCLanguageModel

    results = {}
    for case in cases:
        layout, memory, aggregation, state_init, prompt_len, new_tokens = case[:6]
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, memory=memory,
                             aggregation=aggregation, state_init=state_init, segment_len=4, chunk_len=2,
                             minibatch_len=2, top_k=2, inner_lr=0.1, conv_size=case[6] if len(case) > 6 else 0)
        model = MCLanguageModel(config).double()
        ids = torch.randint(0, 32, (2, prompt_len + new_tokens), generator=torch.Generator().manual_seed(1))
        full = model(ids, impl="chunked").logits
        session = Session(model, sp=SPGroup(dist.group.WORLD, rank, world, tuple(range(world))), layout=layout,
                          impl="chunked")
        steps = [session.prefill(ids[:, :prompt_len])]
        steps += [session.decode(ids[:, t]) for t in range(prompt_len, prompt_len + new_tokens - 1)]
        error = relative_error(torch.stack(steps, 1), full[:, prompt_len - 1:-1])  # [B, new_tokens, vocab]
        counts = [torch.zeros(len(session.cache.layers), dtype=torch.float64) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([float(len(cache.segments)) for cache in session.cache.layers],
                                             dtype=torch.float64))
        held = torch.stack(counts)  # [rank, layer]
        every = torch.tensor([error], dtype=torch.float64)
        dist.all_reduce(every, op=dist.ReduceOp.MAX)
        results["-".join(map(str, case))] = {
            "error": float(every), "held": held.sum(0).tolist(),
            "imbalance": float((held.max(0).values - held.min(0).values).max()),
            "closed": [cache.position // config.segment_len for cache in session.cache.layers]}
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)


def rendezvous_worker(rank, world_size, out_dir):
    """Whether this rank finds its rendezvous port taken (by the store the driver holds), and a sum over ranks."""
    import os
    import socket

    import torch.distributed as dist

    port = int(os.environ["MASTER_PORT"])
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            held = False
        except OSError:
            held = True
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump({"port": port, "held": held, "sum": total.item(), "parent": os.getppid()}, handle)


def echo_then_cause_rank(rank, world_size, device, where):
    """After a collective, rank 0 raises first an error that only reports a peer's failure (as the trainer's
    "another rank could not resume" does); rank 1 raises its own cause a moment later."""
    import time

    from mcdist.parallel.failure import PEER_ERROR_PREFIX

    dist.all_reduce(torch.ones(1))  # both ranks past the group's set-up, as the trainer's agreement is
    if rank == 0:
        raise ValueError(f"{PEER_ERROR_PREFIX} failed; this rank only saw it")
    time.sleep(1.0)
    raise ValueError("rank 1's own cause")
