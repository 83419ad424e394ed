"""Smoke tests of the benchmark scripts under benchmarks/ that the docs quote (not timings): they run end to end
on a small case and write a complete JSON report."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_cpu_runs_the_trainer_and_reports_tokens_and_memory(tmp_path):
    out = tmp_path / "train.json"
    report = _load("train_cpu").main(["--cases", "4096x2", "--steps", "2", "--model", "tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    (case,) = report["cases"]
    assert (case["seq_len"], case["sp"], case["tokens_per_rank"], case["steps"]) == (4096, 2, 2048, 2)
    assert all(math.isfinite(r) and r > 0 for r in case["tokens_per_s"])
    assert case["step_s_median"] == pytest.approx(4096 / case["tokens_per_s_median"])
    assert 0.1 < case["peak_rss_gib_max_over_ranks"] < 8
    assert case["comm_bytes_per_step"]["sp_received"] > 0
    assert all(math.isfinite(loss) for loss in case["losses"])


def test_train_cpu_refuses_a_malformed_case():
    with pytest.raises(SystemExit):
        _load("train_cpu").main(["--cases", "4096by2"])


@pytest.mark.slow  # about 2 minutes on 2 cores: the Triton variant runs the kernels under the interpreter
def test_gpu_script_train_section_runs_on_cpu():
    """benchmarks/gpu.py's `train` section (the trainer on the lent GPU) at its smoke size here: the resumed run
    retraces the straight one, and the loss falls. Run it (make test-slow) before a GPU session."""
    result = _load("gpu").train_check("cpu", smoke=True)
    assert result["resume_max_loss_gap"] == 0.0
    assert result["loss_fell"]
    assert all(math.isfinite(result[name]["eval_loss"]) for name in ("triton", "chunked"))


@pytest.mark.slow  # about 1.5 minutes: the Triton kernels under the interpreter
def test_gpu_script_packed_section_runs_on_cpu():
    """benchmarks/gpu.py's `packed` section at its smoke size: packed documents on the Triton kernels (interpreter)
    equal each document alone in float32; bf16 runs and is reported; the 1-vs-64-documents timing is written."""
    result = _load("gpu").packed_check("cpu", smoke=True)
    fp32 = [row for row in result["checks"] if row["dtype"] == "float32"]
    assert len(fp32) == 2 and all(row["logits"] < 1e-5 and row["grad_params"] < 1e-4 for row in fp32)
    assert all(math.isfinite(row["logits"]) and row["logits"] < 0.05 for row in result["checks"])
    assert [row["documents"] for row in result["timing"]] == [1, 64] and result["timing"][1]["ratio_to_one"] > 0


@pytest.mark.slow  # the Triton kernels under the interpreter
def test_gpu_script_mixers_section_runs_on_cpu():
    """benchmarks/gpu.py's `mixers` section at its smoke size: every mixer timed beside attention."""
    rows = _load("gpu").mixers_bench("cpu", smoke=True)
    assert [row["mixer"] for row in rows] == ["attention", "none", "grm", "ssc"]
    assert rows[0]["vs_attention"] == 1.0 and all(row["ms"] > 0 and math.isfinite(row["ms"]) for row in rows)


def test_gpu_script_infer_section_runs_on_cpu():
    """benchmarks/gpu.py's `infer` section at its smoke size: decoding matches the full forward."""
    result = _load("gpu").infer_check("cpu", smoke=True)
    assert result["fp32_decode_vs_forward"] < 1e-5
    assert [row["aggregation"] for row in result["speed"]] == ["grm", "none"]
    assert all(row["decode_ms"] > 0 and row["prefill_s"] > 0 for row in result["speed"])


def test_infer_cpu_benchmark_reports_decode_beside_the_forward(tmp_path):
    out = tmp_path / "infer.json"
    assert _load("infer_cpu").main(["--lengths", "512", "--tokens", "2", "--aggregations", "grm",
                                    "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["prompt"] == 512 and row["cached_states"] == 2 and row["max_logit_diff"] < 1e-5
