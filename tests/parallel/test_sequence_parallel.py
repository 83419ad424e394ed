"""Sequence parallelism on real gloo processes: exact against one process, no hangs, measured bytes."""

import json
import time

import pytest
import torch

import sp_workers
from checks import assert_within
from mcdist.config import AGGREGATIONS, MEMORY_KINDS, STATE_INITS
from mcdist.parallel.layout import check_sequence_length, rank_pieces, shard_sequence, unshard_sequence
from mcdist.parallel.spawn import free_ports, spawn

VARIANTS = [f"{layout}-{m}-{a}-{s}" for layout in ("contiguous", "zigzag") for m in MEMORY_KINDS
            for a in AGGREGATIONS for s in STATE_INITS]


@pytest.fixture(scope="module")
def layer_results(tmp_path_factory):
    """Every variant, computed once per (ranks, dtype) in one spawned job."""
    cache = {}

    def get(world, dtype):
        if (world, dtype) not in cache:
            path = tmp_path_factory.mktemp("sp") / f"layer-{world}-{dtype}.json"
            spawn(sp_workers.layer_cases_worker, world, ["contiguous", "zigzag"], dtype, str(path),
                  timeout_s=900)
            cache[(world, dtype)] = json.loads(path.read_text())
        return cache[(world, dtype)]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("world", [2, 4])
def test_sp_layer_equals_one_process_float64(layer_results, world, variant):
    errors = layer_results(world, "float64")[variant]  # output, input grad, params jointly, worst param
    assert_within(errors, 1e-10, variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sp_layer_equals_one_process_float32(layer_results, world, variant):
    out_error, input_error, joint, worst = layer_results(world, "float32")[variant]
    # As in tests/model/test_layer.py: a parameter whose gradient is a sum with heavy cancellation sits at
    # float32 noise on its own scale, so single parameters get 1e-4 and all parameters together 1e-5.
    assert_within({"output": out_error, "input gradient": input_error, "parameter gradients": joint}, 1e-5, variant)
    assert_within(worst, 1e-4, f"{variant}: the worst single parameter gradient")


STEP_CASES = [
    (2, 2, "zigzag", "gated", "grm", "checkpoint"),
    (2, 2, "contiguous", "dla", "ssc", "independent"),
    (1, 4, "zigzag", "linear", "soup", "checkpoint"),
    (1, 4, "contiguous", "titans", "residual", "checkpoint"),
    # the short convolution: each piece's first tokens read the last conv_size − 1 tokens of another rank's piece
    (2, 2, "zigzag", "gated", "grm", "checkpoint", 4),
    (1, 4, "zigzag", "dla", "ssc", "independent", 3),
    (2, 2, "contiguous", "linear", "soup", "checkpoint", 5),
    # swla: each piece's first token also writes the (k, v) of the token before it, held by another rank
    (1, 4, "zigzag", "swla", "grm", "checkpoint", 3),
]


@pytest.fixture(scope="module")
def step_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("steps") / "steps.json"
    spawn(sp_workers.model_steps_worker, 4, STEP_CASES, str(path), timeout_s=600)
    return json.loads(path.read_text())


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda case: "-".join(map(str, case)))
def test_training_step_equals_one_process(step_results, case):
    """dp × sp on 4 processes: loss, reduced gradients and the AdamW step equal one process on the batch."""
    errors = step_results["-".join(map(str, case))]
    assert sorted(errors) == ["grads", "loss", "params"], errors
    assert_within(errors, 1e-10, "-".join(map(str, case)))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [2, 4])
