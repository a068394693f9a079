"""Sections `step_<variant>`: the training step of a model with EMO's layer shape.

The model: `shapes.layers` decoder layers of EMO's shape (d_model 2048, 16 heads of 128,
128 experts (1 shared) of hidden 1024, top-8, EMO's random document pools), vocabulary
`shapes.vocab`, bf16 compute with float32 parameters and AdamW (configs/emo_1b14b.yaml's
dtypes), no rematerialisation, one micro-batch of B x S = 2 x 4096 synthetic packed
documents. The whole step (forward, backward, optimizer update) is one jit with the
state donated; the first call (compile + run) is reported apart from the median of the
timed steps. MFU = emo_jax.train.metrics.flops_per_token x tokens / step time / peak.

Variants: attention is always the flash kernel; the MoE backend is the variant's name.
The loss must come out finite (a check).
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import numpy as np

from emo_jax.accelcheck.context import Context, flash_attention, moe_backend
from emo_jax.accelcheck.correctness import check
from emo_jax.accelcheck.report import SectionLog
from emo_jax.accelcheck.shapes import Shapes
from emo_jax.accelcheck.timing import bench_record, time_call
from emo_jax.config import Config, config_from_dict, parse_overrides
from emo_jax.model.transformer import EmoTransformer
from emo_jax.moe import make_moe_layer
from emo_jax.synthetic import packed_batch
from emo_jax.train import init_train_state, learning_rate_schedule, make_optimizer, make_train_step
from emo_jax.train.metrics import active_matmul_params, flops_per_token

VARIANTS = ("pallas", "capacity", "reference")  # MoE backends, in the order they run


def step_config(s: Shapes) -> Config:
    """The Config dataclass defaults overridden with the check's shape (see the module docstring)."""
    k_r = s.top_k - 1
    overrides = [
        f"model.vocab_size={s.vocab}", f"model.d_model={s.d_model}", f"model.n_layers={s.layers}",
        f"model.n_heads={s.heads}", f"model.head_dim={s.head_dim}", f"model.max_seq_len={s.seq}",
        f"model.n_experts={s.experts}", "model.n_shared_experts=1", f"model.top_k={s.top_k}",
        f"model.expert_hidden={s.hidden}", "model.dtype=bfloat16", "model.param_dtype=float32", "model.remat=none",
        "routing.pool=random", f"routing.pool_min={k_r + 1}", f"routing.pool_max={s.experts - 1}",
        f"data.seq_len={s.seq}", f"data.global_batch_size={s.batch}", "train.steps=100",
        "optimizer.warmup_steps=10",
    ]
    return config_from_dict(parse_overrides(overrides))


class StepProgram(NamedTuple):
    config: Config
    init: Callable  # jitted: key -> TrainState
    step: Callable  # jitted, state donated: (state, batch, key) -> (state, metrics)
    flops: float  # model FLOPs of one step


def build(ctx: Context, variant: str) -> StepProgram:
    """The jitted init and train step of `variant` (nothing compiled yet)."""
    config = step_config(ctx.shapes)
    model = EmoTransformer(config.model, config.routing, make_moe_layer(moe_backend(ctx, variant)),
                           flash_attention(ctx))
    optimizer = make_optimizer(config.optimizer, config.train.steps)
    schedule = learning_rate_schedule(config.optimizer, config.train.steps)
    # The parameters do not depend on the kernels: initialise through the plain layers (the
    # init forward is dead code under jit, but this way no kernel is compiled twice).
    init_model = EmoTransformer(config.model, config.routing)
    init = jax.jit(lambda key: init_train_state(init_model, optimizer, config, key))
    step = jax.jit(make_train_step(model, optimizer, config, schedule), donate_argnums=(0,))
    tokens = ctx.shapes.batch * ctx.shapes.seq
    return StepProgram(config, init, step, flops_per_token(config, active_matmul_params(config)) * tokens)


def synthetic_batches(s: Shapes, n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [packed_batch(rng, s.batch, s.seq, s.vocab, s.min_doc, s.max_doc) for _ in range(n)]


def run(ctx: Context, log: SectionLog, variant: str) -> None:
    s = ctx.shapes
    if variant in ctx.slow:
        log.info(f"train step [{variant}]", f"skipped: slow ({ctx.slow[variant]})")
        return
    program = build(ctx, variant)
    tokens, flops, step = s.batch * s.seq, program.flops, program.step
    log.info("model", f"{s.layers} layers, d_model {s.d_model}, {s.heads} heads of {s.head_dim}, {s.experts} experts "
                      f"(1 shared) of {s.hidden}, top-{s.top_k}, vocab {s.vocab}, bf16 compute / f32 params, "
                      f"batch {s.batch} x {s.seq}, MoE backend {variant}, flash attention")
    log.info("model FLOPs per step", flops)
    start = time.perf_counter()
    state = jax.block_until_ready(program.init(jax.random.PRNGKey(0)))
    log.info("init seconds (compile + run)", round(time.perf_counter() - start, 2))
    batches = [jax.device_put(b) for b in synthetic_batches(s, 2)]

    metrics_of_calls: list[dict] = []

    def advance():  # call n: batch n % 2, key n + 1; the donated state moves on with every call
        nonlocal state
        n = len(metrics_of_calls)
        state, metrics = step(state, batches[n % 2], jax.random.PRNGKey(1 + n))
        metrics_of_calls.append(metrics)
        return metrics["loss"]

    timed = time_call(advance, (), s.repeats, guard=False)
    loss, last = (float(metrics_of_calls[i]["loss"]) for i in (0, -1))
    finite = bool(np.isfinite(loss) and np.isfinite(last))
    check(log, f"train step [{variant}]: loss finite", 0.0 if finite else float("inf"), 0.0,
          f"first loss {loss:.4f}, last {last:.4f}")
    sec = timed["seconds"]
    metrics = metrics_of_calls[-1]
    log.add(bench_record(ctx, "train step", variant, timed, flops=flops,
                         note=f"{tokens / sec:,.0f} tokens/s, grad norm {float(metrics['grad_norm']):.3g}",
                         tokens_per_s=tokens / sec))
