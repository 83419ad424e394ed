"""Typed, self-validating configuration.

Every config is a dataclass that checks itself in ``__post_init__`` and round-trips through JSON. Unknown keys
are errors that name the key and list the known ones; bad values name the field, the value and what was
expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

MEMORY_KINDS = ("linear", "gated", "swla", "dla", "titans")
LINEAR_MEMORY_KINDS = ("linear", "gated", "swla")  # swla: sliding-window linear attention, c = 2
DEEP_MEMORY_KINDS = ("dla", "titans")
AGGREGATIONS = ("none", "residual", "grm", "soup", "ssc")
STATE_INITS = ("checkpoint", "independent")
POOLS = ("mean", "sum")
QK_NORMS = ("l2", "none")
SEGMENTATIONS = ("constant", "logarithmic")
LAYOUTS = ("contiguous", "zigzag")
IMPLS = ("auto", "chunked", "reference", "triton")
MIXERS = ("mc", "attention")
OPEN_GATE_BIAS = 1.278464542761074  # the root of SiLU(b) = b·sigmoid(b) = 1; SiLU'(b) ≈ 1.0 there
# fields every saved model config has held since the first release (output_gate among them): a model section
# holding all of them but no output_gate_bias was saved before the gate had a bias (docs/math.md §7)
_SAVED_BEFORE_GATE_BIAS = frozenset((
    "vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "mlp_ratio", "tie_embeddings", "norm_eps", "memory",
    "aggregation", "state_init", "segmentation", "segment_len", "chunk_len", "top_k", "pool", "gate_scale",
    "share_uq", "qk_norm", "output_gate", "output_norm", "expansion", "minibatch_len", "inner_lr", "init_std"))


class ConfigError(ValueError):
    """A configuration value or key is invalid."""


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes of a size given as an integer or a string such as ``"500MB"``, ``"5GB"``, ``"2GiB"``, ``"4096"``."""
    if isinstance(value, bool):
        raise ValueError(f"size {value!r} is invalid; expected a positive number of bytes or a string like '5GB'")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size {value!r} is invalid; expected a positive number of bytes")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(value).upper())
    if not isinstance(value, str) or not match or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"size {value!r} is invalid; expected a positive number of bytes or a string like "
                         "'500MB', '5GB', '2GiB'")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size <= 0:
        raise ValueError(f"size {value!r} is invalid; expected a positive size")
    return size


def _check_choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name} = {value!r} is invalid; expected one of {list(choices)}")


def _check_positive_int(section: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{section}.{name} = {value!r} is invalid; expected a positive integer")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive_float(section: str, name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{section}.{name} = {value!r} is invalid; expected a positive finite number")


def _int_tuple(section: str, name: str, value: Any) -> tuple:
    """A tuple of positive integers from a list/tuple of them, or from text such as ``"4096,16384"`` (``--set``)."""
    items = value
    if isinstance(value, str):
        try:
            items = [int(part) for part in value.replace(" ", "").strip("[]()").split(",") if part]
        except ValueError:
            items = None
    if not isinstance(items, (list, tuple)) or not all(
            isinstance(item, int) and not isinstance(item, bool) and item > 0 for item in items):
        raise ConfigError(f"{section}.{name} = {value!r} is invalid; expected a list of positive integers, e.g. "
                          "[4096, 16384] (or \"4096,16384\")")
    return tuple(items)


