"""Decoding prompts of different lengths in one batch (docs/inference.md, "Batching"): each row decodes exactly as
it would alone. The reference is one prompt at a time through a Session (itself tested against the full forward
in test_inference.py); it shares nothing with the stacking of caches."""

import itertools

import pytest
import torch

from checks import assert_rel_close
from mcdist.config import AGGREGATIONS, MEMORY_KINDS, STATE_INITS, ModelConfig
from mcdist.infer import Request, Session, complete, generate, sample_next
from mcdist.model import DecodeCache, MCLanguageModel
from mcdist.readers import select_cache_rows, stack_caches

LENGTHS = (3, 11, 7, 15)  # equal mod segment_len 4: 0, 2, 1 and 3 closed segments


def tiny_model(memory="gated", aggregation="grm", state_init="checkpoint", **overrides):
    torch.manual_seed(0)
    fields = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, memory=memory, aggregation=aggregation,
                  state_init=state_init, segment_len=4, chunk_len=2, minibatch_len=2, top_k=2, inner_lr=0.1)
    return MCLanguageModel(ModelConfig(**{**fields, **overrides})).double()


def alone_logits(model, prompt, later):
    """Next-token logits after the prompt and after each later token, for one sequence alone [1 + n, vocab]."""
    session = Session(model)
    steps = [session.prefill(torch.tensor([prompt]))]
    steps += [session.decode(torch.tensor([token])) for token in later]
    return torch.cat(steps)


CASES = [(memory, aggregation, state_init, 0) for memory, aggregation, state_init in
         itertools.product(MEMORY_KINDS, AGGREGATIONS, STATE_INITS)]
CASES += [("gated", aggregation, "checkpoint", 3) for aggregation in AGGREGATIONS]


@pytest.mark.parametrize("memory,aggregation,state_init,conv", CASES)
def test_stacked_caches_decode_as_each_prompt_alone(memory, aggregation, state_init, conv):
    model = tiny_model(memory, aggregation, state_init, conv_size=conv)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 32, (n,), generator=generator).tolist() for n in LENGTHS]
    later = torch.randint(0, 32, (len(LENGTHS), 9), generator=generator)  # 9 tokens: two more segments close
    expected = [alone_logits(model, prompt, row.tolist()) for prompt, row in zip(prompts, later)]

    sessions = [Session(model) for _ in prompts]
    first = torch.cat([s.prefill(torch.tensor([p])) for s, p in zip(sessions, prompts)])
    cache = DecodeCache([stack_caches([s.cache.layers[i] for s in sessions], 4) for i in range(2)])
    assert cache.layers[0].pad.tolist() == [3, 1, 2, 0]
    steps = [first]
    with torch.no_grad():
        for t in range(later.shape[1]):
            steps.append(model(later[:, t:t + 1], cache=cache).logits[:, -1])
    actual = torch.stack(steps, 1)  # [B, 1 + n, vocab]
    for row in range(len(prompts)):
        assert_rel_close(actual[row], expected[row], 1e-10, f"row {row} (prompt of {LENGTHS[row]} tokens)")


def test_rows_leave_the_batch_and_the_rest_decode_on():
    model = tiny_model("titans", "ssc", "checkpoint")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    later = [[5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6], [7, 7, 7, 7, 7, 7]]
    sessions = [Session(model) for _ in prompts]
    for s, p in zip(sessions, prompts):
        s.prefill(torch.tensor([p]))
    cache = DecodeCache([stack_caches([s.cache.layers[i] for s in sessions], 4) for i in range(2)])
    with torch.no_grad():
        for t in range(3):
            model(torch.tensor([[row[t]] for row in later]), cache=cache)
        keep = torch.tensor([0, 2])  # the middle row finished
        cache.layers = [select_cache_rows(layer, keep) for layer in cache.layers]
        tail = torch.stack([model(torch.tensor([[later[0][t]], [later[2][t]]]), cache=cache).logits[:, -1]
                            for t in range(3, 6)], 1)
    for j, row in enumerate((0, 2)):
        assert_rel_close(tail[j], alone_logits(model, prompts[row], later[row])[4:], 1e-10, f"row {row}")


