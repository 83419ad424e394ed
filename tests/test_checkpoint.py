import json
import os

import pytest
import torch

from mcdist import checkpoint as checkpoint_module
from mcdist.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, load_model, save_model
from mcdist.config import ModelConfig
from mcdist.model import MCLanguageModel


def _config(**overrides) -> ModelConfig:
    base = dict(vocab_size=37, d_model=24, n_layers=2, n_heads=2, segment_len=8, chunk_len=4, minibatch_len=4,
                memory="gated", aggregation="grm")
    base.update(overrides)
    return ModelConfig(**base)


def _saved(tmp_path, **overrides):
    config = _config(**overrides)
    torch.manual_seed(1)
    model = MCLanguageModel(config).eval()
    directory = tmp_path / "ckpt"
    save_model(model, config, directory)
    return model, config, directory


def _logits(model, seed=2, vocab=37, T=19):
    ids = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _assert_same_logits(a, b):
    la, lb = _logits(a), _logits(b)
    assert torch.isfinite(la).all()
    assert torch.equal(la, lb)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_round_trip_gives_identical_logits(tmp_path, tie):
    model, config, directory = _saved(tmp_path, tie_embeddings=tie)
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary files left
    assert ModelConfig.load(directory / CONFIG_NAME) == config  # config.json is a plain ModelConfig
    loaded, loaded_config = load_model(directory)
    assert loaded_config == config
    assert not loaded.training
    _assert_same_logits(model, loaded)
    if tie:
        params = dict(loaded.named_parameters(remove_duplicate=False))
        shared = [n for n, p in params.items() if any(p is q for m, q in params.items() if m != n)]
        assert shared, "a tied model must share its embedding and output weights after loading"


def test_header_metadata(tmp_path):
    from safetensors import safe_open

    _, config, directory = _saved(tmp_path)
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
        header = handle.metadata()
    assert header["mcdist_format_version"] == "1"
    assert header["mcdist_version"]
    assert json.loads(header["mcdist_config"]) == config.to_dict()


def test_float64_round_trip(tmp_path):
    config = _config()
    model = MCLanguageModel(config).to(torch.float64).eval()
    save_model(model, config, tmp_path / "c")
    loaded, _ = load_model(tmp_path / "c")
    assert next(loaded.parameters()).dtype == torch.float64
    _assert_same_logits(model, loaded)


def test_shared_views_that_are_not_aliases_are_copied(tmp_path):
    class Sliced(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.full = torch.nn.Parameter(torch.randn(6, 4))
            self.register_buffer("first_rows", self.full.data[:3])  # overlaps `full` without being the same view

    model = Sliced(None)
    save_model(model, _config(), tmp_path / "c")
    loaded, _ = load_model(tmp_path / "c", model_factory=Sliced)
    assert torch.equal(loaded.full, model.full) and torch.equal(loaded.first_rows, model.first_rows)


def test_overwrite_replaces_previous(tmp_path):
    model, config, directory = _saved(tmp_path)
    torch.manual_seed(5)
    other = MCLanguageModel(config).eval()
    save_model(other, config, directory)
    loaded, _ = load_model(directory)
    _assert_same_logits(other, loaded)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    _, _, directory = _saved(tmp_path)
    (directory / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=WEIGHTS_NAME) as info:
        load_model(directory)
    assert str(directory) in str(info.value)
    _, _, directory = _saved(tmp_path)
    (directory / CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError, match=CONFIG_NAME) as info:
        load_model(directory)
    assert str(directory) in str(info.value)


@pytest.mark.parametrize("text", ["{ broken", '{"d_model": -3}', '{"colour": 1}'])
def test_invalid_config_json(tmp_path, text):
    _, _, directory = _saved(tmp_path)
    (directory / CONFIG_NAME).write_text(text)
    with pytest.raises(CheckpointError) as info:
        load_model(directory)
    assert str(directory / CONFIG_NAME) in str(info.value)


def test_truncated_weights(tmp_path):
    _, _, directory = _saved(tmp_path)
    path = directory / WEIGHTS_NAME
    data = path.read_bytes()
    for size in (4, 100, len(data) - 7):
        path.write_bytes(data[:size])
        with pytest.raises(CheckpointError) as info:
            load_model(directory)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("where", ["length", "header", "data"])
def test_flipped_bytes(tmp_path, where):
    _, _, directory = _saved(tmp_path)
    path = directory / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    position = {"length": 3, "header": 8, "data": 8 + header_len + 40}[where]
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_model(directory)
    assert str(path) in str(info.value)


def test_config_that_does_not_fit_the_weights(tmp_path):
    _, config, directory = _saved(tmp_path)
    wider = config.replace(d_model=32)
    (directory / CONFIG_NAME).write_text(wider.to_json())
    with pytest.raises(CheckpointError, match="different saves"):
        load_model(directory)


def test_wrong_shapes_missing_and_unexpected_names(tmp_path):
    from safetensors.torch import load_file, save_file

    _, config, directory = _saved(tmp_path)
    path = directory / WEIGHTS_NAME
    original = load_file(str(path))
    name = sorted(original)[0]

    def rewrite(tensors):  # a file without our metadata: only names and shapes are checked
        save_file(tensors, str(path))

    rewrite({**original, name: torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="shapes") as info:
        load_model(directory)
    assert str(path) in str(info.value) and name in str(info.value)

    rewrite({k: v for k, v in original.items() if k != name})
    with pytest.raises(CheckpointError, match="missing tensors") as info:
        load_model(directory)
    assert name in str(info.value)

    rewrite({**original, "extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected tensors: extra.weight"):
        load_model(directory)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, config, directory = _saved(tmp_path)
    torch.manual_seed(9)
    other = MCLanguageModel(config).eval()

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module, "save_file", broken_save_file)
        with pytest.raises(OSError, match="disk full"):
            save_model(other, config, directory)
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]
    _assert_same_logits(model, load_model(directory)[0])

    # the second rename (config.json) fails after the weights were replaced: the old weights come back
    real_replace = os.replace
    calls = []

    def replace_failing_on_config(src, dst):
        calls.append(dst)
        if os.fspath(dst).endswith(CONFIG_NAME):
            raise OSError("rename failed")
        return real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module.os, "replace", replace_failing_on_config)
        with pytest.raises(OSError, match="rename failed"):
            save_model(other, config, directory)
    assert any(os.fspath(c).endswith(WEIGHTS_NAME) for c in calls)
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]
    _assert_same_logits(model, load_model(directory)[0])


