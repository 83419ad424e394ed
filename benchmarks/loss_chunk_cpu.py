"""Peak memory and time of one training forward + backward with the logits made whole or in chunks
(``train.loss_chunk``), on the CPU. Each setting runs in a fresh process (the peak RSS of a process only grows).

    python benchmarks/loss_chunk_cpu.py --out benchmarks/results/loss_chunk_cpu.json

Prints one line per setting and writes the JSON report; the baseline (``chunk 0``: the whole logits) runs in the
same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def one(vocab: int, tokens: int, chunk: int) -> dict:
    import torch

    from mcdist.config import ModelConfig
    from mcdist.model import MCLanguageModel

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = MCLanguageModel(ModelConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=2, segment_len=64,
                                        chunk_len=16))  # CPU tensors: impl 'auto' is the chunked path
    ids = torch.randint(0, vocab, (1, tokens))
    labels = torch.randint(0, vocab, (1, tokens))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    total = model.loss_sum(ids, labels, chunk_tokens=chunk)
    total.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"vocab": vocab, "tokens": tokens, "chunk": chunk, "loss": float(total) / tokens, "seconds": seconds,
            "peak_rss_mib": peak / 1024, "growth_mib": (peak - before) / 1024}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--chunks", default="0,2048,512", help="loss_chunk values; 0 = the whole logits")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(one(args.vocab, args.tokens, int(args.child))))
        return 0
    rows = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        done = subprocess.run([sys.executable, __file__, "--vocab", str(args.vocab), "--tokens", str(args.tokens),
                               "--child", str(chunk)], capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"chunk {chunk:>6}: loss {row['loss']:.6f}  {row['seconds']:.2f} s  peak RSS {row['peak_rss_mib']:.0f} "
              f"MiB (+{row['growth_mib']:.0f} MiB in the step)", flush=True)
    base = rows[0]
    for row in rows[1:]:
        print(f"chunk {row['chunk']}: step memory {row['growth_mib'] / max(base['growth_mib'], 1e-9):.2f}× the "
              f"whole logits', time {row['seconds'] / base['seconds']:.2f}×")
    if args.out:
        report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
                  "rows": rows}
        from mcdist.config import write_text_atomic

        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