def test_caches_at_different_points_of_a_segment_refuse_to_stack():
    model = tiny_model()
    sessions = [Session(model), Session(model)]
    sessions[0].prefill(torch.tensor([[1, 2, 3]]))
    sessions[1].prefill(torch.tensor([[1, 2, 3, 4]]))
    with pytest.raises(ValueError, match="mod 4"):
        stack_caches([s.cache.layers[0] for s in sessions], 4)


@pytest.mark.parametrize("model_kind", ["mc", "attention", "hybrid"])
def test_complete_equals_one_request_at_a_time(model_kind):
    extra = {"mc": {}, "attention": {"mixer": "attention"}, "hybrid": {"layer_pattern": "mc,attention"}}[model_kind]
    model = tiny_model("gated", "grm", "checkpoint", **extra)
    generator = torch.Generator().manual_seed(3)
    requests = []
    for number, length in enumerate((3, 7, 5, 11, 3, 9, 15)):
        prompt = torch.randint(0, 32, (length,), generator=generator).tolist()
        sampled = number % 2 == 1
        requests.append(Request(prompt, max_new_tokens=3 + number, temperature=0.8 if sampled else 0.0,
                                top_k=5 if number == 3 else 0, top_p=0.9 if number == 5 else 1.0,
                                seed=100 + number))
    together = complete(model, requests, max_batch=3)
    for request, completion in zip(requests, together):
        (alone,) = complete(model, [request])
        assert completion == alone
        assert completion.finish_reason == "length" and len(completion.new_ids) == request.max_new_tokens
    greedy = requests[0]
    expected = generate(Session(model), torch.tensor([greedy.prompt_ids]), greedy.max_new_tokens)[0].tolist()
    assert together[0].new_ids == expected


def test_stop_sequences_end_a_continuation():
    model = tiny_model()
    prompt = [1, 2, 3, 4, 5]
    (free,) = complete(model, [Request(prompt, max_new_tokens=8)])
    stop = free.new_ids[2:4]
    (stopped,) = complete(model, [Request(prompt, max_new_tokens=8, stop_ids=[[31, 31, 31], stop])])
    first = next(i for i in range(2, 9) if free.new_ids[i - 2:i] == stop)  # the first place the stop ends
    assert stopped == type(stopped)(free.new_ids[:first], "stop")


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample_next(logits, temperature=1.0, top_p=0.75, generator=torch.Generator().manual_seed(s)))
            for s in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    seen = {int(sample_next(logits, temperature=1.0, top_p=0.1, generator=torch.Generator().manual_seed(s)))
            for s in range(50)}
    assert seen == {0}  # the most likely id is always kept
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, temperature=1.0, top_p=0.0)


def test_bfloat16_cache_stays_close_and_halves_the_states():
    model = tiny_model().float()
    prompt = list(range(1, 30))
    full, half = Session(model), Session(model)
    a = full.prefill(torch.tensor([prompt]))
    half.prefill(torch.tensor([prompt]))
    for layer in half.cache.layers:
        from mcdist.readers import cast_cache
        cast_cache(layer, torch.bfloat16)
    b = half._logits(model.hidden_states(torch.tensor([[3]]), cache=half.cache)[:, -1])
    a = full.decode(torch.tensor([3]))
    assert half.cache.layers[0].states.dtype == torch.bfloat16
    assert half.cache.layers[0].states.nbytes * 2 == full.cache.layers[0].states.nbytes
    assert_rel_close(b, a, 2e-2, "logits with a bfloat16 cache")


def test_bad_requests_are_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="request 1: prompt id 40 is outside the vocabulary"):
        complete(model, [Request([1], 2), Request([1, 40], 2)])
    with pytest.raises(ValueError, match="top_p"):
        complete(model, [Request([1], 2, top_p=1.5)])
    assert complete(model, [Request([1, 2], 0)])[0].new_ids == []
