"""The emo_jax transformer as a `flax.nnx` module, for NNX code bases.

`EmoLM` is an `nnx.Module` whose parameters are `nnx.Param`s: the same tree as the
Linen model's `params` collection (`embedding`, `layer_<l>/attention/...`,
`layer_<l>/moe/w_gate`, ...), each carrying its logical axis names as `logical_axes`
metadata. Its computation is the Linen definition (`emo_jax.model`) applied to those
parameters, so the two are one model: nnx.jit, nnx.grad, nnx.Optimizer, nnx.split /
nnx.merge and nnx.state work on it, `EmoLM.load` fills it from any model artifact
(run directory, emo_jax model folder, Hugging Face folder), and `linen_params()` gives
the plain tree back for `artifact.save` or `interop.export_hf`.

Why not `nnx.bridge.ToNNX`: the bridge draws the `routing` key (the random document
pool sizes) from an `nnx.Rngs` stream it folds on every call, so a step could not be
replayed with a given key; here the key is an argument, as in the Linen train step.
Expert parallelism (the shard_map MoE layer) stays on the Linen training path: EmoLM
runs the single-device MoE layer under jit (sharded parameters are fine, GSPMD
partitions the rest).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from emo_jax import artifact
from emo_jax.compat import nnx_data, nnx_value
from emo_jax.config import Config
from emo_jax.model import build_model
from emo_jax.train.objective import LossParts, objective

Array = jax.Array


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


class EmoLM(nnx.Module):
    """An emo_jax decoder (EMO or standard MoE, full or pruned) as an NNX module.

    EmoLM(config, rngs=nnx.Rngs(params=0)) initialises it with the Linen initialisers and
    the key drawn from `rngs.params()`; EmoLM(config, params=tree) wraps existing
    parameters (unboxed arrays, e.g. `emo_jax.train.init_params(...)` for the exact Linen init).
    """

    def __init__(self, config: Config, *, rngs: nnx.Rngs | None = None, params: dict | None = None):
        if params is None:
            if rngs is None:
                raise ValueError("EmoLM needs rngs=nnx.Rngs(params=SEED) to initialise, or params=TREE.")
            key = rngs.params()
            tokens = jnp.zeros((1, min(8, config.model.max_seq_len)), jnp.int32)
            boxed = build_model(config).init({"params": key, "routing": key}, tokens, train=False)["params"]
            params = nn.meta.unbox(boxed)
        else:
            boxed = artifact.boxed_abstract_params(config)  # only the logical axes are read
        specs = nn.get_partition_spec(boxed)
        self.config = config  # static: a frozen, hashable dataclass
        self.params = nnx_data(jax.tree.map(lambda p, spec: nnx.Param(p, logical_axes=tuple(spec)), params, specs))

    @classmethod
    def load(cls, source, mesh: jax.sharding.Mesh | str | None = None, overrides: Sequence[str] = ()) -> "EmoLM":
        """Any model artifact (see emo_jax.artifact.load), its parameters on `mesh`'s shardings."""
        loaded = artifact.load(source, mesh=mesh, overrides=overrides)
        return cls(loaded.config, params=loaded.params)

    def linen_params(self) -> dict:
        """The parameters as the plain tree the Linen model, artifact.save and export_hf take."""
        return jax.tree.map(nnx_value, self.params, is_leaf=_is_variable)

    def __call__(self, tokens: Array, segment_ids: Array | None = None, positions: Array | None = None, *,
                 train: bool = False, routing_key: Array | nnx.Rngs | None = None):
        """tokens, segment_ids, positions: i32[B, S] -> (logits f32[B, S, V], per-layer RoutingStats).

        train=True draws random document pools (routing.pool: random) from routing_key: a key,
        or an nnx.Rngs with a `routing` stream.
        """
        if isinstance(routing_key, nnx.Rngs):
            routing_key = routing_key.routing()
        rngs = {"routing": routing_key} if routing_key is not None else {}
        return build_model(self.config).apply({"params": self.linen_params()}, tokens, segment_ids, positions,
                                              train=train, rngs=rngs)


def lm_loss(model: EmoLM, batch: dict, routing_key: Array | None = None) -> LossParts:
    """The training objective of `batch` (inputs, targets, loss_mask, segment_ids, positions:
    [B, S]) as the Linen train step computes it for one micro-batch: cross-entropy, load
    balance, router and output z-losses over the batch's loss tokens."""
    logits, stats = model(batch["inputs"], batch["segment_ids"], batch["positions"], train=True,
                          routing_key=routing_key)
    tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    return objective(logits, stats, batch, model.config, step_tokens=tokens)
