"""Token files, `mcdist data prepare`, per-rank slices, passkey batches."""

import json
import sys

import numpy as np
import pytest
import torch

from checks import import_optional
from mcdist.cli import main
from mcdist.config import RunConfig
from mcdist.data.mqar import BOS_ID, IGNORE_INDEX, SEP_ID
from mcdist.data.passkey import FIRST_DIGIT_ID, FIRST_FILLER_ID, QUERY_ID, make_passkey_batch, passkey_min_seq_len
from mcdist.data.prepare import ByteTokenizer, prepare_tokens
from mcdist.data.tokens import (TokenFile, TokenFileError, TokenWriter, read_header, sidecar_path, window_for_sample,
                                write_tokens)
from mcdist.parallel.layout import rank_pieces, unshard_sequence
from mcdist.parallel.mesh import Mesh
from mcdist.train.data import RankData


@pytest.mark.parametrize("dtype, vocab", [("uint16", 300), ("uint32", 70_000)])
def test_token_file_round_trip(tmp_path, dtype, vocab):
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (1001,), generator=generator)
    path = tmp_path / "t.bin"
    header = write_tokens(path, tokens, vocab_size=vocab)
    assert header["dtype"] == dtype and header["num_tokens"] == 1001
    assert path.stat().st_size == 1001 * np.dtype(dtype).itemsize
    file = TokenFile(path)
    assert len(file) == 1001 and file.vocab_size == vocab
    assert torch.equal(file.read(0, 1001), tokens)
    assert torch.equal(file.read(17, 40), tokens[17:57])
    ids, labels = file.read_window(3, 50)
    assert torch.equal(ids, tokens[150:200]) and torch.equal(labels, tokens[151:201])
    assert file.num_windows(50) == 20  # (1001 - 1) // 50


def test_writer_refuses_ids_outside_the_vocabulary_and_leaves_nothing(tmp_path):
    path = tmp_path / "t.bin"
    with pytest.raises(ValueError, match="token id 300 is outside the vocabulary"):
        with TokenWriter(path, vocab_size=300) as writer:
            writer.write([1, 2, 3])
            writer.write([300])
    assert not path.exists() and not (tmp_path / "t.bin.json").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too


def test_truncated_or_headerless_files_are_refused_naming_the_path(tmp_path):
    path = tmp_path / "t.bin"
    write_tokens(path, list(range(100)), vocab_size=256)
    with open(path, "r+b") as handle:
        handle.truncate(150)
    with pytest.raises(TokenFileError, match="t.bin: 150 bytes, but its header says 100 uint16 tokens"):
        TokenFile(path)
    (tmp_path / "u.bin").write_bytes(b"\0" * 10)
    with pytest.raises(TokenFileError, match="has no header"):
        read_header(tmp_path / "u.bin")
    (tmp_path / "u.bin.json").write_text("{not json")
    with pytest.raises(TokenFileError, match="unreadable header"):
        read_header(tmp_path / "u.bin")


def test_epochs_visit_every_window_once_in_a_seeded_order():
    first = [window_for_sample(i, 13, seed=5) for i in range(13)]
    second = [window_for_sample(i, 13, seed=5) for i in range(13, 26)]
    assert sorted(first) == list(range(13)) and sorted(second) == list(range(13))
    assert first != second  # each epoch has its own order
    assert first == [window_for_sample(i, 13, seed=5) for i in range(13)]
    assert first != [window_for_sample(i, 13, seed=6) for i in range(13)]
    assert [window_for_sample(i, 13, seed=5, shuffle=False) for i in range(15)] == list(range(13)) + [0, 1]


def _write_docs(tmp_path):
    docs = ["Hello, Memory Caching!\n", "Zweites Dokument: äöü ß — 日本語\n", "third\n", "fourth document\n"]
    paths = []
    for index, text in enumerate(docs):
        path = tmp_path / f"doc{index}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(str(path))
    return docs, paths


