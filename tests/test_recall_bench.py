"""benchmarks/recall.py at its toy size: the learning-rate sweep picks each model's rate from its first seed and
trains the other seeds at it, every run lands in valid JSON with a finite accuracy, the plot is a real PNG, a
rerun resumes (trains nothing it already has) while a changed config reruns, `memory:aggregation` names set the
memory, and passkey cells run by length."""

import importlib.util
import json
import math
import struct
from pathlib import Path

from mcdist.config import RunConfig
from mcdist.model import MCLanguageModel

ROOT = Path(__file__).resolve().parents[1]


def _load_recall():
    spec = importlib.util.spec_from_file_location("bench_recall", ROOT / "benchmarks" / "recall.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_png(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    width, height = struct.unpack(">II", header[16:24])
    assert width > 100 and height > 100


def test_recall_sweep_writes_json_and_png_and_resumes(tmp_path, capsys, one_thread):
    recall = _load_recall()
    out, png = tmp_path / "recall.json", tmp_path / "recall.png"
    argv = ["--toy", "--models", "attention,linear:grm", "--cells", "24:3,40:4", "--seeds", "0,1",
            "--lrs", "1e-3,3e-2", "--out", str(out), "--plot", str(png), "--set", "train.device=cpu"]
    assert recall.main(argv) == 0
    results = json.loads(out.read_text())
    cells = results["cells"]
    groups = [f"{m}/L{length}/n{n}" for m in ("attention", "linear:grm") for length, n in ((24, 3), (40, 4))]
    assert set(results["best_lr"]) == set(groups)
    expected = set()
    for group in groups:  # the sweep on seed 0, then seed 1 at the best rate only
        expected |= {f"{group}/s0/lr0.001", f"{group}/s0/lr0.03", f"{group}/s1/lr{results['best_lr'][group]:g}"}
    assert set(cells) == expected
    for group in groups:  # the rate chosen is the sweep's best by accuracy, then loss (checked by hand here)
        sweep = [(cells[f"{group}/s0/lr{lr}"]["eval_accuracy"], -cells[f"{group}/s0/lr{lr}"]["eval_loss"], -lr, lr)
                 for lr in (0.001, 0.03)]
        assert results["best_lr"][group] == max(sweep)[3], group
    for key, cell in cells.items():
        assert math.isfinite(cell["eval_accuracy"]) and 0.0 <= cell["eval_accuracy"] <= 1.0, key
        assert math.isfinite(cell["eval_loss"]) and cell["eval_loss"] > 0, key
        parts = key.split("/")
        assert (cell["model"], cell["seq_len"], cell["num_kv_pairs"], cell["seed"], cell["lr"]) == (
            parts[0], int(parts[1][1:]), int(parts[2][1:]), int(parts[3][1:]), float(parts[4][2:])), key
    # linear:grm sets the memory (the config's is gated, with a decay projection) and the aggregation
    toy = RunConfig.load(ROOT / "examples" / "main_job.json").with_overrides(
        recall.TOY + ["model.memory=linear", "model.aggregation=grm"])
    assert toy.model.memory != RunConfig.load(ROOT / "examples" / "main_job.json").model.memory
    linear_grm = sum(p.numel() for p in MCLanguageModel(toy.model).parameters())
    assert cells["linear:grm/L24/n3/s0/lr0.001"]["num_params"] == linear_grm
    assert cells["attention/L24/n3/s0/lr0.001"]["num_params"] != linear_grm
    row = results["summary"]["linear:grm/L40/n4"]
    assert row["lr"] == results["best_lr"]["linear:grm/L40/n4"] and len(row["accuracy"]) == 2
    assert math.isclose(row["mean"], sum(row["accuracy"]) / 2)
    _assert_png(png)
    capsys.readouterr()

    assert recall.main(argv) == 0  # resumed: every run is there with the same fingerprint, nothing trains
    assert "accuracy 0." not in capsys.readouterr().out.split("mean accuracy")[0]
    assert json.loads(out.read_text())["cells"] == cells

    assert recall.main(argv + ["--set", "train.weight_decay=0.0", "--models", "linear:grm", "--cells", "24:3",
                               "--seeds", "0", "--lrs", "1e-3"]) == 0  # a changed config trains that run again
    again = json.loads(out.read_text())["cells"]
    assert again["linear:grm/L24/n3/s0/lr0.001"]["fingerprint"] != cells["linear:grm/L24/n3/s0/lr0.001"]["fingerprint"]
    assert again["attention/L40/n4/s0/lr0.03"] == cells["attention/L40/n4/s0/lr0.03"]


def test_recall_passkey_by_length_swept_in_the_first_cell(tmp_path, one_thread):
    recall = _load_recall()
    out = tmp_path / "passkey.json"
    assert recall.main(["--toy", "--task", "passkey", "--models", "grm", "--seq-lens", "24,32", "--seeds", "0,1",
                        "--lrs", "1e-3,3e-2", "--sweep", "first", "--out", str(out), "--set", "train.device=cpu"]) == 0
    results = json.loads(out.read_text())
    lr = results["best_lr"]["grm/L24/passkey"]
    assert results["best_lr"]["grm/L32/passkey"] == lr  # the first cell's rate holds in every cell
    assert set(results["cells"]) == {"grm/L24/passkey/s0/lr0.001", "grm/L24/passkey/s0/lr0.03",
                                     f"grm/L24/passkey/s1/lr{lr:g}", f"grm/L32/passkey/s0/lr{lr:g}",
                                     f"grm/L32/passkey/s1/lr{lr:g}"}
    assert all(cell["task"] == "passkey" and cell["num_kv_pairs"] is None for cell in results["cells"].values())
    _assert_png(tmp_path / "passkey.png")


def test_a_diverged_run_is_kept_and_ranks_last(tmp_path, capsys, one_thread, monkeypatch):
    recall = _load_recall()
    real = recall.run_training

    def diverging(run):  # the rate 3e-2 "diverges" on seed 0 and on seed 1 (at the rate chosen, 1e-3)
        if run.train.lr > 0.01 or run.train.seed == 1:
            raise FloatingPointError(f"training loss became nan at step 2 (lr {run.train.lr})")
        return real(run)

    monkeypatch.setattr(recall, "run_training", diverging)
    out = tmp_path / "d.json"
    assert recall.main(["--toy", "--models", "grm", "--cells", "24:3", "--seeds", "0,1", "--lrs", "1e-3,3e-2",
                        "--out", str(out), "--set", "train.device=cpu"]) == 0
    results = json.loads(out.read_text())
    assert results["best_lr"]["grm/L24/n3"] == 0.001
    assert "nan" in results["cells"]["grm/L24/n3/s0/lr0.03"]["diverged"]
    row = results["summary"]["grm/L24/n3"]
    assert row["diverged"] == [1] and len(row["accuracy"]) == 1 and row["mean"] == row["accuracy"][0]
    _assert_png(tmp_path / "d.png")
    capsys.readouterr()
    every = tmp_path / "e.json"  # every rate diverges: one clear line, exit 1, the runs kept
    assert recall.main(["--toy", "--models", "none", "--cells", "24:3", "--seeds", "0", "--lrs", "2e-2,3e-2",
                        "--out", str(every), "--set", "train.device=cpu"]) == 1
    err = capsys.readouterr().err
    assert "none/L24/n3: the loss diverged at every rate of [0.02, 0.03]" in err and "Traceback" not in err
    assert len(json.loads(every.read_text())["cells"]) == 2


def test_recall_benchmark_bad_lists_exit_2(tmp_path, capsys):
    recall = _load_recall()
    out = str(tmp_path / "r.json")
    for argv, words in ((["--models", "lstm"], "model 'lstm' is unknown"),
                        (["--seq-lens", "0"], "--seq-lens = '0' is invalid"),
                        (["--lrs", "0.01,-1"], "--lrs = '0.01,-1' is invalid"),
                        (["--cells", "64:x"], "--cells = '64:x' is invalid"),
                        (["--task", "copy"], "--task = 'copy' is invalid"),
                        (["--sweep", "all"], "--sweep = 'all' is invalid"),
                        (["--cells", "8:3"], "too short for train.num_kv_pairs = 3")):
        assert recall.main(["--toy", "--out", out] + argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "r.json").exists()
