"""Typed, validated configuration: frozen dataclasses, YAML files, dotted overrides.

A config file is YAML with the sections below; any field can be overridden on the
command line as `section.field=value` (the value is parsed as YAML). Every error is a
one-line `ConfigError` that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used, with a message naming the key and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    head_dim: int = 16
    max_seq_len: int = 128
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-6
    qk_norm: bool = False
    # "pre": x + f(norm(x)) (EMO, OLMoE in transformers); "post": x + norm(f(x)) (OLMo 2).
    norm_placement: Literal["pre", "post"] = "pre"
    n_experts: int = 8  # E: routed + shared
    n_shared_experts: int = 1  # n_s: always on; gate 1 for one, softmax of their own router for >= 2
    top_k: int = 4  # k: experts per token, shared included (k_r = k - n_s routed)
    expert_hidden: int = 32
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: Literal["float32", "bfloat16"] = "float32"  # activation / matmul dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "block"] = "none"
    # Experts each layer actually holds, shared included (a pruned model;
    # docs/algorithm.md#selective-expert-use-and-pruning):
    # None = n_experts in every layer. Shared experts are always kept, so layer l has
    # layer_experts[l] - n_shared_experts routed experts; each entry lies in
    # [top_k, n_experts] (tokens still take top-k_r among the kept routed experts).
    # n_experts stays the width the model was trained with.
    layer_experts: tuple[int, ...] | None = None

    @property
    def n_routed_experts(self) -> int:
        return self.n_experts - self.n_shared_experts

    @property
    def routed_top_k(self) -> int:
        return self.top_k - self.n_shared_experts

    @property
    def expert_counts(self) -> tuple[int, ...]:
        """Experts (routed + shared) of every layer."""
        return tuple(self.layer_experts) if self.layer_experts is not None else (self.n_experts,) * self.n_layers

    @property
    def routed_counts(self) -> tuple[int, ...]:
        """Routed experts of every layer."""
        return tuple(e - self.n_shared_experts for e in self.expert_counts)

    @property
    def is_pruned(self) -> bool:
        return self.layer_experts is not None and any(e != self.n_experts for e in self.layer_experts)


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    # Pool-size mode during training: "none" = standard MoE (no document pool),
    # "fixed" = pool of `pool_size`, "random" = UniformInt[pool_min, pool_max] drawn per
    # (document, layer). Sizes >= n_routed mean "no restriction" (the released d_max=128).
    pool: Literal["none", "fixed", "random"] = "random"
    pool_size: int = 4
    pool_min: int = 4
    pool_max: int = 8
    # Pool mode for evaluation: "none" is HF-style inference, "fixed" uses eval_pool_size.
    eval_pool: Literal["none", "fixed"] = "none"
    eval_pool_size: int = 4
    # Router segments: "explicit" uses the batch's segment_ids; "eos" starts a new
    # segment at every EOS token as the official EMO code does
    # (docs/algorithm.md#router-documents-in-packed-rows).
    segments: Literal["explicit", "eos"] = "explicit"
    eos_id: int | None = 0  # None: the model has no EOS token (a config.json with eos_token_id null)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    lb_weight: float = 0.1
    router_z_weight: float = 0.001
    output_z_weight: float = 1e-5
    # Which tokens the load-balance frequencies f_i count: "global_batch" (all devices,
    # all micro-batches of the step), "micro_batch" (all devices, current micro-batch:
    # the official EMO run), "local" (one device, one micro-batch: for ablations).
    lb_scope: Literal["global_batch", "micro_batch", "local"] = "global_batch"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # -1 on at most one axis means "whatever is left of the devices".
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    # Causal attention within documents (emo_jax.kernels.attention, docs/attention.md):
    # "reference" = S x S mask + jax.nn.dot_product_attention (quadratic memory),
    # "blocked" = pure-JAX flash-style loop over blocks (linear memory, any backend),
    # "splash" = Pallas splash attention (TPU), "flash_gpu" = Pallas flash attention
    # (GPU). "auto" = blocked on CPU, splash on TPU, flash_gpu on GPU.
    attention: Literal["auto", "reference", "blocked", "splash", "flash_gpu"] = "auto"
    # Query / key rows per tile of blocked, splash, flash_gpu; 0 = the kernel's default
    # (blocked: 64 up to 512 tokens, 128 beyond; splash and flash_gpu: 128).
    attention_block: int = 0
    # MoE expert computation (emo_jax.kernels): "reference" = XLA (ragged_dot),
    # "capacity" = batched matmuls over a per-expert capacity slab, dropless (fastest on
    # CPU), "blocked" = expert-aligned row blocks, "pallas" = Pallas kernels for
    # dispatch, grouped matmul and combine (Mosaic TPU / Triton GPU; TPU interpret mode
    # on CPU, correctness only). "auto" = capacity on CPU, reference elsewhere: pallas is
    # opt-in until measured on an accelerator (docs/kernels.md#pallas-backend). A call
    # with at most as many token copies as experts (a decode step) gathers each copy's expert
    # weights instead, whatever the backend (docs/kernels.md, "A handful of tokens").
    moe_backend: Literal["auto", "reference", "capacity", "blocked", "pallas"] = "auto"
    # Expert-parallel token exchange: "auto" = ragged_all_to_all on GPU/TPU, dense
    # all_to_all with a worst-case buffer elsewhere.
    transport: Literal["auto", "all_to_all", "ragged_all_to_all"] = "auto"
    # Rows per peer of the dense all_to_all buffer, in units of the mean (M / P token
    # copies per peer): a step that would overflow it uses the worst-case [P, M, D]
    # buffer instead, so no token is ever dropped (docs/kernels.md#expert-parallel-exchange).
    exchange_capacity: float = 1.5


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    peak_lr: float = 3e-3
    warmup_steps: int = 10
    final_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # A built TFDS dataset under data_dir (e.g. "emo_corpus", "text_files/mine"), or
    # "synthetic": packed arithmetic-progression documents (tests, benchmarks).
    dataset: str = "synthetic"
    data_dir: str = "data_cache"
    tokenizer: str = ""  # path to tokenizer.json; empty = the bundled corpus's own
    seq_len: int = 128
    global_batch_size: int = 8
    num_workers: int = 0
    seed: int = 0
    # Row-level shuffle after packing: packed rows are read in windows of this many rows
    # and every window is emitted in a seeded random order, so that a batch mixes the
    # corpus's domains (documents are long: without it a batch holds 2-3 domains).
    # 0 = off (rows in packing order). See docs/data.md.
    shuffle_rows: int = 4096


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 50
    micro_batches: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    # Periodic validation (emo_jax/train/eval_sample.py): a fixed sample, the same at
    # every evaluation, balanced over the dataset's domains: eval_batches x
    # global_batch_size packed rows split equally between the domains (held-out loss
    # per domain), and the first eval_routing_docs validation documents of every
    # domain, one per row (specialisation measures; 0 = off).
    eval_batches: int = 4
    eval_routing_docs: int = 8
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    run_dir: str = "runs/default"
    # Start a new run from an existing model's parameters (fine-tuning): a run directory
    # (RUN_DIR or RUN_DIR@STEP), an emo_jax model folder or a Hugging Face folder
    # (docs/model_artifacts.md). The optimizer starts fresh at step 0; its model section
    # must equal this config's. Ignored when run_dir already holds a checkpoint (resume).
    init_from: str = ""
    progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    routing: RoutingConfig = RoutingConfig()
    loss: LossConfig = LossConfig()
    mesh: MeshConfig = MeshConfig()
    kernels: KernelConfig = KernelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    name: str = "unnamed"


# ----------------------------------------------------------------------------- parsing


def _suggest(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(options)}."


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Checks `value` against a field annotation (int, float, bool, str, Literal)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}; pick one of those.")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false.")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer.")
        return value
    if annotation is float:
        if isinstance(value, str):
            value = _float_from_string(value, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number.")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string (quote it).")
        return value
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None
        if len(options) != 1:
            raise ConfigError(f"{key}: union-typed fields other than 'X | None' are not supported.")
        return _coerce(value, options[0], key)
    if origin is tuple:
        item_type = typing.get_args(annotation)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list (e.g. [8, 8]) or null.")
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    raise ConfigError(f"{key}: unsupported field type {annotation!r}.")


def _float_from_string(text: str, key: str) -> float:
    """`3e-4` is a string in YAML 1.1 (it wants `3.0e-4`); float fields accept it anyway.

    Only a string that Python reads as a finite float is accepted ('nan', 'inf' and words
    are not), and only for float-typed fields: a string field keeps its string."""
    try:
        number = float(text.strip())
    except ValueError:
        raise ConfigError(f"{key}={text!r} must be a number (e.g. 0.001 or 1e-3).") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}={text!r} must be a finite number.")
    return number


def _build(cls: type, values: Any, prefix: str) -> Any:
    where = prefix or "the config"
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(values).__name__}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'.{_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section.")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict:
    """['model.d_model=128', ...] -> nested dict, each value parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value.")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': value is not valid YAML ({err.problem}).") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: Mapping) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def config_from_dict(values: Mapping) -> Config:
    """Builds and validates a Config from a nested mapping."""
    config = _build(Config, values, "")
    validate(config)
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config file and applies dotted `key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; see configs/ for the shipped ones.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}.") from None
    values = _merge(values, parse_overrides(overrides))
    values.setdefault("name", path.stem)
    return config_from_dict(values)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(config: Config) -> dict:
    """Nested dict of plain YAML/JSON values (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def replace(config: Config, **sections: Any) -> Config:
    """`replace(cfg, model={'d_model': 32})`: a validated copy with fields changed."""
    return config_from_dict(_merge(to_dict(config), sections))


# -------------------------------------------------------------------------- validation


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# The range of every numeric field: (low, high, low_inclusive, high_inclusive, what it is).
# None = unbounded. Checked before the cross-field constraints, with the key in the message.
_POS, _NONNEG = (0, None, False, False), (0, None, True, False)
_RANGES: dict[str, tuple] = {
    **{f"model.{k}": _POS for k in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "max_seq_len",
                                    "rope_theta", "norm_eps", "n_experts", "top_k", "expert_hidden", "init_std")},
    "model.n_shared_experts": _NONNEG,
    "kernels.exchange_capacity": _POS,
    **{f"routing.{k}": (1, None, True, False) for k in ("pool_size", "pool_min", "pool_max", "eval_pool_size")},
    "routing.eos_id": _NONNEG,
    **{f"loss.{k}": _NONNEG for k in ("lb_weight", "router_z_weight", "output_z_weight")},
    "optimizer.peak_lr": _POS,
    "optimizer.warmup_steps": _NONNEG,
    "optimizer.final_lr_ratio": (0, 1, True, True),
    "optimizer.b1": (0, 1, True, False),
    "optimizer.b2": (0, 1, True, False),
    "optimizer.eps": _POS,
    "optimizer.weight_decay": _NONNEG,
    "optimizer.grad_clip": _POS,
    "kernels.attention_block": _NONNEG,
    "data.seq_len": _POS,
    "data.global_batch_size": _POS,
    "data.num_workers": _NONNEG,
    "data.shuffle_rows": _NONNEG,  # 0 = no row shuffle
    "data.seed": _NONNEG,
    "train.steps": (1, None, True, False),
    "train.micro_batches": (1, None, True, False),
    "train.seed": _NONNEG,
    "train.log_every": (1, None, True, False),
    "train.eval_every": _NONNEG,  # 0 = no evaluation
    "train.eval_batches": (1, None, True, False),
    "train.eval_routing_docs": _NONNEG,  # 0 = no specialisation measures during training
    "train.checkpoint_every": _NONNEG,  # 0 = no checkpoints
    "train.keep_checkpoints": (1, None, True, False),
}


def _range_text(low, high, low_inclusive, high_inclusive) -> str:
    if high is None:
        return f"{'>=' if low_inclusive else '>'} {low}"
    return f"in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"


def check_ranges(config: Config) -> None:
    """Every numeric field inside its range, and every float finite (ConfigError naming the key)."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, float):
                _require(math.isfinite(value), f"{section.name}.{f.name}={value} must be a finite number.")
    for key, (low, high, low_inclusive, high_inclusive) in _RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name, None)
        if value is None:
            continue
        ok = (value >= low if low_inclusive else value > low) if low is not None else True
        if high is not None:
            ok = ok and (value <= high if high_inclusive else value < high)
        _require(ok, f"{key}={value} must be {_range_text(low, high, low_inclusive, high_inclusive)}.")


def validate(config: Config) -> None:
    """Checks ranges and cross-field constraints; raises ConfigError naming the key and the fix."""
    check_ranges(config)
    m, r = config.model, config.routing
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "max_seq_len",
                "n_experts", "top_k", "expert_hidden"):
        _require(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be positive.")
    _require(m.n_heads * m.head_dim > 0 and m.head_dim % 2 == 0,
             f"model.head_dim={m.head_dim} must be even (RoPE rotates pairs).")
    _require(0 <= m.n_shared_experts < m.n_experts,
             f"model.n_shared_experts={m.n_shared_experts} must be in [0, n_experts={m.n_experts}).")
    _require(m.n_shared_experts < m.top_k,
             f"model.top_k={m.top_k} must exceed n_shared_experts={m.n_shared_experts} "
             "(at least one routed expert per token).")
    _require(m.routed_top_k <= m.n_routed_experts,
             f"model.top_k={m.top_k} is larger than the experts available "
             f"({m.n_routed_experts} routed + {m.n_shared_experts} shared); lower top_k.")
    if m.layer_experts is not None:
        _require(len(m.layer_experts) == m.n_layers,
                 f"model.layer_experts has {len(m.layer_experts)} entries but model.n_layers={m.n_layers}; "
                 "give one expert count per layer (or null for n_experts everywhere).")
        for layer, count in enumerate(m.layer_experts):
            _require(m.top_k <= count <= m.n_experts,
                     f"model.layer_experts[{layer}]={count} must be in [top_k={m.top_k}, n_experts={m.n_experts}] "
                     f"(K counts the {m.n_shared_experts} shared expert(s); tokens still take top_k experts).")
    k_r, n_r = m.routed_top_k, m.n_routed_experts
    if r.pool == "fixed":
        _require(k_r <= r.pool_size <= m.n_experts,
                 f"routing.pool_size={r.pool_size} must be in [k_r={k_r}, n_experts={m.n_experts}] "
                 f"(top_k={m.top_k} routed from inside the pool).")
    if r.pool == "random":
        _require(k_r <= r.pool_min <= r.pool_max <= m.n_experts,
                 f"routing pool range [pool_min={r.pool_min}, pool_max={r.pool_max}] must lie in "
                 f"[k_r={k_r}, n_experts={m.n_experts}] with pool_min <= pool_max "
                 f"(values >= n_routed={n_r} mean no restriction).")
    if r.eval_pool == "fixed":
        _require(k_r <= r.eval_pool_size <= m.n_experts,
                 f"routing.eval_pool_size={r.eval_pool_size} must be in [k_r={k_r}, n_experts={m.n_experts}].")
    if r.segments == "eos":
        _require(r.eos_id is not None and 0 <= r.eos_id < m.vocab_size,
                 f"routing.eos_id={r.eos_id} must be a token id in [0, vocab_size={m.vocab_size}).")
    _require(config.data.seq_len <= m.max_seq_len,
             f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}.")
    _require(config.data.seq_len > 0 and config.data.global_batch_size > 0,
             "data.seq_len and data.global_batch_size must be positive.")
    for key in ("data", "fsdp", "expert", "tensor"):
        size = getattr(config.mesh, key)
        _require(size == -1 or size >= 1, f"mesh.{key}={size} must be -1 (fill) or >= 1.")
    _require(sum(getattr(config.mesh, k) == -1 for k in ("data", "fsdp", "expert", "tensor")) <= 1,
             "at most one mesh axis may be -1 (fill with the remaining devices).")
    if config.mesh.expert > 1:
        _require(m.n_experts % config.mesh.expert == 0,
                 f"model.n_experts={m.n_experts} is not divisible by mesh.expert={config.mesh.expert}; "
                 "choose an expert axis size that divides the expert count.")
        uneven = [(i, e) for i, e in enumerate(m.expert_counts) if e % config.mesh.expert]
        _require(not uneven,
                 f"model.layer_experts[{uneven[0][0] if uneven else 0}]={uneven[0][1] if uneven else 0} is not "
                 f"divisible by mesh.expert={config.mesh.expert}; run this pruned model with mesh.expert=1 "
                 "(or prune to expert counts divisible by the expert axis).")
    _require(config.train.micro_batches >= 1, "train.micro_batches must be >= 1.")
    _require(config.data.global_batch_size % config.train.micro_batches == 0,
             f"data.global_batch_size={config.data.global_batch_size} is not divisible by "
             f"train.micro_batches={config.train.micro_batches}.")
    for key in ("lb_weight", "router_z_weight", "output_z_weight"):
        _require(getattr(config.loss, key) >= 0, f"loss.{key} must be >= 0.")
    o = config.optimizer
    _require(o.peak_lr > 0 and o.warmup_steps >= 0 and 0 <= o.final_lr_ratio <= 1,
             "optimizer: peak_lr > 0, warmup_steps >= 0 and final_lr_ratio in [0, 1] are required.")
