"""Packed documents (docs/packing.md): a sequence of several documents with cu_seqlens equals each document run
alone (outputs and every gradient), for every memory × aggregation × state_init and implementation; no token
reads another document. The reference is each document through the plain forward, on its own."""

import itertools

import pytest
import torch

from checks import assert_rel_close
from mcdist.config import AGGREGATIONS, MEMORY_KINDS, STATE_INITS, ModelConfig
from mcdist.model import MCLanguageModel
from mcdist.packing import check_cu_seqlens, cu_seqlens_of_ids, cu_seqlens_of_rows

LENGTHS = (5, 9, 3, 12, 1)  # C = 4: partial segments, a document of one token, mini-batches cut short


def tiny_model(memory="gated", aggregation="grm", state_init="checkpoint", **overrides):
    torch.manual_seed(0)
    fields = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, memory=memory, aggregation=aggregation,
                  state_init=state_init, segment_len=4, chunk_len=2, minibatch_len=2, top_k=2, inner_lr=0.1)
    return MCLanguageModel(ModelConfig(**{**fields, **overrides})).double()


def documents(seed=0, lengths=LENGTHS):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 32, (n,), generator=generator) for n in lengths]


def cu_of(lengths):
    return torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)


def packed_and_alone(model, docs, impl):
    """(logits, grads) of the packed sequence and of the documents alone, for the same weighted loss."""
    weights = torch.randn(sum(len(d) for d in docs), model.config.vocab_size, generator=torch.Generator().manual_seed(5),
                          dtype=torch.float64)
    model.zero_grad()
    packed = model(torch.cat(docs)[None], cu_seqlens=cu_of([len(d) for d in docs]), impl=impl).logits[0]
    (packed * weights).sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone, first = [], 0
    for doc in docs:
        logits = model(doc[None], impl=impl).logits[0]
        (logits * weights[first:first + len(doc)]).sum().backward()
        alone.append(logits.detach())
        first += len(doc)
    alone_grads = [p.grad.clone() for p in model.parameters()]
    return packed.detach(), torch.cat(alone), packed_grads, alone_grads


CASES = [(m, a, s, 0) for m, a, s in itertools.product(MEMORY_KINDS, AGGREGATIONS, STATE_INITS)]
CASES += [("gated", a, "checkpoint", 3) for a in AGGREGATIONS]


@pytest.mark.parametrize("memory,aggregation,state_init,conv", CASES)
def test_packed_equals_each_document_alone(memory, aggregation, state_init, conv):
    model = tiny_model(memory, aggregation, state_init, conv_size=conv)
    packed, alone, packed_grads, alone_grads = packed_and_alone(model, documents(), "chunked")
    assert_rel_close(packed, alone, 1e-10, "logits")
    assert_rel_close(packed_grads, alone_grads, 1e-10, "gradients", joint=True)


@pytest.mark.parametrize("memory,aggregation", list(itertools.product(MEMORY_KINDS, AGGREGATIONS)))
def test_packed_on_the_token_loop(memory, aggregation):
    model = tiny_model(memory, aggregation)
    packed, alone, packed_grads, alone_grads = packed_and_alone(model, documents(lengths=(5, 3, 6)), "reference")
    assert_rel_close(packed, alone, 1e-10, "logits")
    assert_rel_close(packed_grads, alone_grads, 1e-10, "gradients", joint=True)


@pytest.mark.parametrize("memory,aggregation,state_init", [("gated", "ssc", "checkpoint"),
                                                            ("linear", "grm", "independent")])
def test_packed_on_the_triton_path(memory, aggregation, state_init):
    """The Triton kernels (under TRITON_INTERPRET=1 here) see a batch of the documents: packed == alone."""
    model = tiny_model(memory, aggregation, state_init, segment_len=16, chunk_len=16).float()  # smallest chunk
    docs = documents(lengths=(20, 7, 33))
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], cu_seqlens=cu_of([20, 7, 33]), impl="triton").logits[0]
        alone = torch.cat([model(doc[None], impl="chunked").logits[0] for doc in docs])
    assert_rel_close(packed, alone, 1e-5, "Triton packed logits against chunked alone")


@pytest.mark.parametrize("model_kind", ["attention", "hybrid"])
def test_packed_attention_and_hybrids(model_kind):
    extra = {"attention": {"mixer": "attention"}, "hybrid": {"layer_pattern": "mc,attention"}}[model_kind]
    model = tiny_model(**extra)
    packed, alone, packed_grads, alone_grads = packed_and_alone(model, documents(), "chunked")
    assert_rel_close(packed, alone, 1e-10, "logits")
    assert_rel_close(packed_grads, alone_grads, 1e-10, "gradients", joint=True)


def test_no_token_reads_an_earlier_document():
    model = tiny_model("titans", "grm", conv_size=3)
    docs = documents()
    cu = cu_of([len(d) for d in docs])
    with torch.no_grad():
        before = model(torch.cat(docs)[None], cu_seqlens=cu).logits[0]
        changed = [torch.randint(0, 32, d.shape, generator=torch.Generator().manual_seed(9)) for d in docs[:2]]
        after = model(torch.cat(changed + docs[2:])[None], cu_seqlens=cu).logits[0]
    first_kept = len(docs[0]) + len(docs[1])
    assert torch.equal(before[first_kept:], after[first_kept:])  # bit for bit
    assert not torch.allclose(before[:first_kept], after[:first_kept])


def test_document_ids_and_the_layer_take_the_same_documents():
    model = tiny_model("gated", "ssc", conv_size=3)
    docs = documents()
    ids = torch.cat(docs)[None]
    document_ids = torch.cat([torch.full((len(d),), 7 * i) for i, d in enumerate(docs)])[None]
    assert cu_seqlens_of_ids(document_ids).tolist() == cu_of([len(d) for d in docs]).tolist()
    with torch.no_grad():
        a = model(ids, cu_seqlens=cu_of([len(d) for d in docs])).logits
        b = model(ids, document_ids=document_ids).logits
        layer = model.blocks[0].mixer
        x = torch.randn(1, ids.shape[1], 16, dtype=torch.float64)
        packed_layer = layer(x, cu_seqlens=cu_of([len(d) for d in docs]))
        first, pieces = 0, []
        for d in docs:
            pieces.append(layer(x[:, first:first + len(d)]))
            first += len(d)
    assert torch.equal(a, b)
    assert_rel_close(packed_layer, torch.cat(pieces, 1), 1e-12, "the layer alone")


def test_rows_laid_end_to_end():
    assert cu_seqlens_of_rows(3, 4).tolist() == [0, 4, 8, 12]
    assert cu_seqlens_of_rows(2, 6, [torch.tensor([0, 2, 6]), torch.tensor([0, 6])]).tolist() == [0, 2, 6, 12]


@pytest.mark.parametrize("cu,message", [([0, 3, 3, 10], "strictly increasing"), ([1, 10], "start at 0"),
                                        ([0, 9], "end at the sequence length 10"), ([[0, 10]], "1-D")])
def test_bad_cu_seqlens_are_named(cu, message):
    with pytest.raises(ValueError, match=message):
        check_cu_seqlens(torch.tensor(cu), 10)
    model = tiny_model()
    with pytest.raises(ValueError, match="batch of one sequence"):
        model(torch.zeros(2, 10, dtype=torch.int64), cu_seqlens=torch.tensor([0, 10]))