def test_prepare_with_the_byte_tokenizer_round_trips(tmp_path):
    docs, paths = _write_docs(tmp_path)
    out = tmp_path / "data" / "train.bin"
    result = prepare_tokens(paths, str(out), val_fraction=0.25)
    assert result["val_path"] == str(tmp_path / "data" / "train.val.bin")
    train, val = TokenFile(out), TokenFile(result["val_path"])
    assert train.header["num_documents"] == 3 and val.header["num_documents"] == 1
    assert train.header["tokenizer"]["kind"] == "byte" and train.eos_id == 0
    decoded = bytes(train.read(0, len(train)).tolist()).split(b"\0")
    assert [part.decode("utf-8") for part in decoded[:-1]] == docs[:3] and decoded[-1] == b""
    assert ByteTokenizer().decode(val.read(0, len(val) - 1)) == docs[3]


def test_prepare_reads_jsonl_records(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": text}) for text in ["one", "two two"]) + "\n\n")
    result = prepare_tokens([str(path)], str(tmp_path / "t.bin"), text_key="body")
    file = TokenFile(result["train_path"])
    assert bytes(file.read(0, len(file)).tolist()) == b"one\0two two\0"
    with pytest.raises(ValueError, match="string field 'text'"):
        prepare_tokens([str(path)], str(tmp_path / "u.bin"))


def test_prepare_with_a_tokenizer_json(tmp_path):
    tokenizers = import_optional("tokenizers", "dev")
    model = tokenizers.models.WordLevel({"<unk>": 0, "</s>": 1, "hello": 2, "memory": 3, "caching": 4},
                                        unk_token="<unk>")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer_path = tmp_path / "tokenizer.json"
    tokenizer.save(str(tokenizer_path))
    (tmp_path / "a.txt").write_text("hello memory caching")
    (tmp_path / "b.txt").write_text("caching hello unknown")
    result = prepare_tokens([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], str(tmp_path / "t.bin"),
                            tokenizer=str(tokenizer_path))
    file = TokenFile(result["train_path"])
    assert file.vocab_size == 5 and file.eos_id == 1 and file.header["tokenizer"]["kind"] == "huggingface"
    assert file.read(0, len(file)).tolist() == [2, 3, 4, 1, 4, 2, 0, 1]


def test_a_missing_tokenizers_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as if not installed
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ImportError, match="pip install tokenizers"):
        prepare_tokens([str(tmp_path / "a.txt")], str(tmp_path / "t.bin"), tokenizer=str(tmp_path / "tok.json"))


