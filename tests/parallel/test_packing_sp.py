"""Packed documents under sequence parallelism (docs/packing.md): short documents computed whole on one rank, long
ones sharded, the ranks' parts == every document alone in one process (gloo processes, float64)."""

import json

import pytest

import packing_workers
from mcdist.packing import document_owners, local_document_limit
from mcdist.parallel.spawn import spawn

# local_max None: the default limit; 0: every document sharded (padded to the layout's unit); 12: a mixture
CASES = [(layout, local_max, "") for layout in ("zigzag", "contiguous") for local_max in (None, 0, 12)]
CASES += [("zigzag", 12, "mc,attention")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cache = {}

    def get(world):
        if world not in cache:
            path = tmp_path_factory.mktemp("packed_sp") / f"{world}.json"
            spawn(packing_workers.packed_cases_worker, world, CASES, str(path), timeout_s=600)
            cache[world] = json.loads(path.read_text())
        return cache[world]

    return get


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case)))
def test_packed_loss_and_gradients_under_sp_equal_documents_alone(results, world, case):
    layout, local_max, mixer = case
    result = results(world)[f"{layout}-{local_max}-{mixer}"]
    assert result["loss"] < 1e-10, result
    assert result["grads"] < 1e-10, result
    assert result["held"] == [1] * sum(packing_workers.LENGTHS)  # every position computed by exactly one rank


def test_documents_are_dealt_longest_first_to_the_least_loaded_rank():
    lengths = [5, 1, 23, 9, 3, 37, 2, 12, 4]
    owners = document_owners(lengths, 2, 12)
    assert owners[2] == owners[5] == -1  # longer than the limit: sharded
    # 12 → 0, 9 → 1, 5 → 1, 4 → 0, 3 → 1, 2 → 0, 1 → 1 (the least loaded; ties to the lower rank)
    assert owners == [1, 1, -1, 1, 1, -1, 0, 0, 0]
    loads = [sum(length for length, owner in zip(lengths, owners) if owner == rank) for rank in (0, 1)]
    assert loads == [18, 18]
    assert document_owners([3, 2, 1], 4, 8) == [-1, -1, -1]  # fewer short documents than ranks: all sharded
    assert document_owners([3, 2, 1, 40], 4, 8) == [0, 1, 2, -1]  # a sharded one keeps the idle rank busy
    assert local_document_limit(96, 2, 16) == 24 and local_document_limit(96, 4, 32) == 32
