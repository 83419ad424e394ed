"""The output gate's bias: the gate starts open (SiLU(x W_gate + b) ≈ 1), and a model saved before the bias
existed (its config.json has no output_gate_bias) still loads and computes what it computed."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mcdist.checkpoint import CONFIG_NAME, load_model, save_model
from mcdist.config import ConfigError, ModelConfig, RunConfig
from mcdist.layer import MemoryCachingLayer
from mcdist.model import MCLanguageModel


def _config(**overrides):
    base = dict(vocab_size=37, d_model=24, n_layers=2, n_heads=2, segment_len=8, chunk_len=4, memory="gated",
                aggregation="grm")
    base.update(overrides)
    return ModelConfig(**base)


def test_gate_starts_open():
    torch.manual_seed(0)
    layer = MemoryCachingLayer(_config(d_model=64, n_heads=4))
    b = layer.gate_proj.bias.detach().double()
    assert torch.all(b == b[0])
    assert abs(float(b[0]) * (1.0 / (1.0 + math.exp(-float(b[0])))) - 1.0) < 1e-6  # SiLU(b) = 1 (float32), by hand
    x = torch.randn(4096, 64)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))  # rms 1, as after the block's RMSNorm
    with torch.no_grad():
        gate = F.silu(layer.gate_proj(x))
    assert 0.95 < float(gate.mean()) < 1.05 and float(gate.std()) < 0.3
    legacy = MemoryCachingLayer(_config(d_model=64, n_heads=4, output_gate_bias=0.0))
    assert legacy.gate_proj.bias is None
    with torch.no_grad():
        assert float(F.silu(legacy.gate_proj(x)).abs().mean()) < 0.15  # the old start: a gate near 0


def test_model_saved_before_the_bias_loads_unchanged(tmp_path):
    config = _config(output_gate_bias=0.0)
    torch.manual_seed(1)
    model = MCLanguageModel(config).eval()
    save_model(model, config, tmp_path / "old")
    path = tmp_path / "old" / CONFIG_NAME
    saved = json.loads(path.read_text())
    del saved["output_gate_bias"]  # as written before the field existed
    path.write_text(json.dumps(saved))
    loaded, loaded_config = load_model(tmp_path / "old")
    assert loaded_config.output_gate_bias == 0.0
    ids = torch.randint(0, 37, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_partial_configs_get_the_open_gate():
    assert ModelConfig.from_dict({"d_model": 24, "n_heads": 2}).output_gate_bias == pytest.approx(1.2784645, 1e-6)
    assert RunConfig.from_dict({"model": {"output_gate": True}}).model.output_gate_bias > 1.0
    full = _config().to_dict()
    assert ModelConfig.from_dict(full) == _config()  # a config saved now keeps its bias


@pytest.mark.parametrize("value", [float("nan"), "open", True, float("inf")])
def test_bad_gate_bias(value):
    with pytest.raises(ConfigError, match="model.output_gate_bias"):
        _config(output_gate_bias=value)
