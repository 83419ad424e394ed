"""benchmarks/recall.py at its toy size: the learning-rate sweep picks each model's rate from its first seed and
trains the other seeds at it, every run lands in valid JSON with a finite accuracy, the plot is a real PNG, a
rerun resumes (trains nothing it already has) while a changed config reruns, `memory:aggregation` names set the
memory, passkey cells run by length, a cross grid plots accuracy against length at its fixed pair count and
against the pairs at its fixed length, and --set-for changes one model's runs only."""

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
    for group in groups:  # the rate chosen: the lower one unless the higher wins by more than 0.01 (by hand)
        low, high = (cells[f"{group}/s0/lr{lr}"]["eval_accuracy"] for lr in ("0.001", "0.03"))
        assert results["best_lr"][group] == (0.03 if high > low + 0.01 else 0.001), group
    assert all(cell["code"] == recall.code_version() for cell in cells.values())
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
    changed = json.loads(out.read_text())
    again = changed["cells"]
    assert again["linear:grm/L24/n3/s0/lr0.001"]["fingerprint"] != cells["linear:grm/L24/n3/s0/lr0.001"]["fingerprint"]
    assert again["attention/L40/n4/s0/lr0.03"] == cells["attention/L40/n4/s0/lr0.03"]
    # the run it replaced is not dropped: it moved to "stale", marked as replaced for its config
    assert changed["stale"] == [dict(cells["linear:grm/L24/n3/s0/lr0.001"], key="linear:grm/L24/n3/s0/lr0.001",
                                     replaced="config")]


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
                        (["--tie", "1.5"], "--tie = 1.5 is invalid"),
                        (["--cells", "8:3"], "too short for train.num_kv_pairs = 3"),
                        (["--set-for", "grm"], "--set-for 'grm' is invalid"),
                        (["--models", "grm", "--set-for", "none:model.top_k=2"], "names model 'none', which is not"),
                        (["--models", "grm", "--set-for", "grm:train.lr=1e-3"], "sets train.lr, which every run sets"),
                        (["--models", "grm", "--set-for", "grm:model.top_k=0"], "top_k")):
        assert recall.main(["--toy", "--out", out] + argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "r.json").exists()


def test_plot_panels_of_cross_product_and_diagonal_grids():
    recall = _load_recall()
    cross = [(64, 12), (128, 12), (256, 12), (128, 6), (128, 24)]
    assert recall.plot_panels(cross) == [("length", 12), ("pairs", 128)]
    product = [(length, n) for n in (6, 16) for length in (128, 256)]
    assert recall.plot_panels(product) == [("length", 6), ("length", 16), ("pairs", 128), ("pairs", 256)]
    assert recall.plot_panels([(64, 12), (128, 24)]) == [("cells", None)]  # length and pairs varied together
    assert recall.plot_panels([(128, None), (256, None)]) == [("length", None)]  # passkey
    assert recall.plot_panels([(128, None)]) == [("cells", None)]


