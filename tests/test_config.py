import json

import pytest

from mcdist.config import ConfigError, ModelConfig, ParallelConfig, RunConfig, TrainConfig


def _custom() -> RunConfig:
    return RunConfig(
        model=ModelConfig(vocab_size=97, d_model=48, n_heads=3, memory="gated", aggregation="ssc", top_k=3,
                          segment_len=24, chunk_len=8, minibatch_len=4, norm_eps=1e-5, tie_embeddings=True),
        parallel=ParallelConfig(dp=2, sp=3, layout="contiguous"),
        train=TrainConfig(seq_len=120, steps=7, lr=1e-3, out_dir="runs/a b \"quoted\"", dtype="float64"),
    )


def test_json_round_trip(tmp_path):
    config = _custom()
    path = tmp_path / "run.json"
    config.save(path)
    assert RunConfig.load(path) == config
    assert RunConfig.from_json(config.to_json()) == config


def test_toml_round_trip(tmp_path):
    config = _custom()
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    loaded = RunConfig.load(path)
    assert loaded == config
    assert isinstance(loaded.model.mlp_ratio, float) and loaded.model.tie_embeddings is True


def test_partial_file_keeps_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\naggregation = "none"\n[train]\nsteps = 3\n')
    loaded = RunConfig.load(path)
    assert loaded.model.aggregation == "none" and loaded.train.steps == 3
    assert loaded.model.d_model == ModelConfig().d_model and loaded.parallel == ParallelConfig()


@pytest.mark.parametrize("data, words", [
    ({"model": {"d_modle": 64}}, ["d_modle", "d_model"]),
    ({"trian": {}}, ["trian", "train"]),
    ({"train": {"seed": 0, "bogus": 1}}, ["bogus"]),
])
def test_unknown_keys_are_named(data, words):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(data)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("section, key, value", [
    ("model", "d_model", -4),
    ("model", "d_model", 64.5),
    ("model", "n_layers", True),
    ("model", "memory", "lstm"),
    ("model", "aggregation", "max"),
    ("model", "chunk_len", 5),  # does not divide segment_len = 64
    ("model", "tie_embeddings", "yes"),
    ("model", "mlp_ratio", float("nan")),
    ("parallel", "layout", "ring"),
    ("parallel", "sp", 0),
    ("train", "lr", 0),
    ("train", "weight_decay", "abc"),
    ("train", "grad_clip", -1.0),
    ("train", "seed", "one"),
    ("train", "dtype", "float16"),
    ("train", "out_dir", ""),
])
def test_bad_values_name_the_field(section, key, value):
    data = RunConfig().to_dict()
    data[section][key] = value
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(data)
    assert f"{section}.{key}" in str(info.value)


def test_invalid_json_and_toml_files(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunConfig.load(bad_json)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[model\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        RunConfig.load(bad_toml)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        RunConfig.load(tmp_path / "missing.json")


def test_overrides():
    config = RunConfig().with_overrides([
        "model.aggregation=none", "model.segment_len=32", "train.lr=1", "train.out_dir=123",
        "model.output_gate=false", "train.steps=5", "train.steps=6",
    ])
    assert config.model.aggregation == "none" and config.model.segment_len == 32
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.out_dir == "123"  # a string field keeps the text
    assert config.model.output_gate is False
    assert config.train.steps == 6  # later overrides win


@pytest.mark.parametrize("override, words", [
    ("model.d_model", ["model.d_model", "section.key=value"]),
    ("d_model=3", ["d_model", "section.key"]),
    ("modle.d_model=3", ["modle"]),
    ("model.dmodel=3", ["dmodel"]),
    ("model.d_model=abc", ["model.d_model", "abc"]),
    ("model.segment_len=30", ["chunk_len", "segment_len"]),
])
def test_bad_overrides_raise(override, words):
    with pytest.raises(ConfigError) as info:
        RunConfig().with_overrides([override])
    for word in words:
        assert word in str(info.value)


def test_example_config_is_valid():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    for path in sorted((root / "examples").glob("*.json")):
        data = json.loads(path.read_text())
        if set(data) <= set(RunConfig.SECTIONS):
            RunConfig.load(path)
