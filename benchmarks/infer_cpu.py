"""Inference on the CPU: prefill a prompt, then decode token by token (mcdist.infer.Session), beside the naive
baseline that runs the whole forward again for every new token (prints a table and writes JSON; not a test).

    python benchmarks/infer_cpu.py [--lengths 4096,16384,65536] [--tokens 16] [--aggregations grm,ssc,none]
                                   [--out benchmarks/results/infer_cpu.json]

Model: ``ModelConfig()`` (d_model 128, 2 layers, 2 heads of 64, linear memory, checkpoint) with segment_len 256
and chunk_len 64, float32, batch 1, ``impl="chunked"``, one thread. For each prompt length L: the prefill time,
the median decode time per token over ``--tokens`` tokens (the prompt's context grows from L), and the time of
one full forward over L + 1 tokens (what producing the next token costs without a cache). The ratio is
forward / decode: how many times cheaper a token is with the cache. Decoding reads every cached state (O(L/C)
per token); the forward re-reads the whole prompt (O(L²/C)).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from mcdist.config import ModelConfig  # noqa: E402
from mcdist.infer import Session  # noqa: E402
from mcdist.model import MCLanguageModel  # noqa: E402


def measure(aggregation: str, length: int, tokens: int) -> dict:
    torch.manual_seed(0)
    model = MCLanguageModel(ModelConfig(aggregation=aggregation, segment_len=256, chunk_len=64)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, length + tokens))
    session = Session(model, impl="chunked")
    start = time.perf_counter()
    session.prefill(ids[:, :length])
    prefill_s = time.perf_counter() - start
    per_token = []
    for t in range(length, length + tokens):
        start = time.perf_counter()
        session.decode(ids[:, t])
        per_token.append(time.perf_counter() - start)
    with torch.no_grad():
        start = time.perf_counter()
        full = model(ids[:, :length + 1], impl="chunked").logits
        forward_s = time.perf_counter() - start
    # the cache's answer for the token after position `length` is the forward's last row: same numbers
    check = Session(model, impl="chunked")
    check.prefill(ids[:, :length])
    error = float((check.decode(ids[:, length]) - full[:, -1]).abs().max())
    decode_ms = statistics.median(per_token) * 1e3
    return dict(aggregation=aggregation, prompt=length, tokens=tokens, prefill_s=prefill_s, decode_ms=decode_ms,
                forward_next_token_s=forward_s, speedup=forward_s * 1e3 / decode_ms, max_logit_diff=error,
                cached_states=session.cache.layers[0].states.shape[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--aggregations", default="grm,ssc,none")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "infer_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"{'aggregation':>11} {'prompt':>7} {'prefill s':>9} {'decode ms/token':>15} {'forward s':>9} "
          f"{'forward/decode':>14} {'max |diff|':>10}")
    for aggregation in args.aggregations.split(","):
        for length in map(int, args.lengths.split(",")):
            row = measure(aggregation, length, args.tokens)
            rows.append(row)
            print(f"{aggregation:>11} {length:>7} {row['prefill_s']:>9.2f} {row['decode_ms']:>15.2f} "
                  f"{row['forward_next_token_s']:>9.2f} {row['speedup']:>13.0f}x {row['max_logit_diff']:>10.1e}",
                  flush=True)
    report = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), torch=torch.__version__,
                  threads=1, date=time.strftime("%Y-%m-%d"), rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    temporary = args.out + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(report, handle, indent=1)
    os.replace(temporary, args.out)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