def test_recall_cross_grid_plots_both_axes_and_set_for_changes_one_model(tmp_path, one_thread):
    recall = _load_recall()
    out, png = tmp_path / "cross.json", tmp_path / "cross.png"
    cross = ((24, 3), (40, 3), (56, 3), (40, 2), (40, 4))
    argv = ["--toy", "--models", "attention,linear:grm", "--cells", ",".join(f"{L}:{n}" for L, n in cross),
            "--seeds", "0,1", "--lrs", "1e-3", "--sweep", "first", "--set-for", "linear:grm:model.conv_size=0",
            "--out", str(out), "--plot", str(png), "--set", "train.device=cpu"]
    assert recall.main(argv) == 0
    results = json.loads(out.read_text())
    cells = results["cells"]
    assert set(cells) == {f"{m}/L{L}/n{n}/s{seed}/lr0.001" for m in ("attention", "linear:grm") for L, n in cross
                          for seed in (0, 1)}
    assert results["set_for"] == {"linear:grm": ["model.conv_size=0"]}
    # --set-for reached linear:grm's runs (no convolution: its parameter count) and not attention's
    config = RunConfig.load(ROOT / "examples" / "main_job.json")
    assert config.model.conv_size == 4
    def params(extra):
        return sum(p.numel() for p in MCLanguageModel(config.with_overrides(recall.TOY + extra).model).parameters())
    no_conv = params(["model.memory=linear", "model.aggregation=grm", "model.conv_size=0"])
    assert no_conv != params(["model.memory=linear", "model.aggregation=grm"])
    assert all(cells[f"linear:grm/L{L}/n{n}/s0/lr0.001"]["num_params"] == no_conv for L, n in cross)
    assert cells["attention/L24/n3/s0/lr0.001"]["num_params"] == params(["model.mixer=attention"])

    drawn = recall.plot(results["summary"], ["attention", "linear:grm"], list(cross), str(png))
    _assert_png(png)
    by_hand = {(m, L, n): sum(cells[f"{m}/L{L}/n{n}/s{seed}/lr0.001"]["eval_accuracy"] for seed in (0, 1)) / 2
               for m in ("attention", "linear:grm") for L, n in cross}
    assert list(drawn) == ["A: accuracy vs length, 3 key-value pairs", "B: accuracy vs pairs, length 40"]
    for model in ("attention", "linear:grm"):
        xs, means = drawn["A: accuracy vs length, 3 key-value pairs"][model]
        assert xs == [24, 40, 56]
        assert all(math.isclose(mean, by_hand[model, L, 3]) for mean, L in zip(means, xs)), (model, means)
        xs, means = drawn["B: accuracy vs pairs, length 40"][model]
        assert xs == [2, 3, 4]
        assert all(math.isclose(mean, by_hand[model, 40, n]) for mean, n in zip(means, xs)), (model, means)
    # --report trains nothing and counts only the runs made under this config: seed 2 was never trained, and
    # under another config (attention's --set-for) every attention run is stale
    summary = results["summary"]
    assert recall.main(argv + ["--report", "--seeds", "0,1,2"]) == 0
    reported = json.loads(out.read_text())
    assert reported["cells"] == cells
    for group, row in reported["summary"].items():
        assert row["seeds"] == [0, 1] and row["missing"] == [2] and math.isclose(row["mean"], summary[group]["mean"])
    assert recall.main(argv + ["--report", "--set-for", "attention:model.conv_size=0"]) == 0
    reported = json.loads(out.read_text())["summary"]
    assert reported["attention/L24/n3"]["missing"] == [0, 1] and reported["attention/L24/n3"]["mean"] is None
    assert reported["linear:grm/L24/n3"]["missing"] == [] and reported["linear:grm/L24/n3"]["seeds"] == [0, 1]
    assert recall.main(argv + ["--report", "--cells", "24:3,72:3"]) == 0  # no rate chosen at 72: never trained
    reported = json.loads(out.read_text())["summary"]
    assert reported["attention/L72/n3"]["lr"] is None and reported["attention/L72/n3"]["missing"] == [0, 1]
    assert reported["attention/L24/n3"]["seeds"] == [0, 1]
    # the old diagonal grid still plots: one panel, its cells side by side
    diagonal = [(24, 3), (40, 4)]
    rows = {key: row for key, row in results["summary"].items() if (row["seq_len"], row["num_kv_pairs"]) in diagonal}
    drawn = recall.plot(rows, ["attention"], diagonal, str(tmp_path / "diagonal.png"))
    _assert_png(tmp_path / "diagonal.png")
    xs, means = drawn["accuracy by cell"]["attention"]
    assert xs == ["L24/n3", "L40/n4"] and math.isclose(means[1], by_hand["attention", 40, 4])


