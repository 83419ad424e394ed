"""Inference under sequence parallelism (docs/inference.md) on real gloo processes: an SP Session's prefill + decode gives
the logits one process's full forward gives, and every closed segment is held by exactly one rank, the ranks
holding equal numbers give or take one."""

import json

import pytest

import sp_workers
from checks import assert_within
from mcdist.config import AGGREGATIONS
from mcdist.parallel.spawn import spawn

# prompt 16 = 2·P·C at P = 2, C = 4 (prefilled by SP); 19 adds a tail the decode step takes; 2 is too short to
# shard. New tokens cross several segment ends, so segments close while decoding and land on both ranks.
CASES = [("zigzag", memory, aggregation, "checkpoint", 19, 10) for memory in ("linear", "gated")
         for aggregation in AGGREGATIONS]
CASES += [("contiguous", "gated", "grm", "independent", 16, 9), ("zigzag", "linear", "ssc", "independent", 2, 12),
          ("zigzag", "dla", "soup", "checkpoint", 17, 9), ("zigzag", "titans", "grm", "checkpoint", 16, 9),
          ("contiguous", "titans", "residual", "independent", 19, 6), ("zigzag", "dla", "ssc", "independent", 16, 8)]


# 4 ranks: 37 = 2·P·C + 5 (zigzag), 19 = P·C + 3 (contiguous); the last piece's owner is rank 0 under zigzag and
# rank 3 under contiguous
CASES_4 = [("zigzag", "gated", "grm", "checkpoint", 37, 9), ("contiguous", "linear", "ssc", "checkpoint", 19, 9),
           ("zigzag", "titans", "soup", "checkpoint", 32, 6), ("zigzag", "gated", "grm", "checkpoint", 35, 7, 4)]
# the short convolution (last element: conv_size): the prefill's pieces read across ranks, decoding reads the tail
CASES += [("zigzag", "gated", "ssc", "checkpoint", 19, 8, 3), ("contiguous", "dla", "grm", "checkpoint", 16, 6, 4)]
# swla: the cache keeps the last prompt token's (k, v), which the last piece's owner sends to every rank
CASES += [("zigzag", "swla", "grm", "checkpoint", 19, 8, 3), ("contiguous", "swla", "residual", "independent", 16, 9)]
CASES_4 += [("contiguous", "swla", "ssc", "checkpoint", 16, 7)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case's result, per number of ranks, from one spawned job each."""
    out = {}
    for world, cases in ((2, CASES), (4, CASES_4)):
        path = tmp_path_factory.mktemp("infer") / f"inference-{world}.json"
        spawn(sp_workers.inference_worker, world, cases, str(path), timeout_s=600)
        out[world] = json.loads(path.read_text())
    return out


@pytest.mark.parametrize("world,case", [(2, case) for case in CASES] + [(4, case) for case in CASES_4],
                         ids=lambda item: "-".join(map(str, item)) if isinstance(item, tuple) else f"P{item}")
def test_sp_session_equals_full_forward(results, world, case):
    result = results[world]["-".join(map(str, case))]
    assert_within(result["error"], 1e-10, f"{case}: relative error of the logits")
    assert result["held"] == [float(n) for n in result["closed"]], result  # each closed segment on one rank
    assert result["imbalance"] <= 1, result  # new segments go to the rank holding the fewest