# ---------------------------------------------------------------------------------------------------------------
# Sharded checkpoints (Hugging Face layout: model-0000i-of-0000N.safetensors + model.safetensors.index.json)
# ---------------------------------------------------------------------------------------------------------------

from mcdist.checkpoint import INDEX_NAME, shard_name, weight_files  # noqa: E402


def _shards(directory):
    return sorted(name for name in os.listdir(directory) if name.startswith("model-"))


def _state_bytes(model):
    return {name: t.numel() * t.element_size() for name, t in model.state_dict().items()}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_sharded_round_trip_and_index(tmp_path, tie):
    config = _config(tie_embeddings=tie)
    torch.manual_seed(1)
    model = MCLanguageModel(config).eval()
    sizes = _state_bytes(model)
    limit = 3 * max(sizes.values()) // 2  # several tensors per shard, the largest alone
    directory = tmp_path / "sharded"
    save_model(model, config, directory, max_shard_size=limit)

    index = json.loads((directory / INDEX_NAME).read_text())
    shards = _shards(directory)
    assert len(shards) >= 2 and shards == [shard_name(i, len(shards)) for i in range(1, len(shards) + 1)]
    assert sorted(os.listdir(directory)) == sorted([CONFIG_NAME, INDEX_NAME, *shards])  # no model.safetensors
    assert set(index["weight_map"].values()) == set(shards)
    stored = set(index["weight_map"])
    aliases = index["metadata"]["mcdist_aliases"]
    assert stored | set(aliases) == set(sizes) and not stored & set(aliases)
    assert index["metadata"]["total_size"] == sum(sizes[name] for name in stored)
    assert bool(aliases) == tie
    from safetensors import safe_open

    for shard in shards:  # each shard within the limit unless it holds one tensor larger than it
        with safe_open(str(directory / shard), framework="pt") as handle:
            names = list(handle.keys())
            assert handle.metadata()["mcdist_save_id"] == index["metadata"]["mcdist_save_id"]
        assert sorted(names) == sorted(n for n, f in index["weight_map"].items() if f == shard)
        assert len(names) == 1 or sum(sizes[n] for n in names) <= limit
    assert weight_files(directory) == [INDEX_NAME, *shards]

    loaded, loaded_config = load_model(directory)
    assert loaded_config == config
    _assert_same_logits(model, loaded)


def test_switching_layouts_removes_the_previous_files(tmp_path):
    model, config, directory = _saved(tmp_path)  # one file
    save_model(model, config, directory, max_shard_size=2048)
    shards = _shards(directory)
    assert len(shards) > 2 and WEIGHTS_NAME not in os.listdir(directory)
    (directory / "notes.txt").write_text("mine")  # other files in the folder are left alone

    torch.manual_seed(5)
    other = MCLanguageModel(config).eval()
    save_model(other, config, directory, max_shard_size="8KB")  # fewer shards: the old ones go
    assert _shards(directory) != shards and not set(_shards(directory)) & set(shards)
    _assert_same_logits(other, load_model(directory)[0])

    save_model(model, config, directory)  # back to one file
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME, "notes.txt"]
    _assert_same_logits(model, load_model(directory)[0])


def _sharded(tmp_path, name="ckpt", seed=1):
    config = _config()
    torch.manual_seed(seed)
    model = MCLanguageModel(config).eval()
    directory = tmp_path / name
    save_model(model, config, directory, max_shard_size=2048)
    return model, config, directory