def test_best_rate_is_the_lowest_within_the_tie_and_never_a_diverged_one():
    recall = _load_recall()
    def cells(scores):
        return {f"m/L64/n4/s0/lr{lr:g}": ({"diverged": "nan"} if score is None else
                                          {"eval_accuracy": score, "eval_loss": 1.0 - score}) for lr, score in scores}
    lrs = (1e-3, 3e-3, 1e-2)
    for scores, best in ((dict(zip(lrs, (0.5, 0.995, 1.0))), 3e-3),  # 1e-2 wins by 0.005 < 0.01: a tie
                         (dict(zip(lrs, (0.5, 0.98, 1.0))), 1e-2),   # 1e-2 wins by 0.02
                         (dict(zip(lrs, (0.996, 0.999, None))), 1e-3),
                         (dict(zip(lrs, (0.2, 0.1, 0.0))), 1e-3)):
        assert recall.best_lr(cells(scores.items()), "m", 64, 4, [0], lrs) == best, scores
    assert recall.best_lr(cells(zip(lrs, (0.5, 0.98, 1.0))), "m", 64, 4, [0], lrs, tie=0.05) == 3e-3
    try:
        recall.best_lr(cells(zip(lrs, (None, None, None))), "m", 64, 4, [0], lrs)
    except RuntimeError as error:
        assert "diverged at every rate" in str(error)
    else:
        raise AssertionError("every rate diverged, and a rate was chosen")
    # on two seeds the mean decides: seed 0 alone prefers 1e-2 (by 0.024), the mean 3e-3 (0.96 against 0.73)
    two = {**cells(zip(lrs, (0.688, 0.969, 0.993))),
           **{key.replace("/s0/", "/s1/"): value for key, value in cells(zip(lrs, (0.6, 0.952, 0.471))).items()}}
    assert recall.best_lr(two, "m", 64, 4, [0], lrs) == 1e-2
    assert recall.best_lr(two, "m", 64, 4, [0, 1], lrs) == 3e-3
    two["m/L64/n4/s1/lr0.003"] = {"diverged": "nan"}  # a rate that diverged on one of the seeds never wins
    assert recall.best_lr(two, "m", 64, 4, [0, 1], lrs) == 1e-2


def test_code_version_is_of_the_python_sources_only(tmp_path):
    recall = _load_recall()
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    first = recall.code_version(tmp_path)
    (tmp_path / "notes.md").write_text("not code")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.py").write_text("compiled")
    assert recall.code_version(tmp_path) == first
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert recall.code_version(tmp_path) != first
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "sub" / "b.py").rename(tmp_path / "b.py")  # same bytes, another path: other code
    assert recall.code_version(tmp_path) != first
    assert len(recall.code_version()) == 12


def test_a_run_made_by_other_code_is_trained_again_unless_kept(tmp_path, capsys, one_thread):
    recall = _load_recall()
    out = tmp_path / "s.json"
    argv = ["--toy", "--models", "grm", "--cells", "24:3", "--seeds", "0,1", "--lrs", "1e-3", "--out", str(out),
            "--set", "train.device=cpu"]
    assert recall.main(argv) == 0
    first = json.loads(out.read_text())
    old = dict(first["cells"]["grm/L24/n3/s1/lr0.001"], code="0123456789ab", eval_accuracy=0.5)
    first["cells"]["grm/L24/n3/s1/lr0.001"] = old
    del first["cells"]["grm/L24/n3/s0/lr0.001"]["code"]  # a run from before the version was recorded
    out.write_text(json.dumps(first))
    capsys.readouterr()
    assert recall.main(argv + ["--report"]) == 0  # reported as missing, made by other code
    row = json.loads(out.read_text())["summary"]["grm/L24/n3"]
    assert row["missing"] == [0, 1] and row["stale"] == [0, 1] and row["mean"] is None
    assert "made by other code" in capsys.readouterr().out
    assert recall.main(argv + ["--keep-stale"]) == 0  # kept: nothing trains, seed 1 counts with its 0.5
    kept = json.loads(out.read_text())
    assert kept["cells"]["grm/L24/n3/s1/lr0.001"] == old and "stale" not in kept
    assert 0.5 in kept["summary"]["grm/L24/n3"]["accuracy"] and kept["summary"]["grm/L24/n3"]["stale"] == [0, 1]
    assert "seeds [0, 1] made by other code (kept)" in capsys.readouterr().out
    capsys.readouterr()
    assert recall.main(argv) == 0  # trained again: the old runs move to "stale"
    assert capsys.readouterr().out.count("training it again") == 2
    again = json.loads(out.read_text())
    assert [run["key"] for run in again["stale"]] == ["grm/L24/n3/s0/lr0.001", "grm/L24/n3/s1/lr0.001"]
    assert again["stale"][1]["eval_accuracy"] == 0.5
    assert all(run["code"] == recall.code_version() for run in again["cells"].values())
    assert again["cells"]["grm/L24/n3/s1/lr0.001"]["eval_accuracy"] == first["summary"]["grm/L24/n3"]["accuracy"][1]
    assert again["summary"]["grm/L24/n3"]["stale"] == []


