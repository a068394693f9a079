"""Hugging Face checkpoints (OLMoE or EMO layout): the pieces of an import, and the export.

Loading goes through `emo_jax.artifact.load` (the one loader), which uses this module:
config.json becomes a validated emo_jax `Config` (`config_from_hf`), then every
parameter from the safetensors files. With a mesh, each parameter is created by
`jax.make_array_from_callback` on the NamedSharding of `parallel.rules.param_shardings`,
and the callback reads (through a memory map) only the rectangle of the HF tensor(s)
that one device shard holds: no host ever holds the whole model. Export streams one
tensor at a time into size-bounded safetensors shards. Expert counts are read from
the parameter shapes, so a pruned model (fewer experts in some layers) exports to the
EMO layout with `num_experts_per_layer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
import flax.linen as nn

from emo_jax.config import Config, ConfigError, _merge, config_from_dict, parse_overrides
from emo_jax.interop import hf_emo, hf_olmoe
from emo_jax.interop.hf_common import CONFIG_FILE, InteropError
from emo_jax.interop.safetensors_io import SafetensorsReader, write_checkpoint
from emo_jax.interop.tensor_map import Source, hf_names, merge_rows, read_region, to_hf

LAYOUTS: dict[str, ModuleType] = {hf_olmoe.NAME: hf_olmoe, hf_emo.NAME: hf_emo}
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


# --------------------------------------------------------------------------- configs


def detect_layout(hf: dict, layout: str | None = None) -> ModuleType:
    """The layout module for a config.json: forced by `layout`, else from model_type/architectures."""
    if layout is not None and layout != "auto":
        if layout not in LAYOUTS:
            raise InteropError(f"unknown layout {layout!r}; use one of {sorted(LAYOUTS)}.")
        return LAYOUTS[layout]
    for module in LAYOUTS.values():
        if module.matches(hf):
            return module
    raise InteropError(f"unknown checkpoint layout (model_type={hf.get('model_type')!r}, architectures="
                       f"{hf.get('architectures')}); emo_jax reads 'olmoe' (OlmoeForCausalLM) and 'emo' "
                       "(EmoForCausalLM): pass --layout olmoe or --layout emo if the names match one of them.")


def params_expert_counts(params: dict, n_layers: int) -> tuple[int, ...]:
    """Experts per layer read from the parameter shapes (w_gate is [E_l, D, H])."""
    try:
        return tuple(int(params[f"layer_{i}"]["moe"]["w_gate"].shape[0]) for i in range(n_layers))
    except (KeyError, TypeError):
        raise InteropError(f"the parameters lack layer_<l>/moe/w_gate for some of the {n_layers} layers; pass "
                           "the parameter tree of an emo_jax model with its own config.") from None


def _eos_id(hf: dict, vocab_size: int) -> int | None:
    """The first eos_token_id; None when config.json has none (null or [] survive a round trip)."""
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        return None
    return int(eos) if isinstance(eos, int) and 0 <= eos < vocab_size else 0


def config_from_hf(hf: dict, layout: ModuleType, overrides: Sequence[str] = (), name: str = "converted") -> Config:
    """A validated Config for a converted checkpoint; `overrides` are dotted key=value pairs.

    Routing defaults to HF-style inference (`eval_pool: none`). EMO checkpoints keep the
    released random pool for further training (pool_min k_r + 1, pool_max E); OLMoE
    ones train as a standard MoE (`pool: none`).
    """
    model = layout.model_fields(hf)
    if "layer_experts" in model:
        model["layer_experts"] = list(model["layer_experts"])
    k_r = model["top_k"] - model["n_shared_experts"]
    n_r = model["n_experts"] - model["n_shared_experts"]
    if layout is hf_emo:
        routing = dict(pool="random", pool_min=min(k_r + 1, n_r), pool_max=model["n_experts"], eval_pool="none")
    else:
        routing = dict(pool="none", eval_pool="none")
    if "eos_token_id" not in hf and getattr(layout, "DEFAULT_EOS_ID", None) is not None:
        hf = dict(hf, eos_token_id=layout.DEFAULT_EOS_ID)  # the official config's default
    routing["eos_id"] = _eos_id(hf, model["vocab_size"])
    values = {"name": name, "model": model, "routing": routing,
              "data": {"seq_len": min(128, model["max_seq_len"])}}
    values = _merge(values, parse_overrides(list(overrides)))
    try:
        return config_from_dict(values)
    except ConfigError as err:
        raise InteropError(f"the converted config is invalid: {err}") from None


# ------------------------------------------------------------------------------ import


def _flat(tree: dict) -> dict[tuple[str, ...], object]:
    return traverse_util.flatten_dict(tree)


def check_tensors(reader: SafetensorsReader, sources: dict[tuple[str, ...], Source], layout: str) -> None:
    """Every HF tensor the layout needs exists with the expected shape, and none is left unused."""
    needed = set()
    for src in sources.values():
        for part in hf_names(src):
            needed.add(part.name)
            if part.name not in reader:
                others = sorted(set(LAYOUTS) - {layout})
                raise InteropError(f"tensor '{part.name}' of the {layout} layout is missing from "
                                   f"{reader.directory}; the checkpoint is incomplete or in another layout "
                                   f"(try --layout {others[0]}).")
            shape = reader.shape(part.name)
            if shape != part.hf_shape:
                raise InteropError(f"tensor '{part.name}' has shape {list(shape)} but config.json implies "
                                   f"{list(part.hf_shape)}; the weights and config.json disagree.")
    unused = sorted(set(reader.keys()) - needed)
    if unused:
        raise InteropError(f"tensor '{unused[0]}' is not part of this layout ({len(unused)} unused tensor(s)); "
                           "the checkpoint is in another layout, or config.json does not describe it "
                           "(e.g. qk_norm), or it has features emo_jax lacks.")


def load_params(reader: SafetensorsReader, sources: dict[tuple[str, ...], Source], abstract: dict,
                mesh: jax.sharding.Mesh | None = None) -> dict:
    """Builds the parameter tree, one device shard at a time when `mesh` is given.

    abstract: boxed ShapeDtypeStructs (the dtype of each parameter is taken from it).
    """
    flat_abstract = {k: nn.meta.unbox(v) for k, v in _flat(abstract).items()}
    if set(flat_abstract) != set(sources):
        missing = sorted(set(flat_abstract) - set(sources))
        extra = sorted(set(sources) - set(flat_abstract))
        raise InteropError(f"layout/model mismatch: model parameters without a source {missing[:3]}, "
                           f"sources without a parameter {extra[:3]}.")
    shardings = None
    if mesh is not None:
        from emo_jax.parallel.rules import param_shardings
        shardings = _flat(param_shardings(abstract, mesh))
    out = {}
    for path, aval in flat_abstract.items():
        src = sources[path]
        if tuple(src.shape) != tuple(aval.shape):
            raise InteropError(f"parameter {'/'.join(path)} is {list(aval.shape)} in the model but "
                               f"{list(src.shape)} from the checkpoint.")
        dtype = aval.dtype
        if shardings is None:
            out[path] = jnp.asarray(read_region(reader, src).astype(dtype))
        else:
            out[path] = jax.make_array_from_callback(
                tuple(aval.shape), shardings[path],
                lambda index, src=src, dtype=dtype: read_region(reader, src, index).astype(dtype))
    return traverse_util.unflatten_dict(out)


# ------------------------------------------------------------------------------ export


def _to_host(x) -> np.ndarray:
    """One parameter on this host (gathered across processes when it spans several)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def export_hf(params: dict, config: Config, directory: str | Path, layout: str = "emo",
              dtype: str | None = None, max_shard_bytes: int = 4 << 30, pad_id: int | None = None) -> list[Path]:
    """Writes config.json + safetensors for `params` in the `layout` ("emo" or "olmoe").

    dtype: "float32" / "bfloat16" / "float16" to cast on export; None keeps each
    parameter's dtype. Expert counts come from the parameter shapes (pruned models
    write `num_experts_per_layer`; only the EMO layout has it). pad_id: the
    `pad_token_id` to write (EMO default: routing.eos_id, else 0; always < vocab_size).
    """
    if layout not in LAYOUTS:
        raise InteropError(f"unknown layout {layout!r}; use one of {sorted(LAYOUTS)}.")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise InteropError(f"unknown export dtype {dtype!r}; use one of {sorted(EXPORT_DTYPES)}.")
    module = LAYOUTS[layout]
    params = nn.meta.unbox(params)
    m = config.model
    if pad_id is not None and not 0 <= pad_id < m.vocab_size:
        raise InteropError(f"pad_id={pad_id} is not a token id of this model (vocab_size={m.vocab_size}); "
                           "pass one in [0, vocab_size).")
    counts = params_expert_counts(params, m.n_layers)
    dtype_name = dtype or str(np.dtype(params["embedding"].dtype))
    hf = module.hf_config(m, counts, dtype_name, config.routing.eos_id, pad_id)  # fails early for unexportable models
    sources = module.sources(m, counts)
    flat = _flat(params)
    if set(flat) != set(sources):
        missing = sorted(set(sources) - set(flat))
        extra = sorted(set(flat) - set(sources))
        raise InteropError(f"parameters do not match model config '{config.name}': missing {missing[:3]}, "
                           f"unexpected {extra[:3]}; export with the config the parameters were made with.")
    for path, src in sources.items():
        if tuple(flat[path].shape) != tuple(src.shape):
            raise InteropError(f"parameter {'/'.join(path)} has shape {list(flat[path].shape)} but the config "
                               f"implies {list(src.shape)}.")
    out_dtype = EXPORT_DTYPES[dtype] if dtype else None

    parts_of: dict[str, int] = {}
    for src in sources.values():
        for part in hf_names(src):
            parts_of[part.name] = parts_of.get(part.name, 0) + 1

    def tensors():
        pending: dict[str, list] = {}  # HF tensors fed by several emo arrays (EMO router rows)
        for path, src in sources.items():
            host = _to_host(flat[path])
            if out_dtype is not None:
                host = host.astype(out_dtype)
            for (name, hf), part in zip(to_hf(src, host), hf_names(src)):
                if parts_of[name] == 1:
                    yield name, hf
                    continue
                pending.setdefault(name, []).append((part, hf))
                if len(pending[name]) == parts_of[name]:
                    yield name, merge_rows(pending.pop(name))

    directory = Path(directory)
    files = write_checkpoint(directory, tensors(), max_shard_bytes)
    (directory / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return files
