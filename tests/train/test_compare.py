"""`mcdist compare` in one process: a model list may name the attention baseline beside aggregations, each name
becomes the run it says (checked against the saved run config and the saved weights), per-model overrides reach
only their model, and bad lists are one-line errors with exit 2. (Local vs Ray equality: tests/train/test_ray.py.)"""

import json

import pytest

from mcdist import cli
from mcdist.checkpoint import load_model
from mcdist.config import ConfigError, RunConfig
from mcdist.train.compare import compare_aggregations, compare_models, model_overrides, parse_model_names

TINY = ["model.vocab_size=32", "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.memory=gated",
        "model.segment_len=8", "model.chunk_len=4", "train.seq_len=24", "train.batch_size=3",
        "train.num_kv_pairs=3", "train.steps=2", "train.warmup_steps=1", "train.lr=1e-2", "train.log_every=1",
        "train.eval_every=2", "train.eval_batches=1", "train.device=cpu", "train.seed=3", "train.resume=never",
        "train.progress=false", "parallel.sp=1", "parallel.dp=1"]


def _saved_model(out_dir, name):
    run = RunConfig.load(out_dir / name / "run_config.json")
    return run, load_model(out_dir / name / "checkpoint")[0]


def test_compare_models_trains_attention_beside_aggregations(tmp_path):
    base = RunConfig().with_overrides(TINY + [f"train.out_dir={tmp_path}"])
    results = compare_models(base, ["attention", "grm", "none"], log=None,
                             overrides_for={"none": ["model.state_init=independent"]})
    assert list(results) == ["attention", "grm", "none"]
    for name, result in results.items():
        assert 0.0 <= result["eval_accuracy"] <= 1.0, name
        assert sorted(result["accuracy_at"]) == ["48", "96"], name
    attention, attention_model = _saved_model(tmp_path, "attention")
    grm, grm_model = _saved_model(tmp_path, "grm")
    none, none_model = _saved_model(tmp_path, "none")
    assert (attention.model.mixer, grm.model.mixer, none.model.mixer) == ("attention", "mc", "mc")
    assert (grm.model.aggregation, none.model.aggregation) == ("grm", "none")
    assert (grm.model.state_init, none.model.state_init) == ("checkpoint", "independent")  # only none's changed
    # the saved weights are those of the mixer named: attention has no decay projection, grm has its connector
    names = {key: {param for param, _ in model.named_parameters()}
             for key, model in (("attention", attention_model), ("grm", grm_model), ("none", none_model))}
    assert not any("decay_proj" in param for param in names["attention"])
    assert any("decay_proj" in param for param in names["grm"]) and any("decay_proj" in param for param in names["none"])
    assert any("connector" in param for param in names["grm"]) and not any("connector" in param for param in names["none"])


def test_model_names_are_checked():
    assert parse_model_names(" attention, grm,none ") == ["attention", "grm", "none"]
    assert model_overrides("attention") == ["model.mixer=attention"]
    assert model_overrides("soup") == ["model.mixer=mc", "model.aggregation=soup"]
    with pytest.raises(ConfigError, match="model 'grn' is unknown"):
        parse_model_names("attention,grn")
    with pytest.raises(ConfigError, match="more than once"):
        parse_model_names("grm,grm")
    with pytest.raises(ConfigError, match="is empty"):
        parse_model_names(" , ")
    base = RunConfig().with_overrides(TINY)
    with pytest.raises(ConfigError, match="aggregation 'attention' is unknown"):
        compare_aggregations(base, ["attention"], log=None)
    with pytest.raises(ConfigError, match=r"not compared"):
        compare_models(base, ["grm"], overrides_for={"none": ["model.state_init=checkpoint"]}, log=None)


def _cli(tmp_path, *flags):
    argv = ["compare", "--quiet", *flags, "--set", f"train.out_dir={tmp_path}"]
    for item in TINY:
        argv += ["--set", item]
    return cli.main(argv)


def test_cli_models_flag_and_its_summary(tmp_path, capsys):
    assert _cli(tmp_path, "--models", "attention,none") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(summary) == ["attention", "none"]
    assert all(0.0 <= summary[name]["eval_accuracy"] <= 1.0 for name in summary)
    assert RunConfig.load(tmp_path / "attention" / "run_config.json").model.mixer == "attention"


@pytest.mark.parametrize("flags, message", [
    (["--models", "attention,grm", "--aggregations", "grm"], "--models and --aggregations were both given"),
    (["--aggregations", "attention,grm"], "--aggregations names attention"),
    (["--models", "attention,lstm"], "model 'lstm' is unknown"),
    (["--set-for", "grm"], "--set-for 'grm' is invalid"),
], ids=["both-lists", "attention-as-aggregation", "unknown-model", "bad-set-for"])
def test_cli_bad_model_lists_are_one_line_errors(tmp_path, capsys, flags, message):
    assert _cli(tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "grm").exists()  # nothing trained


def test_set_for_splits_at_the_last_colon_before_the_value():
    from mcdist.cli import UsageError, parse_set_for

    assert parse_set_for(["titans:grm:train.lr=1e-3", "none:model.state_init=checkpoint", "grm:train.lr=3e-3"]) == {
        "titans:grm": ["train.lr=1e-3"], "none": ["model.state_init=checkpoint"], "grm": ["train.lr=3e-3"]}
    for bad in ("grm", "grm:", ":train.lr=1", "train.lr=1"):
        with pytest.raises(UsageError, match="--set-for"):
            parse_set_for([bad])