def test_a_sweep_on_two_seeds_trains_both_at_every_rate(tmp_path, one_thread):
    recall = _load_recall()
    out = tmp_path / "two.json"
    assert recall.main(["--toy", "--models", "grm", "--cells", "24:3,32:3", "--seeds", "0,1,2", "--lrs", "1e-3,3e-2",
                        "--sweep", "first", "--sweep-seeds", "2", "--out", str(out), "--set", "train.device=cpu"]) == 0
    results = json.loads(out.read_text())
    cells, lr = results["cells"], results["best_lr"]["grm/L24/n3"]
    assert set(cells) == ({f"grm/L24/n3/s{seed}/lr{rate}" for seed in (0, 1) for rate in ("0.001", "0.03")}
                          | {f"grm/L24/n3/s2/lr{lr:g}"} | {f"grm/L32/n3/s{seed}/lr{lr:g}" for seed in (0, 1, 2)})
    mean = {rate: (cells[f"grm/L24/n3/s0/lr{rate}"]["eval_accuracy"] + cells[f"grm/L24/n3/s1/lr{rate}"]["eval_accuracy"])
            / 2 for rate in ("0.001", "0.03")}  # by hand: the lower rate unless the higher wins by more than 0.01
    assert lr == (0.03 if mean["0.03"] > mean["0.001"] + 0.01 else 0.001)
    assert results["best_lr"]["grm/L32/n3"] == lr