def test_ring_bytes_equal_the_analytical_count(layer_results, world, layout):
    """docs/distributed.md §5: each rank receives exactly the other ranks' states it can see (with their contexts), no more."""
    received = layer_results(world, "float64")[f"bytes-{layout}"]
    # layer_case: B = 2, H = 2, D = 4, C = 4, L = 2·world·C·2, float64
    B, H, D, C = 2, 2, 4, 4
    state = B * H * (D * D + D) * 8  # one state + its context
    seq_len = 2 * world * C * 2
    segments = [[index for start, length in rank_pieces(seq_len, world, rank, layout)
                 for index in range(start // C, (start + length) // C)] for rank in range(world)]
    last = [max((start + length - 1) // C for start, length in rank_pieces(seq_len, world, rank, layout))
            for rank in range(world)]
    for rank in range(world):
        others = [j for owner in range(world) if owner != rank for j in segments[owner]]
        visible = sum(j < last[rank] for j in others)
        read_by_another = sum(any(j < last[o] for o in range(world) if o != rank) for j in segments[rank])
        assert received[rank].get("ring", 0) == visible * state, rank
        # backward: the block again and its gradient accumulator, then the finished gradients of this rank's
        # own states that other ranks read, coming home
        assert received[rank].get("ring_backward", 0) == (2 * visible + read_by_another) * state, rank


def test_failing_rank_is_named_and_nobody_hangs(tmp_path):
    start = time.monotonic()
    spawn(sp_workers.failing_worker, 3, str(tmp_path), timeout_s=120, collective_timeout_s=5)
    assert time.monotonic() - start < 90
    seen = {path.name: path.read_text() for path in tmp_path.glob("rank*.txt")}
    assert sorted(seen) == ["rank0.txt", "rank1.txt", "rank2.txt"]
    assert "planted failure" in seen["rank1.txt"]
    for name in ("rank0.txt", "rank2.txt"):
        assert seen[name].startswith("PeerFailure") and "rank 1" in seen[name], seen[name]


def test_an_echo_raised_first_does_not_hide_the_cause():
    """A rank whose error only reports a peer's (recorded first, it once made the cause's rank a PeerFailure, and
    the job raised the echo: seen under load in test_fault_killed_ranks): the job raises the cause. Rank 1 raises
    a second after rank 0 has ended: it also needs spawn's grace (its report was lost about one run in two when
    torch's join saw rank 0's exit first and terminated rank 1 at once)."""
    from mcdist.runners.spawned import run_spawned

    with pytest.raises(ValueError, match="rank 1's own cause"):
        run_spawned(sp_workers.echo_then_cause_rank, 2, what="the echo test", timeout_s=120)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_and_unshard_are_inverse(world, layout):
    x = torch.arange(2 * world * 6).reshape(1, -1)
    slices = [shard_sequence(x, world, rank, layout) for rank in range(world)]
    assert torch.equal(unshard_sequence(slices, layout), x)
    covered = sorted(start for rank in range(world) for start, _ in rank_pieces(x.shape[1], world, rank, layout))
    assert len(covered) == len(set(covered))


def test_bad_lengths_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"L = 100 .* 2·P·C = 64"):
        check_sequence_length(100, 4, 8, "zigzag")
    with pytest.raises(ValueError, match=r"L = 30 .* P·C = 16"):
        check_sequence_length(30, 2, 8, "contiguous")


def test_spawn_s_rendezvous_is_a_store_its_driver_holds(tmp_path, monkeypatch):
    """spawn probes no port (a probed port can be taken before a rank binds it): the ranks join a store this
    process holds, on one port that is taken for the whole run, and their group works."""
    import os

    import mcdist.parallel.spawn as spawn_module

    def no_probe(count):
        raise AssertionError("spawn probed a port")

    monkeypatch.setattr(spawn_module, "free_ports", no_probe)
    spawn(sp_workers.rendezvous_worker, 3, str(tmp_path), timeout_s=120)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(3)]
    assert len({rank["port"] for rank in ranks}) == 1 and all(rank["held"] for rank in ranks), ranks
    assert all(rank["sum"] == 6.0 and rank["parent"] == os.getpid() for rank in ranks), ranks


def test_free_ports_are_distinct_and_unbound():
    """Every rendezvous of a job and a Ray head's four ports come from one call: no port twice, all bindable."""
    import socket

    for _ in range(50):
        ports = free_ports(4)
        assert len(set(ports)) == 4, ports
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
