"""The batch-inference job on this CPU (prints tables and writes JSON; not a test).

    python benchmarks/infer_job.py [--prompts 48] [--new-tokens 32] [--lengths 256,1024,4096]
                                   [--out benchmarks/results/infer_job.json]

Model: the make-run recipe's size (d_model 64, 2 layers, 2 heads of 32, gated memory, grm, segment_len 16),
float32, random weights (speed and bytes do not depend on training), ``impl="chunked"``, one thread per process.

1. **Throughput** of ``mcdist infer`` (:func:`mcdist.infer_batch.run_infer_job`) over ``--prompts`` prompts of
   mixed lengths (16 … 512 tokens), ``--new-tokens`` each, batch size 8, greedy: 1 replica (in the driver's
   process) and 2 replicas (two local processes). Prompts/s and tokens/s over the decoding time (the replicas
   ready to the last result) and over the whole run (start-up included).
2. **Decode latency per token vs context length**: one sequence prefilled to L tokens, then ``--new-tokens``
   decoded one at a time (``Session.decode``); the median per token, for the MC model and for the same model with
   ``mixer = "attention"`` (softmax attention with a KV cache).
3. **Cache bytes per sequence** at each L: measured (the sum of ``nbytes`` of every tensor the decode cache
   holds) and analytical, for the MC model and for the attention model's KV cache of the same width. MC per
   layer: ``N·H·D²`` cached states + ``2·N·H·D`` contexts (this rank's and all) + ``H·D²`` online state +
   ``H·D`` running context sum (+ the conv tail, none here), with ``N = ⌊L/C⌋``; attention per layer:
   ``2·L·H·D`` (keys and values); times 4 bytes (float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from mcdist.checkpoint import save_model  # noqa: E402
from mcdist.config import ModelConfig, write_text_atomic  # noqa: E402
from mcdist.infer import Session  # noqa: E402
from mcdist.infer_batch import InferOptions, run_infer_job  # noqa: E402
from mcdist.model import MCLanguageModel  # noqa: E402

CONFIG = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=2, memory="gated", aggregation="grm", segment_len=16,
              chunk_len=16)


def tensor_bytes(value) -> int:
    """The bytes of every tensor in ``value`` (a cache: dataclasses, tuples, lists of tensors)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if dataclasses.is_dataclass(value):
        return sum(tensor_bytes(getattr(value, item.name)) for item in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def analytical_bytes(config: ModelConfig, length: int, mixer: str) -> int:
    heads, dim = config.n_heads, config.d_model // config.n_heads
    if mixer == "attention":
        per_layer = 2 * length * heads * dim
    else:
        closed = length // config.segment_len
        per_layer = closed * heads * dim * dim + 2 * closed * heads * dim + heads * dim * dim + heads * dim
    return 4 * config.n_layers * per_layer


def throughput(folder: str, prompts: int, new_tokens: int) -> list:
    generator = torch.Generator().manual_seed(0)
    path = os.path.join(folder, "prompts.jsonl")
    with open(path, "w") as handle:
        for number in range(prompts):
            length = int(torch.randint(16, 513, (), generator=generator))
            ids = torch.randint(0, CONFIG["vocab_size"], (length,), generator=generator).tolist()
            handle.write(json.dumps({"id": number, "prompt_ids": ids}) + "\n")
    rows = []
    for replicas in (1, 2):
        out = os.path.join(folder, f"out-{replicas}.jsonl")
        summary = run_infer_job(os.path.join(folder, "checkpoint"), path, out, replicas=replicas, device="cpu",
                                options=InferOptions(max_new_tokens=new_tokens, batch_size=8, impl="chunked"),
                                log=lambda line: None)
        decode = summary["decode_seconds"]
        rows.append(dict(replicas=replicas, prompts=summary["written"], new_tokens=summary["new_tokens"],
                         decode_seconds=decode, seconds=summary["seconds"],
                         prompts_per_s=summary["written"] / decode, tokens_per_s=summary["new_tokens"] / decode,
                         tokens_per_s_whole_run=summary["new_tokens"] / summary["seconds"],
                         per_replica_tokens_per_s=[stats["tokens_per_s"] for stats in summary["per_replica"]]))
    return rows


@torch.no_grad()
def latency_and_bytes(length: int, new_tokens: int, mixer: str) -> dict:
    torch.manual_seed(0)
    config = ModelConfig(**CONFIG, mixer=mixer)
    model = MCLanguageModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, length + new_tokens))
    session = Session(model, impl="chunked")
    start = time.perf_counter()
    session.prefill(ids[:, :length])
    prefill_s = time.perf_counter() - start
    measured = tensor_bytes(session.cache)
    per_token = []
    for t in range(length, length + new_tokens):
        start = time.perf_counter()
        session.decode(ids[:, t])
        per_token.append(time.perf_counter() - start)
    return dict(mixer=mixer, context=length, prefill_s=prefill_s, decode_ms=statistics.median(per_token) * 1e3,
                cache_bytes=measured, cache_bytes_analytical=analytical_bytes(config, length, mixer))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lengths", default="256,1024,4096")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "infer_job.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mcdist-infer-bench-") as folder:
        config = ModelConfig(**CONFIG)
        torch.manual_seed(0)
        save_model(MCLanguageModel(config).eval(), config, os.path.join(folder, "checkpoint"))
        jobs = throughput(folder, args.prompts, args.new_tokens)
    print(f"{'replicas':>8} {'prompts':>7} {'new tokens':>10} {'decode s':>8} {'prompts/s':>9} {'tokens/s':>8} "
          f"{'tokens/s (whole run)':>20}")
    for row in jobs:
        print(f"{row['replicas']:>8} {row['prompts']:>7} {row['new_tokens']:>10} {row['decode_seconds']:>8.2f} "
              f"{row['prompts_per_s']:>9.2f} {row['tokens_per_s']:>8.1f} {row['tokens_per_s_whole_run']:>20.1f}")
    rows = []
    print(f"\n{'mixer':>9} {'context':>7} {'prefill s':>9} {'decode ms/token':>15} {'cache bytes':>11} "
          f"{'analytical':>10}")
    for length in map(int, args.lengths.split(",")):
        for mixer in ("mc", "attention"):
            row = latency_and_bytes(length, args.new_tokens, mixer)
            rows.append(row)
            print(f"{mixer:>9} {length:>7} {row['prefill_s']:>9.3f} {row['decode_ms']:>15.2f} "
                  f"{row['cache_bytes']:>11,} {row['cache_bytes_analytical']:>10,}", flush=True)
    report = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
                  model=CONFIG, dtype="float32", threads_per_process=1, throughput=jobs, decode=rows)
    write_text_atomic(args.out, json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
