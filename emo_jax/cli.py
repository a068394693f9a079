"""`emo-jax` command line: params, smoke, data (more subcommands arrive with their issues)."""

from __future__ import annotations

import argparse
import sys
import time

from emo_jax.config import ConfigError, load_config


def _params(args) -> int:
    from emo_jax.param_count import count_params, format_counts
    config = load_config(args.config, args.overrides)
    print(format_counts(config.name, count_params(config)))
    return 0


def _smoke(args) -> int:
    """A short forward/backward run on synthetic packed documents, printing the loss."""
    import jax
    import numpy as np
    from emo_jax.model import build_model
    from emo_jax.synthetic import packed_batch
    from emo_jax.train import init_train_state, learning_rate_schedule, make_optimizer, make_train_step

    config = load_config(args.config, args.overrides)
    steps = config.train.steps
    model = build_model(config)
    optimizer = make_optimizer(config.optimizer, steps)
    state = init_train_state(model, optimizer, config, jax.random.PRNGKey(config.train.seed))
    train_step = jax.jit(make_train_step(model, optimizer, config, learning_rate_schedule(config.optimizer, steps)),
                         donate_argnums=(0,))
    rng = np.random.default_rng(config.data.seed)
    key = jax.random.PRNGKey(config.train.seed + 1)
    print(f"{config.name}: {steps} steps, batch {config.data.global_batch_size} x {config.data.seq_len}, "
          f"{config.train.micro_batches} micro-batch(es), pool={config.routing.pool}, "
          f"devices={jax.device_count()} x {jax.devices()[0].platform}")
    start = time.perf_counter()
    for step in range(steps):
        batch = packed_batch(rng, config.data.global_batch_size, config.data.seq_len, config.model.vocab_size)
        state, metrics = train_step(state, batch, jax.random.fold_in(key, step))
        if step % config.train.log_every == 0 or step == steps - 1:
            m = jax.device_get(metrics)
            print(f"step {step:4d}  loss {m['loss']:.4f}  ce {m['cross_entropy']:.4f}  "
                  f"lb {m['load_balance']:.4f}  router_z {m['router_z']:.3f}  "
                  f"pool {m['mean_pool_size']:.2f}  grad_norm {m['grad_norm']:.3f}  "
                  f"({time.perf_counter() - start:.1f}s)", flush=True)
    return 0


def _data(args) -> int:
    from emo_jax.data import commands
    if args.data_command == "build":
        return commands.build_main(args.rest)
    return commands.stats_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emo-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="print total and active parameter counts of a config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(fn=_params)

    p = sub.add_parser("smoke", help="short train run on synthetic packed documents")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(fn=_smoke)

    p = sub.add_parser("data", help="build or describe the bundled corpus")
    p.add_argument("data_command", choices=["build", "stats"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"emo-jax: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
