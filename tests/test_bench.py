"""Smoke test of the CPU benchmark: `--quick` runs end to end and writes a complete JSON report.

No timing assertions (times depend on the machine); only that every field is there, times are positive and
finite, and the cached-state counts match N·H·d².
"""

import json
import math

import pytest

from mcdist import bench


def _positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_environment_is_recorded(quick_report):
    env = quick_report["environment"]
    for key in ("torch", "cpu_model", "threads", "logical_cpus", "load_average_start", "load_average_end",
                "source_sha256"):
        assert key in env, key
    assert env["threads"] == 2
    assert env["cpu_model"]
    assert quick_report["quick"] is True


def test_chunked_vs_reference_has_positive_times(quick_report):
    loop = quick_report["chunked_vs_reference"]
    for impl in ("chunked", "reference"):
        run = loop[impl]
        assert run["repeats"] == len(run["times_s"]) >= 1
        assert all(_positive(t) for t in run["times_s"] + run["forward_s"])
        assert _positive(run["median_s"]) and _positive(run["median_cpu_s"])
    assert _positive(loop["speedup"]) and loop["target"] == 50.0
    assert loop["meets_target"] == (loop["speedup"] >= 50.0)


def test_every_variant_and_sdpa_is_measured_at_every_size(quick_report):
    rows = quick_report["layer_vs_sdpa"]
    sizes = quick_report["settings"]["sizes"]
    names = {(row["name"], row["seq_len"]) for row in rows}
    assert names == {(name, T) for name in ("sdpa", "attention", "none", "residual", "grm", "ssc") for T in sizes}
    for row in rows:
        assert row["mode"] == "forward+backward", row  # quick sizes are far below the time limit
        assert row["repeats"] == len(row["times_s"]) >= 1
        assert all(_positive(t) for t in row["times_s"])
        assert _positive(row["median_s"]) and _positive(row["forward_median_s"])
        assert row["head_dim"] * row["n_heads"] == quick_report["settings"]["layer"]["d_model"]
        if row["name"] != "sdpa":
            for key in ("ratio_to_sdpa", "cpu_ratio_to_sdpa", "forward_ratio_to_sdpa"):
                assert _positive(row[key]), (row["name"], row["seq_len"], key)
        if row["name"] not in ("sdpa", "attention"):  # each MC layer beside the whole attention mixer
            assert _positive(row["ratio_to_attention_layer"]), (row["name"], row["seq_len"])


def test_cached_state_counts_match_the_formula(quick_report):
    rows = quick_report["cached_states"]
    linear = [row for row in rows if row["memory"] == "linear"]
    assert len(linear) == 4 * len(quick_report["settings"]["sizes"])
    for row in rows:
        n_segments = -(-row["seq_len"] // row["segment_len"])
        assert row["n_segments"] == n_segments
        per_state = row["head_dim"] ** 2 * (2 * row["expansion"] if row["memory"] == "dla" else 1)
        assert row["expected"] == n_segments * row["n_heads"] * per_state
        assert row["values"] == row["expected"] and row["matches"] is True
        assert row["bytes"] == 4 * row["values"]  # float32 states
    assert any(row["memory"] == "dla" for row in rows)


def test_predictor_and_repeats():
    assert bench.predict_seconds([], 1024) is None
    assert bench.predict_seconds([(1000, 1.0)], 2000) is None  # one point: measure, do not guess
    assert bench.predict_seconds([(1000, 1.0), (2000, 2.0)], 4000) == pytest.approx(4.0)  # fitted exponent 1
    assert bench.predict_seconds([(1000, 1.0), (2000, 16.0)], 4000) == pytest.approx(64.0)  # clamped to 2
    assert bench.repeats_for(4096, False) == (5, 1)
    assert bench.repeats_for(65536, False) == (1, 0)


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--sizes", "64,abc", "--out", str(tmp_path / "x.json")])


def test_table_reprints_a_saved_report(quick_report, tmp_path, capsys):
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(quick_report))
    assert bench.main(["--table", str(saved)]) == 0
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "cpu/SDPA" in printed and "N*H*d^2" in printed
