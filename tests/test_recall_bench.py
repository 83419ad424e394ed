"""benchmarks/recall.py at its toy size: every cell of the grid lands in valid JSON with a finite accuracy, the
plot is a real PNG, and a rerun resumes (trains nothing it already has) while a changed config reruns."""

import importlib.util
import json
import math
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_recall():
    spec = importlib.util.spec_from_file_location("bench_recall", ROOT / "benchmarks" / "recall.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recall_benchmark_writes_json_and_png_and_resumes(tmp_path, capsys, one_thread):
    recall = _load_recall()
    out, png = tmp_path / "recall.json", tmp_path / "recall.png"
    argv = ["--toy", "--models", "attention,none,grm", "--seq-lens", "24,40", "--pairs", "3", "--seeds", "0,1",
            "--out", str(out), "--plot", str(png), "--set", "train.device=cpu"]
    assert recall.main(argv) == 0
    cells = json.loads(out.read_text())["cells"]
    expected = {f"{m}/L{length}/n3/s{seed}" for m in ("attention", "none", "grm") for length in (24, 40)
                for seed in (0, 1)}
    assert set(cells) == expected
    for key, cell in cells.items():
        assert math.isfinite(cell["eval_accuracy"]) and 0.0 <= cell["eval_accuracy"] <= 1.0, key
        assert math.isfinite(cell["eval_loss"]) and cell["eval_loss"] > 0, key
        assert (cell["model"], cell["seq_len"], cell["seed"]) == (key.split("/")[0], int(key.split("/")[1][1:]),
                                                                  int(key.split("/")[3][1:]))
    assert cells["attention/L24/n3/s0"]["num_params"] != cells["grm/L24/n3/s0"]["num_params"]  # other mixers
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    width, height = struct.unpack(">II", header[16:24])
    assert width > 100 and height > 100
    capsys.readouterr()

    assert recall.main(argv) == 0  # resumed: every cell is there with the same fingerprint, nothing trains
    assert "accuracy" not in capsys.readouterr().out.split("mean accuracy")[0]
    assert json.loads(out.read_text())["cells"] == cells

    assert recall.main(argv + ["--set", "train.lr=0.02", "--models", "none", "--seq-lens", "24",
                               "--seeds", "0"]) == 0  # a changed config trains that cell again
    again = json.loads(out.read_text())["cells"]
    assert again["none/L24/n3/s0"]["fingerprint"] != cells["none/L24/n3/s0"]["fingerprint"]
    assert again["grm/L40/n3/s1"] == cells["grm/L40/n3/s1"]


def test_recall_benchmark_bad_lists_exit_2(tmp_path, capsys):
    recall = _load_recall()
    assert recall.main(["--toy", "--models", "lstm", "--out", str(tmp_path / "r.json")]) == 2
    assert "model 'lstm' is unknown" in capsys.readouterr().err
    assert recall.main(["--toy", "--seq-lens", "0", "--out", str(tmp_path / "r.json")]) == 2
    assert "--seq-lens = '0' is invalid" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
