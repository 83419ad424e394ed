"""Worker of tests/parallel/test_packing_sp.py: packed documents under sequence parallelism against one process."""

import json

import torch
import torch.distributed as dist

from checks import relative_error  # inf, never NaN, on a NaN or inf: safe under max() and an all-reduce MAX
from mcdist.config import ModelConfig, ParallelConfig
from mcdist.model import MCLanguageModel
from mcdist.parallel.mesh import build_mesh
from mcdist.parallel.model import parallelize

# documents of a packed sequence of 96 tokens (C = 4): one-token, partial segments, several units long
LENGTHS = [5, 1, 23, 9, 3, 37, 2, 12, 4]


def packed_case(rank, world, layout, local_max, mixer):
    """Σ CE and every parameter's gradient (summed over the ranks) of the sp model's loss_sum on the packed
    sequence, against one process's plain forward of each document alone; and which positions each rank's
    document_share held."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, memory="gated", aggregation="grm",
                         segment_len=4, chunk_len=2, minibatch_len=2, conv_size=3, layer_pattern=mixer)
    reference = MCLanguageModel(config).double()
    model = MCLanguageModel(config).double()
    model.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(3)
    T = sum(LENGTHS)
    ids = torch.randint(0, 32, (1, T), generator=generator)
    labels = torch.randint(0, 32, (1, T), generator=generator)
    labels[:, ::4] = -100

    expected = torch.zeros((), dtype=torch.float64)
    first = 0
    for length in LENGTHS:  # the reference: every document alone, no cu_seqlens, no packing helper
        logits = reference(ids[:, first:first + length]).logits[0]
        expected = expected + torch.nn.functional.cross_entropy(logits, labels[0, first:first + length],
                                                                ignore_index=-100, reduction="sum")
        first += length
    expected.backward()

    mesh = build_mesh(ParallelConfig(sp=world, layout=layout))
    parallelize(model, mesh, layout)
    cu = torch.tensor([0] + list(torch.tensor(LENGTHS).cumsum(0)), dtype=torch.int32)
    part = model.loss_sum(ids, labels, cu_seqlens=cu, local_max=local_max)
    part.backward()
    total = part.detach().clone()
    dist.all_reduce(total)
    for p in model.parameters():
        dist.all_reduce(p.grad)
    with torch.no_grad():
        _, index = model.document_share(ids, cu, local_max=local_max)
    held = torch.zeros(T, dtype=torch.int64)
    held.index_add_(0, index[index >= 0], torch.ones(int((index >= 0).sum()), dtype=torch.int64))
    dist.all_reduce(held)
    errors = torch.tensor([relative_error(total, expected),
                           relative_error([p.grad for p in model.parameters()],
                                          [p.grad for p in reference.parameters()], joint=True)],
                          dtype=torch.float64)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    return {"loss": errors[0].item(), "grads": errors[1].item(), "held": held.tolist()}


def packed_cases_worker(rank, world, cases, out_path):
    results = {}
    for layout, local_max, mixer in cases:
        results[f"{layout}-{local_max}-{mixer}"] = packed_case(rank, world, layout, local_max, mixer)
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)
