"""The attention baseline under sequence parallelism on real gloo processes (docs/math.md, "Attention baseline"):
ring attention over this rank's pieces gives the logits and every gradient one process gives, and an SP Session
(the KV cache split over the ranks) gives the full forward's next-token logits."""

import json

import pytest

import attention_workers
from checks import assert_within
from mcdist.parallel.spawn import spawn

# (layout, mixers, sequence length): 16 = 2·P·C at P = 2, C = 4, 32 at P = 4
FORWARD = {2: [("zigzag", "attention", 16), ("contiguous", "attention", 16), ("zigzag", "mc,attention", 16),
               ("contiguous", "attention,mc", 24)],
           4: [("zigzag", "attention", 32), ("contiguous", "attention", 16), ("zigzag", "attention,mc", 32)]}
# (layout, mixers, prompt, new tokens): the tail past the layout's unit and the too-short prompt 2 are decoded
DECODE = {2: [("zigzag", "attention", 19, 6), ("contiguous", "mc,attention", 16, 5), ("zigzag", "attention", 2, 5)],
          4: [("zigzag", "attention,mc", 37, 5), ("contiguous", "attention", 19, 6)]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for world in (2, 4):
        path = tmp_path_factory.mktemp("attention") / f"attention-{world}.json"
        spawn(attention_workers.attention_worker, world, FORWARD[world], DECODE[world], str(path), timeout_s=300)
        out[world] = json.loads(path.read_text())
    return out


def _id(item):
    return "-".join(map(str, item)) if isinstance(item, tuple) else f"P{item}"


@pytest.mark.parametrize("world,case", [(w, c) for w, cases in FORWARD.items() for c in cases], ids=_id)
def test_ring_attention_equals_one_process(results, world, case):
    errors = results[world]["-".join(map(str, case))]
    assert len(errors) > 2, errors  # the logits and the parameters' gradients were all compared
    assert_within(errors, 1e-10, f"P = {world}, {case}: relative errors")


@pytest.mark.parametrize("world,case", [(w, c) for w, cases in DECODE.items() for c in cases], ids=_id)
def test_sp_decode_equals_full_forward(results, world, case):
    result = results[world]["-".join(map(str, case))]
    assert_within(result["error"], 1e-10, f"P = {world}, {case}: relative error of the logits")
    per_layer = list(zip(*result["held"]))  # [layer][rank]
    assert per_layer, result
    for counts in per_layer:  # every token's key on exactly one rank, the ranks balanced to within one
        assert sum(counts) == result["tokens"], result
        assert max(counts) - min(counts) <= 1, result