class _Config:
    """Mixin: dict/JSON round trip with strict keys."""

    SECTION = "config"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.SECTION}: expected a mapping of fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.SECTION}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{cls.SECTION}: not valid JSON ({error})") from error
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON atomically (temporary file, then rename)."""
        write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as handle:
            return cls.from_json(handle.read())

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved file gets the usual permissions
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class ModelConfig(_Config):
    """The language model and its Memory Caching mixer (docs/math.md §2–§6).

    ``chunk_len`` is the chunk of the chunkwise-parallel linear memory; ``minibatch_len`` the mini-batch of the
    deep memory's inner gradient descent. Both must divide ``segment_len``.
    """

    SECTION = "model"

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 2
    head_dim: int = 0  # 0 = d_model // n_heads
    mlp_ratio: float = 2.0
    tie_embeddings: bool = False
    norm_eps: float = 1e-6

    memory: str = "linear"
    aggregation: str = "grm"
    state_init: str = "checkpoint"
    segmentation: str = "constant"
    segment_len: int = 64
    chunk_len: int = 16
    top_k: int = 4
    pool: str = "mean"
    gate_scale: float = 0.0  # 0 = 1/sqrt(head_dim)
    share_uq: bool = False
    qk_norm: str = "l2"
    output_gate: bool = True
    # the output gate's initial bias b: SiLU(x W_gate + b), SiLU(b) = 1 at the default, so the gate starts open
    # (≈ 1 ± 0.16) instead of at ≈ ±0.08; 0 = no bias (the gate before this field; docs/math.md §7)
    output_gate_bias: float = OPEN_GATE_BIAS
    output_norm: bool = True
    # short causal depthwise convolution of q, k, v over the last conv_size tokens (then SiLU); 0 = none
    conv_size: int = 0
    # the token mixer of every block: "mc" (Memory Caching) or "attention" (the baseline, docs/math.md,
    # "Attention baseline"); layer_pattern, e.g. "mc,mc,attention", picks one per layer ("" = all `mixer`)
    mixer: str = "mc"
    layer_pattern: str = ""
    rope_base: float = 10000.0  # RoPE of the attention mixer

    # deep memory (dla, titans)
    expansion: int = 2
    minibatch_len: int = 8
    inner_lr: float = 0.1

    init_std: float = 0.02

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """As every section; a legacy ``impl`` key (configs saved before it became the runtime option
        ``train.impl``) is dropped: it chose kernels, not the model."""
        if isinstance(data, Mapping) and "impl" in data:
            data = {key: value for key, value in data.items() if key != "impl"}
        if isinstance(data, Mapping) and "output_gate_bias" not in data and _SAVED_BEFORE_GATE_BIAS <= set(data):
            data = {**data, "output_gate_bias": 0.0}  # saved before the gate had a bias: build it without one
        return super().from_dict(data)

    def __post_init__(self) -> None:
        s = self.SECTION
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "segment_len", "chunk_len", "top_k",
                     "expansion", "minibatch_len"):
            _check_positive_int(s, name, getattr(self, name))
        if not isinstance(self.head_dim, int) or self.head_dim < 0:
            raise ConfigError(f"{s}.head_dim = {self.head_dim!r} is invalid; expected 0 (auto) or a positive integer")
        if self.head_dim == 0 and self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"{s}.d_model = {self.d_model} is not divisible by {s}.n_heads = {self.n_heads}; "
                f"set {s}.head_dim explicitly or pick sizes that divide")
        _check_choice(s, "memory", self.memory, MEMORY_KINDS)
        _check_choice(s, "aggregation", self.aggregation, AGGREGATIONS)
        _check_choice(s, "state_init", self.state_init, STATE_INITS)
        _check_choice(s, "segmentation", self.segmentation, SEGMENTATIONS)
        _check_choice(s, "pool", self.pool, POOLS)
        _check_choice(s, "qk_norm", self.qk_norm, QK_NORMS)
        for name in ("mlp_ratio", "inner_lr", "norm_eps", "init_std"):
            _check_positive_float(s, name, getattr(self, name))
        if isinstance(self.output_gate_bias, bool) or not _is_finite_number(self.output_gate_bias):
            raise ConfigError(f"{s}.output_gate_bias = {self.output_gate_bias!r} is invalid; expected a finite number "
                              f"(0 = no bias; default {OPEN_GATE_BIAS!r}, where SiLU(b) = 1)")
        if not isinstance(self.gate_scale, (int, float)) or self.gate_scale < 0 or not math.isfinite(self.gate_scale):
            raise ConfigError(f"{s}.gate_scale = {self.gate_scale!r} is invalid; expected 0 (= 1/sqrt(head_dim)) "
                              "or a positive number")
        if isinstance(self.conv_size, bool) or not isinstance(self.conv_size, int) or self.conv_size < 0 \
                or self.conv_size == 1 or self.conv_size > self.segment_len + 1:
            raise ConfigError(f"{s}.conv_size = {self.conv_size!r} is invalid; expected 0 (no convolution) or a width "
                              f"in [2, segment_len + 1 = {self.segment_len + 1}]")
        if self.segment_len % self.chunk_len != 0:
            raise ConfigError(f"{s}.chunk_len = {self.chunk_len} does not divide {s}.segment_len = "
                              f"{self.segment_len}; expected a divisor")
        if self.segment_len % self.minibatch_len != 0:
            raise ConfigError(f"{s}.minibatch_len = {self.minibatch_len} does not divide {s}.segment_len = "
                              f"{self.segment_len}; expected a divisor")
        for name in ("tie_embeddings", "share_uq", "output_gate", "output_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{s}.{name} = {getattr(self, name)!r} is invalid; expected true or false")
        _check_choice(s, "mixer", self.mixer, MIXERS)
        _check_positive_float(s, "rope_base", self.rope_base)
        if not isinstance(self.layer_pattern, str):
            raise ConfigError(f"{s}.layer_pattern = {self.layer_pattern!r} is invalid; expected a comma-separated "
                              f"string of {list(MIXERS)}, e.g. \"mc,mc,attention\"")
        if self.layer_pattern.strip():
            kinds = [kind.strip() for kind in self.layer_pattern.split(",")]
            if len(kinds) != self.n_layers or any(kind not in MIXERS for kind in kinds):
                raise ConfigError(f"{s}.layer_pattern = {self.layer_pattern!r} is invalid; expected {self.n_layers} "
                                  f"(= {s}.n_layers) comma-separated mixers, each one of {list(MIXERS)}")
        if "attention" in self.mixers and self.dim_head % 2:
            raise ConfigError(f"{s}.head_dim = {self.dim_head} is odd; an attention layer's RoPE needs an even "
                              "head_dim")

    @property
    def mixers(self) -> tuple:
        """The mixer of each layer, in order ("mc" or "attention")."""
        if self.layer_pattern.strip():
            return tuple(kind.strip() for kind in self.layer_pattern.split(","))
        return (self.mixer,) * self.n_layers

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def scale(self) -> float:
        """The gate temperature τ (docs/math.md §5)."""
        return self.gate_scale or 1.0 / math.sqrt(self.dim_head)

    @property
    def is_deep(self) -> bool:
        return self.memory in DEEP_MEMORY_KINDS

    @classmethod
    def paper_plain(cls, **overrides) -> "ModelConfig":
        """The configuration that is exactly the paper's equations (docs/math.md §7): no additions."""
        base = dict(qk_norm="none", gate_scale=1.0, output_gate=False, output_norm=False)
        base.update(overrides)
        return cls(**base)


