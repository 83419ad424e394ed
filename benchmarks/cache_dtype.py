"""What a bfloat16 decode cache costs in accuracy (prints a table, writes JSON; not a test).

    python benchmarks/cache_dtype.py --checkpoint DIR [--seq-lens 128,512,2048] [--batch 8] [--pairs N]
                                     [--out benchmarks/results/cache_dtype.json]

For each length L: a batch of MQAR sequences (the run's vocabulary; ``--pairs`` key-value pairs, default the
run's) is prefilled on its first half, and the second half is fed one token at a time (teacher forcing) twice:
with the cached segment states kept in float32 (the model's dtype) and in bfloat16
(``mcdist.readers.cast_cache``; each read widens them to float32). Reported per length: the relative error of the
decoded logits (‖bf16 − fp32‖ / ‖fp32‖ over all decoded positions), the fraction of positions whose argmax
differs, MQAR query accuracy over the decoded positions under each, and the bytes of the cached states.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from mcdist.checkpoint import CheckpointError, load_model
from mcdist.config import write_text_atomic
from mcdist.data.mqar import make_mqar_batch
from mcdist.infer import Session
from mcdist.readers import LayerCache, cast_cache


def _cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        if isinstance(layer, LayerCache):
            states = layer.states if isinstance(layer.states, tuple) else (layer.states,)
            total += sum(w.nbytes for w in states)
    return total


@torch.no_grad()
def decode_half(model, ids: torch.Tensor, dtype):
    """Logits [B, L − L/2, vocab] of the positions L/2 … L − 1, fed one at a time after a prefill of the rest."""
    half = ids.shape[1] // 2
    session = Session(model)
    steps = [session.prefill(ids[:, :half])]
    if dtype is not None:
        for layer in session.cache.layers:
            if isinstance(layer, LayerCache):
                cast_cache(layer, dtype)
    for t in range(half, ids.shape[1] - 1):
        steps.append(session.decode(ids[:, t]))
    return torch.stack(steps, 1), _cache_bytes(session.cache)


def measure(model, config, seq_len: int, batch: int, pairs: int, seed: int = 0) -> dict:
    ids, labels = make_mqar_batch(batch, seq_len, pairs, config.vocab_size, torch.Generator().manual_seed(seed))
    full, full_bytes = decode_half(model, ids, None)
    narrow, narrow_bytes = decode_half(model, ids, torch.bfloat16)
    scored = labels[:, ids.shape[1] // 2 - 1:ids.shape[1] - 1]  # the labels of the positions whose logits we have
    mask = scored != -100
    difference = (narrow.double() - full.double()).norm() / full.double().norm()
    return {"seq_len": seq_len, "batch": batch, "num_kv_pairs": pairs,
            "logits_rel_error": float(difference),
            "argmax_changed": float((narrow.argmax(-1) != full.argmax(-1)).double().mean()),
            "accuracy_float32": float((full.argmax(-1)[mask] == scored[mask]).double().mean()),
            "accuracy_bfloat16": float((narrow.argmax(-1)[mask] == scored[mask]).double().mean()),
            "queries": int(mask.sum()), "state_bytes_float32": full_bytes, "state_bytes_bfloat16": narrow_bytes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--seq-lens", default="128,512,2048")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/cache_dtype.json")
    args = parser.parse_args(argv)
    try:
        model, config = load_model(args.checkpoint)
        lengths = [int(part) for part in args.seq_lens.split(",")]
    except (CheckpointError, FileNotFoundError, ValueError) as error:
        print(f"cache_dtype: error: {error}", file=sys.stderr)
        return 2
    pairs = args.pairs
    if pairs is None:
        run_config = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "run_config.json")
        pairs = json.load(open(run_config))["train"]["num_kv_pairs"] if os.path.exists(run_config) else 8
    torch.set_num_threads(1)
    rows = [measure(model, config, length, args.batch, pairs) for length in lengths]
    print(f"{'L':>6} {'rel err':>9} {'argmax chg':>10} {'acc fp32':>9} {'acc bf16':>9} {'state MB fp32':>13} "
          f"{'bf16':>7}")
    for row in rows:
        print(f"{row['seq_len']:>6} {row['logits_rel_error']:>9.2e} {row['argmax_changed']:>10.4f} "
              f"{row['accuracy_float32']:>9.3f} {row['accuracy_bfloat16']:>9.3f} "
              f"{row['state_bytes_float32'] / 1e6:>13.2f} {row['state_bytes_bfloat16'] / 1e6:>7.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text_atomic(args.out, json.dumps({"checkpoint": os.path.abspath(args.checkpoint), "rows": rows},
                                           indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