def test_params_give_every_model_the_reference_s_count(tmp_path, capsys, one_thread):
    recall = _load_recall()
    config = RunConfig.load(ROOT / "examples" / "main_job.json")

    def params(extra):  # counted here on the CPU, apart from the study's count on the meta device
        return sum(p.numel() for p in MCLanguageModel(config.with_overrides(recall.TOY + extra).model).parameters())

    grm = params(["model.aggregation=grm"])
    unit = 3 * 16 * 1  # a SwiGLU unit: 3 · d_model weights in each of the toy's 1 layer
    base = {name: params(extra) for name, extra in (("attention", ["model.mixer=attention"]),
                                                    ("none", ["model.aggregation=none"]))}
    assert all(abs(count - grm) > unit for count in base.values())  # the sizes differ before matching
    out = tmp_path / "p.json"
    argv = ["--toy", "--models", "attention,none,grm", "--cells", "24:3", "--seeds", "0", "--lrs", "1e-3",
            "--out", str(out), "--set", "train.device=cpu"]
    assert recall.main(argv + ["--params", "grm"]) == 0
    results = json.loads(out.read_text())
    counts = {name: results["cells"][f"{name}/L24/n3/s0/lr0.001"]["num_params"] for name in ("attention", "none", "grm")}
    assert counts["grm"] == grm and results["params"]["target"] == grm and results["params"]["reference"] == "grm"
    assert all(abs(count - grm) <= unit // 2 for count in counts.values()), counts
    assert results["params"]["counts"] == counts
    assert set(results["set_for"]) == {"attention", "none"}  # grm keeps its width
    assert "params: " in capsys.readouterr().out
    assert recall.main(argv + ["--params", "grm", "--report"]) == 0  # the report finds the resized runs
    assert json.loads(out.read_text())["summary"]["attention/L24/n3"]["missing"] == []

    target = grm + 1000  # a count: every model within half a unit of it
    assert recall.main(argv + ["--params", str(target), "--out", str(tmp_path / "q.json")]) == 0
    cells = json.loads((tmp_path / "q.json").read_text())["cells"]
    assert all(abs(cell["num_params"] - target) <= unit // 2 for cell in cells.values()), cells
    capsys.readouterr()
    for extra, words in ((["--params", "100"], "at an MLP width of 1, over the target 100"),
                         (["--params", "ssc"], "--params = 'ssc' is invalid"),
                         (["--params", "0"], "--params = '0' is invalid"),
                         (["--params", "grm", "--set-for", "none:model.mlp_ratio=3"], "expected one of them"),
                         (["--sweep-seeds", "2"], "--sweep-seeds = 2 is invalid")):
        assert recall.main(argv + ["--out", str(tmp_path / "bad.json")] + extra) == 2, extra
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "bad.json").exists()


def test_merge_joins_two_halves_and_refuses_a_run_held_twice_differently(tmp_path, capsys, one_thread):
    recall = _load_recall()
    base = ["--toy", "--cells", "24:3", "--seeds", "0,1", "--lrs", "1e-3", "--set", "train.device=cpu",
            "--params", "5000"]
    halves = {}
    for model in ("attention", "grm"):  # two processes' halves of one study
        halves[model] = tmp_path / f"{model}.json"
        assert recall.main(base + ["--models", model, "--out", str(halves[model])]) == 0
    out = tmp_path / "all.json"
    merge = base + ["--models", "attention,grm", "--out", str(out), "--merge", f"{halves['attention']},{halves['grm']}"]
    assert recall.main(merge) == 0
    merged = json.loads(out.read_text())
    parts = [json.loads(path.read_text()) for path in halves.values()]
    assert merged["cells"] == {**parts[0]["cells"], **parts[1]["cells"]} and len(merged["cells"]) == 4
    assert merged["set_for"] == {**parts[0]["set_for"], **parts[1]["set_for"]}
    assert merged["params"]["counts"] == {**parts[0]["params"]["counts"], **parts[1]["params"]["counts"]}
    rows = merged["summary"]
    assert rows["attention/L24/n3"]["missing"] == [] and rows["grm/L24/n3"]["missing"] == []
    assert rows["grm/L24/n3"]["accuracy"] == parts[1]["summary"]["grm/L24/n3"]["accuracy"]
    assert recall.main(merge) == 0  # merging the same runs again changes nothing
    assert json.loads(out.read_text())["cells"] == merged["cells"]
    half = json.loads(halves["attention"].read_text())  # a stale run is carried over once, however often merged
    half["stale"] = [dict(half["cells"]["attention/L24/n3/s0/lr0.001"], key="attention/L24/n3/s0/lr0.001",
                          replaced="config")]
    halves["attention"].write_text(json.dumps(half))
    assert recall.main(merge) == 0 and recall.main(merge) == 0
    assert json.loads(out.read_text())["stale"] == half["stale"]

    changed = json.loads(halves["grm"].read_text())
    changed["cells"]["grm/L24/n3/s1/lr0.001"]["eval_accuracy"] = 0.5
    halves["grm"].write_text(json.dumps(changed))
    before = out.read_text()
    capsys.readouterr()
    assert recall.main(merge) == 2
    err = capsys.readouterr().err
    assert "hold cells 'grm/L24/n3/s1/lr0.001' differently; expected it in one file only" in err and "Traceback" not in err
    assert out.read_text() == before  # nothing written