def test_cli_data_prepare(tmp_path, capsys):
    docs, paths = _write_docs(tmp_path)
    out = tmp_path / "corpus.bin"
    assert main(["data", "prepare", *paths, "--output", str(out), "--dtype", "uint32"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_tokens"] == sum(len(d.encode()) + 1 for d in docs)
    assert json.loads(open(sidecar_path(out)).read())["dtype"] == "uint32"
    assert main(["data", "prepare", str(tmp_path / "missing.txt"), "--output", str(out)]) == 2
    assert "missing.txt" in capsys.readouterr().err


@pytest.mark.parametrize("dp, sp, layout", [(1, 2, "zigzag"), (2, 2, "contiguous"), (1, 3, "zigzag")])
def test_each_rank_reads_only_its_slice_of_a_token_file(tmp_path, dp, sp, layout):
    seq_len, batch = 24, 2 * dp
    tokens = torch.randint(0, 200, (seq_len * 11 + 1,), generator=torch.Generator().manual_seed(7))
    path = tmp_path / "t.bin"
    write_tokens(path, tokens, vocab_size=256)
    config = RunConfig().with_overrides([
        "train.task=tokens", f"train.data_path={path}", f"train.seq_len={seq_len}", f"train.batch_size={batch}",
        "train.grad_accum=2", f"parallel.dp={dp}", f"parallel.sp={sp}", f"parallel.layout={layout}",
        "model.segment_len=2", "model.chunk_len=2", "model.minibatch_len=2"])
    step, micro = 3, 1
    slices = {}
    for dp_rank in range(dp):
        for sp_rank in range(sp):
            mesh = Mesh(dp, sp, dp_rank, sp_rank, None, None, tuple(range(sp)))
            data = RankData(config, mesh, record_reads=True)
            ids, labels = data.train_batch(step, micro)
            assert ids.shape == (batch // dp, seq_len // sp) == labels.shape
            first_sample = (step * 2 + micro) * batch + dp_rank * (batch // dp)
            expected_reads = []
            for row in range(batch // dp):
                window = window_for_sample(first_sample + row, (len(tokens) - 1) // seq_len, seed=0)
                expected_reads += [(window * seq_len + start, length + 1)
                                   for start, length in rank_pieces(seq_len, sp, sp_rank, layout)]
            assert data.train_file.reads == expected_reads  # its pieces (+1 label token each), nothing else
            slices[dp_rank, sp_rank] = (ids, labels)
    # put back together, the slices are the global batch: consecutive windows' inputs and next-token labels
    for dp_rank in range(dp):
        ids = unshard_sequence([slices[dp_rank, r][0] for r in range(sp)], layout)
        labels = unshard_sequence([slices[dp_rank, r][1] for r in range(sp)], layout)
        first_sample = (step * 2 + micro) * batch + dp_rank * (batch // dp)
        for row in range(batch // dp):
            window = window_for_sample(first_sample + row, (len(tokens) - 1) // seq_len, seed=0)
            assert torch.equal(ids[row], tokens[window * seq_len:(window + 1) * seq_len])
            assert torch.equal(labels[row], tokens[window * seq_len + 1:(window + 1) * seq_len + 1])


def test_passkey_layout_and_labels():
    T, V, k = 45, 30, 5
    ids, labels = make_passkey_batch(7, T, V, torch.Generator().manual_seed(1))
    assert ids.shape == labels.shape == (7, T)
    for row in range(7):
        assert ids[row, 0] == BOS_ID
        start = int((ids[row] == SEP_ID).nonzero()[0])
        key = ids[row, start + 1:start + 1 + k]
        assert ids[row, start + k + 1] == SEP_ID
        assert ((key >= FIRST_DIGIT_ID) & (key < FIRST_FILLER_ID)).all()
        assert ids[row, T - k - 1] == QUERY_ID and torch.equal(ids[row, T - k:], key)
        labelled = (labels[row] != IGNORE_INDEX).nonzero().flatten()
        assert labelled.tolist() == list(range(T - k - 1, T - 1))
        assert torch.equal(labels[row, labelled], key)  # QUERY asks for d1, d_i asks for d_{i+1}
        filler = torch.ones(T, dtype=torch.bool)
        filler[[0, *range(start, start + k + 2), *range(T - k - 1, T)]] = False
        assert (ids[row, filler] >= FIRST_FILLER_ID).all()
    shallow, _ = make_passkey_batch(2, T, V, torch.Generator().manual_seed(1), depth=0.0)
    deep, _ = make_passkey_batch(2, T, V, torch.Generator().manual_seed(1), depth=1.0)
    assert (shallow[:, 1] == SEP_ID).all() and (deep[:, T - k - 1 - k - 2] == SEP_ID).all()
    long_ids, _ = make_passkey_batch(1, 100_003, V, torch.Generator().manual_seed(2))  # any length
    assert long_ids.shape == (1, 100_003)
    with pytest.raises(ValueError, match="seq_len = 13 is too short"):
        make_passkey_batch(1, passkey_min_seq_len() - 1, V, torch.Generator())
    with pytest.raises(ValueError, match="vocab_size = 15 is too small"):
        make_passkey_batch(1, T, 15, torch.Generator())