@dataclass
class ParallelConfig(_Config):
    """Device mesh, sequence-parallel layout and data parallelism (docs/distributed.md)."""

    SECTION = "parallel"

    dp: int = 1
    sp: int = 1
    layout: str = "zigzag"
    backend: str = "auto"  # auto = nccl on CUDA, gloo on CPU
    timeout_s: float = 300.0
    # FSDP2 over every dp × sp rank: weights, gradients and optimizer state sharded (false: DDP, replicated)
    fsdp: bool = False

    def __post_init__(self) -> None:
        s = self.SECTION
        _check_positive_int(s, "dp", self.dp)
        _check_positive_int(s, "sp", self.sp)
        _check_choice(s, "layout", self.layout, LAYOUTS)
        _check_choice(s, "backend", self.backend, ("auto", "nccl", "gloo"))
        _check_positive_float(s, "timeout_s", self.timeout_s)
        if not isinstance(self.fsdp, bool):
            raise ConfigError(f"{s}.fsdp = {self.fsdp!r} is invalid; expected true or false")

    @property
    def world_size(self) -> int:
        return self.dp * self.sp


@dataclass
class TrainConfig(_Config):
    """Optimisation and the run's bookkeeping."""

    SECTION = "train"

    task: str = "mqar"
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 200
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    # lengths also scored at every evaluation (length generalisation while training), e.g. [4096, 16384]
    eval_seq_lens: tuple = ()
    log_every: int = 10
    out_dir: str = "runs/default"
    num_kv_pairs: int = 8
    dtype: str = "float32"
    # data beyond the built-in tasks: pre-tokenized files (mcdist data prepare)
    data_path: str = ""
    val_data_path: str = ""
    # token files: each window's documents (boundaries after every eos_id the file holds) computed apart, as if
    # each were alone (docs/packing.md); under sequence parallelism each rank reads whole windows
    packed: bool = False
    # optimisation at scale
    grad_accum: int = 1
    min_lr_ratio: float = 0.1
    activation_checkpointing: bool = False
    # LM head + cross-entropy this many tokens at a time (0 = all at once): the full logits are never held
    loss_chunk: int = 0
    # AdamW state sharded over all dp × sp ranks (ZeRO stage 1): each rank holds ~1/world of it
    shard_optimizer: bool = False
    # checkpoints: every N steps (0 = at the end only), keep the last K, resume 'auto' | 'never' | a path
    checkpoint_every: int = 0
    keep_last: int = 3
    resume: str = "auto"
    # a fresh run starts from these weights (a saved model folder: out_dir/checkpoint of an earlier run, a
    # checkpoints/step-N folder); '' = random initialisation. Context extension: train short, then long from here
    init_from: str = ""
    # weights above this size are saved as safetensors shards + model.safetensors.index.json ("500MB", "5GB", bytes)
    max_shard_size: str = "5GB"
    device: str = "auto"
    # which implementation computes the layers: 'auto' (Triton on CUDA, chunked PyTorch on the CPU), 'chunked',
    # 'triton' or 'reference' (token loops); a runtime choice, not part of the model (docs/architecture.md)
    impl: str = "auto"
    progress: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        s = self.SECTION
        _check_choice(s, "task", self.task, ("mqar", "passkey", "tokens"))
        for name in ("seq_len", "batch_size", "steps", "eval_every", "eval_batches", "log_every", "num_kv_pairs",
                     "grad_accum", "keep_last"):
            _check_positive_int(s, name, getattr(self, name))
        if not isinstance(self.checkpoint_every, int) or isinstance(self.checkpoint_every, bool) \
                or self.checkpoint_every < 0:
            raise ConfigError(f"{s}.checkpoint_every = {self.checkpoint_every!r} is invalid; expected an integer "
                              ">= 0 (0 = only at the end)")
        if not isinstance(self.loss_chunk, int) or isinstance(self.loss_chunk, bool) or self.loss_chunk < 0:
            raise ConfigError(f"{s}.loss_chunk = {self.loss_chunk!r} is invalid; expected an integer >= 0 (tokens "
                              "per chunk of the LM head and loss; 0 = all at once)")
        if not _is_finite_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{s}.min_lr_ratio = {self.min_lr_ratio!r} is invalid; expected a number in [0, 1]")
        if self.task == "tokens" and not self.data_path:
            raise ConfigError(f"{s}.task = 'tokens' needs {s}.data_path (a file written by `mcdist data prepare`)")
        if self.packed is True and self.task != "tokens":
            raise ConfigError(f"{s}.packed = true needs {s}.task = 'tokens' (documents of a token file); got task "
                              f"{self.task!r}")
        for name in ("activation_checkpointing", "progress", "tensorboard", "shard_optimizer", "packed"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{s}.{name} = {getattr(self, name)!r} is invalid; expected true or false")
        if not isinstance(self.resume, str) or not self.resume:
            raise ConfigError(f"{s}.resume = {self.resume!r} is invalid; expected 'auto', 'never' or a checkpoint path")
        self.eval_seq_lens = _int_tuple(s, "eval_seq_lens", self.eval_seq_lens)
        if not isinstance(self.init_from, str):
            raise ConfigError(f"{s}.init_from = {self.init_from!r} is invalid; expected a saved model folder or ''")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ConfigError(f"{s}.warmup_steps = {self.warmup_steps!r} is invalid; expected an integer >= 0")
        _check_positive_float(s, "lr", self.lr)
        if not _is_finite_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"{s}.weight_decay = {self.weight_decay!r} is invalid; expected a number >= 0")
        if not _is_finite_number(self.grad_clip) or self.grad_clip < 0:
            raise ConfigError(f"{s}.grad_clip = {self.grad_clip!r} is invalid; expected a number >= 0 (0 = off)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"{s}.seed = {self.seed!r} is invalid; expected an integer >= 0")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ConfigError(f"{s}.out_dir = {self.out_dir!r} is invalid; expected a non-empty path")
        _check_choice(s, "dtype", self.dtype, ("float32", "float64", "bfloat16"))
        _check_choice(s, "impl", self.impl, IMPLS)
        try:
            parse_size(self.max_shard_size)
        except ValueError as error:
            raise ConfigError(f"{s}.max_shard_size = {self.max_shard_size!r} is invalid: {error}") from None


@dataclass
class RayConfig(_Config):
    """How `mcdist train --ray` asks a Ray cluster for workers."""

    SECTION = "ray"

    address: str = ""  # "" = start or join a local Ray; "auto" = the running cluster; or host:port / ray://...
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    storage_path: str = ""  # "" = <train.out_dir>/ray
    max_failures: int = 2

    def __post_init__(self) -> None:
        s = self.SECTION
        _check_positive_int(s, "workers", self.workers)
        _check_positive_int(s, "cpus_per_worker", self.cpus_per_worker)
        if not isinstance(self.max_failures, int) or isinstance(self.max_failures, bool) or self.max_failures < -1:
            raise ConfigError(f"{s}.max_failures = {self.max_failures!r} is invalid; expected an integer >= -1 "
                              "(-1 = retry forever)")
        if not isinstance(self.use_gpu, bool):
            raise ConfigError(f"{s}.use_gpu = {self.use_gpu!r} is invalid; expected true or false")


@dataclass
class RunConfig(_Config):
    """A whole run: the sections together, as one JSON/TOML file."""

    SECTION = "run"

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "train": TrainConfig, "ray": RayConfig}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"run config: expected a mapping of sections, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.SECTIONS))
        if unknown:
            raise ConfigError(f"run config: unknown section(s) {unknown}; known sections are {sorted(cls.SECTIONS)}")
        sections = {name: data.get(name, {}) for name in cls.SECTIONS}
        model, train = sections["model"], sections["train"]
        if isinstance(model, Mapping) and "impl" in model and isinstance(train, Mapping) and "impl" not in train:
            sections["train"] = {**train, "impl": model["impl"]}  # a config written when impl was model.impl
        return cls(**{name: cls.SECTIONS[name].from_dict(sections[name]) for name in cls.SECTIONS})

    def to_dict(self) -> dict:
        return {name: getattr(self, name).to_dict() for name in self.SECTIONS}

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RunConfig":
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as handle:
                try:
                    return cls.from_dict(tomllib.load(handle))
                except tomllib.TOMLDecodeError as error:
                    raise ConfigError(f"{path}: not valid TOML ({error})") from error
        with open(path, encoding="utf-8") as handle:
            return cls.from_json(handle.read())

    def to_toml(self) -> str:
        """The config as TOML (one table per section), readable by :meth:`load` from a ``.toml`` file."""
        lines = []
        for name in self.SECTIONS:
            lines.append(f"[{name}]")
            for key, value in getattr(self, name).to_dict().items():
                if isinstance(value, bool):
                    text = "true" if value else "false"
                elif isinstance(value, (int, float)):
                    text = repr(value)
                elif isinstance(value, (list, tuple)):
                    text = json.dumps(list(value))  # numbers only: a JSON array is a TOML array
                else:
                    text = json.dumps(str(value))  # a JSON string is a valid TOML basic string
                lines.append(f"{key} = {text}")
            lines.append("")
        return "\n".join(lines)

    def with_overrides(self, overrides: list[str]) -> "RunConfig":
        """Apply ``section.key=value`` strings (values parsed as JSON, else taken as strings)."""
        data = self.to_dict()
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is invalid; expected section.key=value")
            key, raw = item.split("=", 1)
            parts = key.strip().split(".")
            if len(parts) != 2:
                raise ConfigError(f"override key {key!r} is invalid; expected section.key (e.g. model.segment_len)")
            section, name = parts
            if section not in data:
                raise ConfigError(f"override {item!r}: unknown section {section!r}; known: {sorted(data)}")
            if name not in data[section]:
                raise ConfigError(f"override {item!r}: unknown key {name!r} in {section}; known: "
                                  f"{sorted(data[section])}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            if isinstance(data[section][name], str) and not isinstance(value, str):
                value = raw  # a string field keeps the text as typed (train.out_dir=123 is the folder "123")
            if isinstance(data[section][name], float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            data[section][name] = value
        return RunConfig.from_dict(data)
