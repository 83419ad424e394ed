"""`mcdist data prepare` from Hugging Face `datasets` inputs, the document boundaries file, window boundaries, the
stdlib demo corpus, parallel tokenization and crash safety."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from checks import import_optional
from mcdist.cli import main
from mcdist.data import prepare as prepare_module
from mcdist.data import tokens as tokens_module
from mcdist.data.prepare import demo_inputs, expand_inputs, prepare_tokens
from mcdist.data.tokens import TokenFile, TokenFileError, TokenWriter, boundaries_path, sidecar_path

DOCS = ["Hello, Memory Caching!\n", "Zweites Dokument: äöü ß — 日本語\n", "third", "", "fourth document\n\n"]


def _tokens(path) -> np.ndarray:
    """The ids of a token file read straight from its bytes (not through TokenFile)."""
    header = json.loads(open(sidecar_path(path)).read())
    return np.fromfile(path, dtype={"uint16": "<u2", "uint32": "<u4"}[header["dtype"]]).astype(np.int64)


def _raw_boundaries(path) -> np.ndarray:
    return np.fromfile(boundaries_path(path), dtype="<i8")


def _expected_bytes(docs) -> list:
    """The byte tokenizer's file of ``docs``: each document's UTF-8 bytes, then id 0."""
    return [byte for text in docs for byte in list(text.encode("utf-8")) + [0]]


def _word_tokenizer(tmp_path, with_eos=True):
    tokenizers = import_optional("tokenizers", "dev")
    vocab = {"<unk>": 0, "hello": 1, "memory": 2, "caching": 3, "long": 4}
    if with_eos:
        vocab["</s>"] = 5
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / ("tokenizer.json" if with_eos else "no-eos.json")
    tokenizer.save(str(path))
    return str(path)


def test_jsonl_json_parquet_and_text_through_datasets_give_the_tokens_of_the_builtin_reader(tmp_path):
    import_optional("datasets", "data")
    pandas = import_optional("pandas", "data")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": text, "n": i}) + "\n"
                                                 for i, text in enumerate(DOCS)) + "\n", encoding="utf-8")
    (tmp_path / "docs.json").write_text(json.dumps([{"body": text} for text in DOCS]), encoding="utf-8")
    pandas.DataFrame({"body": DOCS, "n": range(len(DOCS))}).to_parquet(tmp_path / "docs.parquet")
    texts = []
    for index, text in enumerate(DOCS):
        texts.append(tmp_path / f"doc{index}.txt")
        texts[-1].write_bytes(text.encode("utf-8") + (b"\xff bad" if index == 1 else b""))
    text_docs = [DOCS[0], DOCS[1] + "\ufffd bad", *DOCS[2:]]  # the invalid byte replaced, by both readers
    expected_jsonl = _expected_bytes(DOCS)
    runs = {}
    for name, inputs, loader in [("jsonl-builtin", ["docs.jsonl"], "builtin"),
                                 ("jsonl-datasets", ["docs.jsonl"], "datasets"),
                                 ("json-auto", ["docs.json"], "auto"), ("parquet-auto", ["docs.parquet"], "auto"),
                                 ("text-builtin", [t.name for t in texts], "builtin"),
                                 ("text-datasets", [t.name for t in texts], "datasets")]:
        out = tmp_path / f"{name}.bin"
        runs[name] = prepare_tokens([str(tmp_path / item) for item in inputs], str(out), loader=loader,
                                    text_key="body")
        runs[name]["tokens"] = _tokens(out).tolist()
        runs[name]["ends"] = _raw_boundaries(out).tolist()
    for name in ("jsonl-builtin", "jsonl-datasets", "json-auto", "parquet-auto"):
        assert runs[name]["tokens"] == expected_jsonl, name
        assert runs[name]["train"]["num_documents"] == len(DOCS)
    assert runs["text-builtin"]["tokens"] == _expected_bytes(text_docs)
    assert runs["text-datasets"]["tokens"] == runs["text-builtin"]["tokens"]
    assert runs["text-builtin"]["replaced_bytes"] == 1 and runs["text-datasets"]["replacement_characters"] == 1
    for name, run in runs.items():
        assert run["ends"] == [0] + (np.flatnonzero(np.asarray(run["tokens"]) == 0) + 1).tolist(), name
        assert run["train"]["boundaries"]["count"] == len(DOCS) + 1, name


def test_boundaries_file_equals_the_eos_positions_and_survives_an_eos_inside_a_document(tmp_path):
    paths = []
    for index, text in enumerate(DOCS):
        paths.append(str(tmp_path / f"d{index}.txt"))
        open(paths[-1], "w", encoding="utf-8").write(text)
    result = prepare_tokens(paths, str(tmp_path / "t.bin"), val_fraction=0.4)
    for path in (result["train_path"], result["val_path"]):
        ids, ends = _tokens(path), _raw_boundaries(path)
        assert ends.tolist() == [0] + (np.flatnonzero(ids == 0) + 1).tolist()
        assert ends[-1] == len(ids) and TokenFile(path).boundaries_source == "file"
        assert TokenFile(path).boundaries().tolist() == ends.tolist()
    assert len(_raw_boundaries(result["train_path"])) == 4 and len(_raw_boundaries(result["val_path"])) == 3
    # a NUL byte inside a text is id 0 as well: the boundaries file still knows where documents end
    (tmp_path / "nul.txt").write_bytes(b"ab\0cd")
    prepare_tokens([str(tmp_path / "nul.txt"), paths[2]], str(tmp_path / "n.bin"))
    assert _raw_boundaries(tmp_path / "n.bin").tolist() == [0, 6, 12]


def test_a_tokenizer_without_eos_still_records_the_documents(tmp_path):
    tokenizer = _word_tokenizer(tmp_path, with_eos=False)
    (tmp_path / "a.txt").write_text("hello memory caching")
    (tmp_path / "b.txt").write_text("long long")
    result = prepare_tokens([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], str(tmp_path / "t.bin"),
                            tokenizer=tokenizer)
    assert result["train"]["eos_id"] is None
    assert _tokens(tmp_path / "t.bin").tolist() == [1, 2, 3, 4, 4]
    assert _raw_boundaries(tmp_path / "t.bin").tolist() == [0, 3, 5]
    assert TokenFile(tmp_path / "t.bin").read_boundaries(1, 4).tolist() == [0, 2, 4]


def _expected_window(ends, start, length):
    """cu_seqlens of tokens [start, start + length), by walking the document ends one by one."""
    inside = sorted({end - start for end in ends if start < end < start + length})
    return [0] + inside + [length]


def test_window_boundaries_from_the_file_and_from_eos_ids(tmp_path):
    generator = np.random.default_rng(4)
    lengths = [1, 5, 17, 2, 40, 3, 9, 1, 30]
    path = tmp_path / "t.bin"
    with TokenWriter(path, vocab_size=50, eos_id=49) as writer:
        for length in lengths:
            writer.write(generator.integers(0, 49, size=length - 1))  # the EOS makes the document `length` long
            writer.end_document()
        writer.write([1, 2, 3])  # an unterminated tail counts as one more part
    ends = np.cumsum([0] + lengths + [3]).tolist()
    file = TokenFile(path)
    assert file.boundaries().tolist() == ends == _raw_boundaries(path).tolist()
    # the same file as one written before boundaries files existed: documents from the EOS ids
    header = json.loads(open(sidecar_path(path)).read())
    del header["boundaries"]
    old = tmp_path / "old.bin"
    old.write_bytes(path.read_bytes())
    open(sidecar_path(old), "w").write(json.dumps(header))
    old_file = TokenFile(old)
    assert old_file.boundaries_source == "eos" and old_file.boundaries().tolist() == ends
    cases = [(0, 1), (0, 6), (1, 5), (5, 1), (6, 17), (7, 40), (22, 50), (0, len(file)), (100, len(file) - 100),
             (len(file) - 3, 3)]
    for start, length in cases:
        expected = _expected_window(ends, start, length)
        for reader in (file, old_file):
            got = reader.read_boundaries(start, length)
            assert got.dtype == torch.int32 and got.tolist() == expected, (start, length, reader.path)
    for window in range(file.num_windows(16)):
        assert file.window_boundaries(window, 16).tolist() == _expected_window(ends, window * 16, 16)
    with pytest.raises(IndexError, match="outside"):
        file.read_boundaries(len(file) - 2, 3)
    with pytest.raises(IndexError, match="window 7 is outside"):
        file.window_boundaries(7, 16)


def test_corrupt_or_missing_boundaries_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "t.bin"
    with TokenWriter(path, vocab_size=10, eos_id=0) as writer:
        for _ in range(3):
            writer.write([1, 2])
            writer.end_document()
    docs = boundaries_path(path)
    good = open(docs, "rb").read()
    open(docs, "wb").write(good[:-8])
    with pytest.raises(TokenFileError, match=r"t.bin.docs: 24 bytes, but .* says 4 int64 boundaries"):
        TokenFile(path)
    open(docs, "wb").write(np.asarray([0, 6, 3, 9], dtype="<i8").tobytes())
    with pytest.raises(TokenFileError, match="not the boundaries of"):
        TokenFile(path).boundaries()
    os.unlink(docs)
    with pytest.raises(TokenFileError, match="its boundaries file .* does not exist"):
        TokenFile(path)


@pytest.mark.parametrize("failing_rename", [1, 2, 3])
def test_a_crash_between_the_renames_leaves_no_readable_half_file(tmp_path, monkeypatch, failing_rename):
    (tmp_path / "a.txt").write_text("first document")
    out = tmp_path / "out" / "t.bin"
    prepare_tokens([str(tmp_path / "a.txt")], str(out))  # a complete previous file, replaced below
    (tmp_path / "b.txt").write_text("a second, longer document")
    real_replace, calls = os.replace, []

    def replace(source, target):
        calls.append(target)
        if len(calls) == failing_rename:
            raise OSError(28, "No space left on device (injected)")
        real_replace(source, target)

    monkeypatch.setattr(tokens_module.os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        prepare_tokens([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], str(out))
    monkeypatch.undo()
    assert [os.path.basename(target) for target in calls] == ["t.bin", "t.bin.docs", "t.bin.json"][:failing_rename]
    with pytest.raises(TokenFileError, match="has no header"):
        TokenFile(out)  # never the new ids under the old header, nor old boundaries under a new one
    assert not [name for name in os.listdir(out.parent) if ".tmp-" in name]  # no temporary file left behind


def test_a_failure_while_reading_leaves_nothing(tmp_path):
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2: expected an object with a string field 'text'"):
        prepare_tokens([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], str(tmp_path / "out" / "t.bin"))
    assert os.listdir(tmp_path / "out") == []


def test_datasets_errors_name_the_file_and_record(tmp_path):
    import_optional("datasets", "data")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl: record 2: expected a string field 'text', found a NoneType"):
        prepare_tokens([str(tmp_path / "a.jsonl")], str(tmp_path / "t.bin"), loader="datasets")
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(ValueError, match="b.json: datasets cannot"):
        prepare_tokens([str(tmp_path / "b.json")], str(tmp_path / "t.bin"))
    with pytest.raises(ValueError, match="b.json: json files are read through Hugging Face datasets"):
        prepare_tokens([str(tmp_path / "b.json")], str(tmp_path / "t.bin"), loader="builtin")
    assert not (tmp_path / "t.bin").exists()


def test_a_missing_datasets_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match=r"pip install datasets"):
        prepare_tokens([str(tmp_path / "a.parquet")], str(tmp_path / "t.bin"))
    assert main(["data", "prepare", str(tmp_path / "a.parquet"), "--output", str(tmp_path / "t.bin")]) == 2
    assert "pip install datasets" in capsys.readouterr().err


def test_folders_expand_to_their_files_in_sorted_order(tmp_path):
    for name in ["b/2.txt", "b/10.txt", "a.txt", "c/d/e.jsonl", ".hidden.txt", ".git/x.txt", "b/.skip.txt"]:
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text(json.dumps({"text": name}) if name.endswith(".jsonl") else name)
    files = expand_inputs([str(tmp_path / "in")])
    assert [os.path.relpath(f, tmp_path / "in") for f in files] == ["a.txt", "b/10.txt", "b/2.txt", "c/d/e.jsonl"]
    result = prepare_tokens([str(tmp_path / "in")], str(tmp_path / "t.bin"))
    assert result["files"] == 4
    assert _tokens(tmp_path / "t.bin").tolist() == _expected_bytes(["a.txt", "b/10.txt", "b/2.txt", "c/d/e.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="input folder .*empty.* holds no file"):
        prepare_tokens([str(tmp_path / "empty")], str(tmp_path / "u.bin"))


def test_more_workers_write_the_same_file(tmp_path):
    tokenizer = _word_tokenizer(tmp_path)
    words = ["hello", "memory", "caching", "long", "unknown"]
    generator = np.random.default_rng(0)
    docs = [" ".join(generator.choice(words, size=int(generator.integers(1, 30)))) for _ in range(700)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in docs))
    one = prepare_tokens([str(tmp_path / "docs.jsonl")], str(tmp_path / "one.bin"), tokenizer=tokenizer)
    two = prepare_tokens([str(tmp_path / "docs.jsonl")], str(tmp_path / "two.bin"), tokenizer=tokenizer, workers=2)
    ids = {"hello": 1, "memory": 2, "caching": 3, "long": 4, "unknown": 0}
    expected = [token for text in docs for token in [ids[word] for word in text.split()] + [5]]
    assert _tokens(tmp_path / "one.bin").tolist() == expected  # 700 documents: three batches of the pool
    assert (tmp_path / "two.bin").read_bytes() == (tmp_path / "one.bin").read_bytes()
    assert _raw_boundaries(tmp_path / "two.bin").tolist() == _raw_boundaries(tmp_path / "one.bin").tolist()
    assert one["train"]["num_documents"] == two["train"]["num_documents"] == 700


def _fake_stdlib(root):
    files = {"os.py": "import sys\n", "json/__init__.py": "# json\n", "json/decoder.py": "x = 1\n",
             "asyncio/base.py": "y = 2\n", "_sysconfigdata__linux.py": "build = {}\n", "test/test_os.py": "t\n",
             "site-packages/pkg.py": "p\n", "idlelib/idle_test/t.py": "i\n", "idlelib/run.py": "r\n",
             "notes.txt": "not python\n", "Abc.py": "A\n", "json/tests/t.py": "t\n", ".hidden/h.py": "h\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return ["Abc.py", "asyncio/base.py", "idlelib/run.py", "json/__init__.py", "json/decoder.py", "os.py"], files


def test_the_stdlib_demo_is_every_source_file_in_sorted_order(tmp_path, monkeypatch, capsys):
    order, texts = _fake_stdlib(tmp_path / "lib")
    files, source = demo_inputs("stdlib", str(tmp_path / "lib"))
    assert [os.path.relpath(f, tmp_path / "lib") for f in files] == order
    assert source["demo"] == "stdlib" and source["files"] == len(order) and source["python"]
    monkeypatch.setattr(prepare_module, "stdlib_root", lambda: str(tmp_path / "lib"))
    out = tmp_path / "demo.bin"
    assert main(["data", "prepare", "--demo", "stdlib", "--output", str(out), "--quiet"]) == 0
    assert _tokens(out).tolist() == _expected_bytes([texts[name] for name in order])
    assert json.loads(open(sidecar_path(out)).read())["source"]["demo"] == "stdlib"
    assert main(["data", "prepare", "--demo", "stdlib", str(tmp_path / "lib" / "os.py"), "--output", str(out)]) == 2
    assert "--demo stdlib and INPUT files were given together" in capsys.readouterr().err
    assert main(["data", "prepare", "--output", str(out)]) == 2
    assert "no INPUT given" in capsys.readouterr().err
    assert main(["data", "prepare", str(tmp_path / "lib" / "os.py"), "--output", str(out), "--workers", "0"]) == 2
    assert "--workers = 0 is invalid" in capsys.readouterr().err
    monkeypatch.undo()
    real, _ = demo_inputs("stdlib")  # this Python's own library: listed the same way, twice
    relative = [os.path.relpath(f, prepare_module.stdlib_root()) for f in real]
    assert "os.py" in relative and relative == sorted(relative, key=lambda item: item.split(os.sep))
    assert not any(part in ("site-packages", "test") for item in relative for part in item.split(os.sep))
    assert demo_inputs("stdlib")[0] == real
