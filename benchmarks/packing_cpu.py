"""Packed documents vs one document at equal tokens: forward + backward time (prints a table, writes JSON; not a
test).

    python benchmarks/packing_cpu.py [--tokens 4096] [--docs 1,8,64] [--repeats 3] [--out benchmarks/results/packing_cpu.json]
    python benchmarks/packing_cpu.py --sp 2 [--tokens 8192] [--docs 64] [--out benchmarks/results/packing_sp_cpu.json]

One sequence of ``--tokens`` tokens through a 2-layer model (gated memory, grm, d_model 64, C = 64, chunked
PyTorch on this CPU, one thread), as one document, and as N documents (``cu_seqlens``) of equal lengths and of
random lengths (drawn with a fixed seed, each at least one segment). The median of ``--repeats`` timed runs after
one warm-up; the ratio is against the one-document run of the same sequence in the same process. Packing runs
each length bucket as a batch of its documents (mcdist.packing), so the cost beyond one document is the padding
to each bucket's longest document and the per-bucket launch.

``--sp P``: the same model sequence-parallel over P gloo processes (zigzag, one thread each), ``loss_sum`` fwd+bwd
of the packed sequence of N random-length documents (the first of ``--docs``), two ways side by side: every
document sharded over the group, padded to the layout's unit 2·P·C (``local_max = 0``, what mcdist did before),
and the default share (documents up to ``mcdist.packing.local_document_limit`` computed whole by one rank, the rest
sharded). The slowest rank's median; and the one-document sequence at sp = P for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from mcdist.config import ModelConfig, write_text_atomic
from mcdist.model import MCLanguageModel


def lengths_for(tokens: int, docs: int, random: bool, segment: int) -> list[int]:
    if docs == 1:
        return [tokens]
    if not random:
        base = [tokens // docs] * docs
        base[-1] += tokens - sum(base)
        return base
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(docs, generator=generator) + 0.1
    raw = (weights / weights.sum() * (tokens - docs * segment)).floor().long() + segment
    raw[-1] += tokens - int(raw.sum())
    return raw.tolist()


def time_step(model, ids, cu, repeats: int) -> float:
    def step():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, cu_seqlens=cu)
        out.loss.backward()

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sp_worker(rank, world, tokens, docs, repeats, out_path):
    import torch.distributed as dist

    from mcdist.config import ParallelConfig
    from mcdist.parallel.layout import shard_sequence
    from mcdist.parallel.mesh import build_mesh
    from mcdist.parallel.model import parallelize

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, memory="gated", aggregation="grm",
                         segment_len=64, chunk_len=32)
    model = MCLanguageModel(config)
    parallelize(model, build_mesh(ParallelConfig(sp=world, layout="zigzag")), "zigzag")
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(1))
    lengths = lengths_for(tokens, docs, True, config.segment_len)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    local = shard_sequence(ids, world, rank, "zigzag")

    def timed(step):
        step()
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        return float(slowest[0])

    def packed(local_max):
        def step():
            model.zero_grad(set_to_none=True)
            model.loss_sum(ids, ids, cu_seqlens=cu, local_max=local_max).backward()
        return step

    def one_document():
        model.zero_grad(set_to_none=True)
        model.loss_sum(local, local).backward()

    rows = [{"case": "one document", "seconds": timed(one_document)},
            {"case": "every document sharded (local_max 0)", "seconds": timed(packed(0))},
            {"case": "default share", "seconds": timed(packed(None))}]
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump({"rows": rows, "lengths": lengths, "config": config.to_dict()}, handle)


def main_sp(args) -> int:
    import tempfile

    from mcdist.packing import local_document_limit
    from mcdist.parallel.spawn import spawn

    docs = int(args.docs.split(",")[0])
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "sp.json")
        spawn(_sp_worker, args.sp, args.tokens, docs, args.repeats, path, timeout_s=1800)
        with open(path) as handle:
            result = json.load(handle)
    rows = result["rows"]
    sharded = rows[1]["seconds"]
    for row in rows:
        row["ratio_to_sharded"] = row["seconds"] / sharded
    limit = local_document_limit(args.tokens, args.sp, 2 * args.sp * 64)
    print(f"sp = {args.sp} (zigzag), fwd+bwd of {args.tokens} tokens, {docs} random-length documents "
          f"({min(result['lengths'])}–{max(result['lengths'])} tokens; whole on one rank up to {limit}), "
          f"slowest rank's median of {args.repeats}:")
    for row in rows:
        print(f"  {row['case']:<38} {row['seconds'] * 1e3:8.1f} ms  x{row['ratio_to_sharded']:.2f} of sharded")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text_atomic(args.out, json.dumps({"tokens": args.tokens, "sp": args.sp, "documents": docs,
                                            "local_limit": limit, **result}, indent=1) + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--docs", default="1,8,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/packing_cpu.json, "
                        "with --sp packing_sp_cpu.json)")
    parser.add_argument("--sp", type=int, default=0, help="sequence-parallel ranks (gloo processes); 0: one process")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = f"benchmarks/results/packing{'_sp' if args.sp else ''}_cpu.json"
    if args.sp:
        return main_sp(args)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, memory="gated", aggregation="grm",
                         segment_len=64, chunk_len=32)
    model = MCLanguageModel(config)
    ids = torch.randint(0, 256, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    rows = []
    baseline = time_step(model, ids, None, args.repeats)
    rows.append({"documents": 1, "lengths": "one", "seconds": baseline, "ratio": 1.0})
    for docs in [int(part) for part in args.docs.split(",") if int(part) > 1]:
        for random in (False, True):
            lengths = lengths_for(args.tokens, docs, random, config.segment_len)
            cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
            seconds = time_step(model, ids, cu, args.repeats)
            rows.append({"documents": docs, "lengths": "random" if random else "equal", "seconds": seconds,
                         "ratio": seconds / baseline, "longest": max(lengths), "shortest": min(lengths)})
    print(f"fwd+bwd of {args.tokens} tokens, median of {args.repeats} (one thread):")
    for row in rows:
        print(f"  {row['documents']:>4} documents ({row['lengths']:>6}): {row['seconds'] * 1e3:8.1f} ms  "
              f"x{row['ratio']:.2f} of one document")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text_atomic(args.out, json.dumps({"tokens": args.tokens, "config": config.to_dict(), "rows": rows},
                                           indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