def test_damaged_shards_and_index_are_refused_naming_the_file(tmp_path):
    model, config, directory = _sharded(tmp_path)
    shard = directory / _shards(directory)[1]
    original = shard.read_bytes()

    shard.write_bytes(original[:-7])
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(directory)
    flipped = bytearray(original)
    flipped[-3] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=f"{shard.name}: tensor data is corrupt"):
        load_model(directory)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard {shard.name}"):
        load_model(directory)
    shard.write_bytes(original)
    _assert_same_logits(model, load_model(directory)[0])

    index = directory / INDEX_NAME
    text = index.read_text()
    index.write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="unreadable index"):
        load_model(directory)
    entries = json.loads(text)
    entries["weight_map"] = {name: "../elsewhere.safetensors" for name in entries["weight_map"]}
    index.write_text(json.dumps(entries))
    with pytest.raises(CheckpointError, match="not a file name in the folder"):
        load_model(directory)
    entries = json.loads(text)
    moved = next(iter(entries["weight_map"]))
    entries["weight_map"][moved] = shard.name if entries["weight_map"][moved] != shard.name else _shards(directory)[0]
    index.write_text(json.dumps(entries))
    with pytest.raises(CheckpointError, match="does not hold the tensors"):
        load_model(directory)


def test_a_shard_from_another_save_is_refused(tmp_path):
    _, _, directory = _sharded(tmp_path, "a", seed=1)
    _, _, other = _sharded(tmp_path, "b", seed=2)  # same config, same shard names, other weights
    name = _shards(directory)[0]
    (directory / name).write_bytes((other / name).read_bytes())
    with pytest.raises(CheckpointError, match="belongs to another save"):
        load_model(directory)


def test_a_failed_sharded_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, config, directory = _sharded(tmp_path)
    before = sorted(os.listdir(directory))
    torch.manual_seed(9)
    other = MCLanguageModel(config).eval()
    real_replace = os.replace
    calls = []

    failing = []

    def replace_failing(src, dst):
        calls.append(dst)
        if len(calls) == failing[0]:
            raise OSError("disk went away")
        return real_replace(src, dst)

    # into the same layout (fails after two shards were renamed into place), and into one file (fails on
    # config.json, after the shards were removed and model.safetensors renamed into place)
    for target, fail_at in ((2048, 3), (None, 2)):
        calls.clear()
        failing[:] = [fail_at]
        with monkeypatch.context() as patch:
            patch.setattr(checkpoint_module.os, "replace", replace_failing)
            with pytest.raises(OSError, match="disk went away"):
                save_model(other, config, directory, **({"max_shard_size": target} if target else {}))
        assert sorted(os.listdir(directory)) == before  # no temporary or backup files left
        _assert_same_logits(model, load_model(directory)[0])


def test_invalid_shard_size_is_refused(tmp_path):
    model, config, _ = _saved(tmp_path)
    for bad in (0, -1, "lots", "5XB"):
        with pytest.raises(ValueError, match="size"):
            save_model(model, config, tmp_path / "x", max_shard_size=bad)


def test_leftover_backups_are_named_when_a_checkpoint_does_not_load(tmp_path):
    _, _, directory = _saved(tmp_path)
    os.rename(directory / WEIGHTS_NAME, directory / f".{WEIGHTS_NAME}.bak-123-abc")  # as a killed save leaves it
    with pytest.raises(CheckpointError, match=r"\.model\.safetensors\.bak-123-abc"):
        load_model(directory)


@pytest.mark.parametrize("before, after", [(None, 2048), (2048, None), (2048, "8KB")],
                         ids=["one-file-to-shards", "shards-to-one-file", "shards-to-fewer-shards"])
def test_a_layout_switch_killed_at_any_rename_or_unlink_loads_the_old_or_the_new_weights(tmp_path, monkeypatch,
                                                                                       before, after):
    """Snapshot the folder before every rename/unlink of a save (every state a kill can leave); each one loads
    whole, the old weights or the new (same config), never a mix nor nothing."""
    import shutil

    config = _config()
    torch.manual_seed(1)
    old = MCLanguageModel(config).eval()
    torch.manual_seed(5)
    new = MCLanguageModel(config).eval()
    directory = tmp_path / "ckpt"
    save_model(old, config, directory, **({} if before is None else {"max_shard_size": before}))
    snapshots = []
    for name in ("replace", "unlink", "rename"):
        original = getattr(os, name)

        def wrapped(*args, _original=original, **kwargs):
            target = tmp_path / "snapshots" / f"{len(snapshots):02d}"
            shutil.copytree(directory, target)
            snapshots.append(target)
            return _original(*args, **kwargs)

        monkeypatch.setattr(checkpoint_module.os, name, wrapped)
    save_model(new, config, directory, **({} if after is None else {"max_shard_size": after}))
    monkeypatch.undo()
    snapshots.append(directory)
    old_logits, new_logits = _logits(old), _logits(new)
    seen = []
    for folder in snapshots:
        logits = _logits(load_model(folder)[0])
        assert torch.isfinite(logits).all()
        assert torch.equal(logits, old_logits) or torch.equal(logits, new_logits), folder.name
        seen.append("old" if torch.equal(logits, old_logits) else "new")
    assert seen[0] == "old" and seen[-1] == "new" and len(snapshots) >= 4
