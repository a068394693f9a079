"""`emo-jax` command line: params, smoke, train, data, convert, generate, memory."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from emo_jax.config import ConfigError, load_config


def _config_of(path: str, overrides: list[str]):
    """A config YAML, or the config of a model source (run dir, emo_jax model folder, HF folder)."""
    if Path(path).is_file() and not str(path).endswith(".json"):
        return load_config(path, overrides)
    from emo_jax import artifact
    return artifact.read_config(path, overrides)[0]


def _params(args) -> int:
    from emo_jax.param_count import count_params, format_counts
    config = _config_of(args.config, args.overrides)
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


def _train(args) -> int:
    from emo_jax.train.loop import train
    from emo_jax.train.plots import plot_loss_curve
    config = load_config(args.config, args.overrides)
    result = train(config, resume=not args.no_resume)  # its errors: _user_errors() below
    if result.losses and (result.run_dir / "metrics.jsonl").exists():
        png = plot_loss_curve(result.run_dir)
        print(f"loss curve: {png}")
        _report_specialisation(result.run_dir)
    if result.stopped_by_signal:
        print(f"stopped by {result.signal_name} after step {result.final_step}; checkpoint saved")
    return 0


def _report_specialisation(run_dir: Path) -> None:
    """After training: the last validation's specialisation summary, its heatmaps and the
    specialisation-over-training plot, next to the loss curve."""
    import json
    from emo_jax.modular import analyze
    from emo_jax.train.plots import plot_specialisation, read_metrics, specialisation_series
    path = run_dir / "analysis" / "analysis.json"
    if not path.is_file():
        return
    summary = json.loads(path.read_text())
    print(f"routing specialisation on the validation documents at step {summary['step']} "
          "(lower = more specialised):")
    print(analyze.format_summary(summary))
    pictures = analyze.plot(summary, run_dir / "analysis", title=f"{run_dir.name} step {summary['step']}")
    over_time = plot_specialisation({run_dir.name: specialisation_series(read_metrics(run_dir))},
                                    run_dir / "specialisation.png", title=run_dir.name)
    print("wrote " + ", ".join(str(p) for p in [*pictures, over_time] if p is not None))


def _data(args) -> int:
    from emo_jax.data import commands
    if args.data_command == "build":
        return commands.build_main(args.rest)
    return commands.stats_main(args.rest)


def _convert(args) -> int:
    """Any model source -> an emo_jax model folder (--to emo_jax) or a Hugging Face folder (--to emo|olmoe)."""
    from emo_jax import artifact
    from emo_jax.interop import convert
    source = artifact.resolve(args.source)
    target = args.to or ("emo_jax" if source.kind == "hf" else "emo")
    if target == "emo_jax":
        # A Hugging Face folder is read shard by shard onto config.mesh (overridable, e.g. mesh.expert=8).
        loaded = artifact.load(args.source, mesh="config" if source.kind == "hf" else None,
                               overrides=args.overrides, layout=args.layout)
        artifact.save(args.out, loaded.config, loaded.params)
        artifact.copy_tokenizer_files(source.path, args.out)
        print(f"converted {loaded.source.describe()} ({loaded.config.model.n_layers} layers, experts per layer "
              f"{list(loaded.config.model.expert_counts)}) -> {args.out}")
        return 0
    loaded = artifact.load(args.source, overrides=args.overrides, layout=args.layout)
    try:
        files = convert.export_hf(loaded.params, loaded.config, args.out, layout=target, dtype=args.dtype,
                                  max_shard_bytes=int(args.max_shard_gb * (1 << 30)), pad_id=args.pad_id)
    except convert.InteropError as err:  # name the model that cannot be exported
        raise convert.InteropError(f"{args.source}: {err}") from None
    artifact.copy_tokenizer_files(source.path, args.out)
    print(f"exported {loaded.source.describe()} to the {target} layout: {len(files)} safetensors file(s) in {args.out}")
    return 0


def _generate(args) -> int:
    """Continues text prompts (or token-id prompts) with a KV cache."""
    from emo_jax import artifact, generate
    loaded = artifact.load(args.model, mesh="config", overrides=args.overrides, layout=args.layout)
    config, params = loaded.config, loaded.params
    tokenizer = generate.find_tokenizer(args.tokenizer, args.model, config, required=not args.prompt_ids)
    if args.prompt_ids:
        prompts = [[int(t) for t in p.replace(",", " ").split()] for p in args.prompt_ids]
    else:
        prompts = [tokenizer.encode(p).ids for p in args.prompt]
    eos = args.eos_id if args.eos_id is not None else generate.tokenizer_eos(tokenizer)
    sampling = generate.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_p=args.top_p, eos_id=eos, seed=args.seed)
    result = generate.generate(config, params, prompts, sampling)
    for prompt, tokens, n in zip(prompts, result.tokens, result.lengths):
        new = [int(t) for t in tokens[:n]]
        if tokenizer is None:
            print(" ".join(str(t) for t in prompt + new))
        else:
            print(tokenizer.decode(prompt, skip_special_tokens=False) + tokenizer.decode(new, skip_special_tokens=False))
    return 0


def _memory(args) -> int:
    from emo_jax.memory import format_table, memory_rows
    config = _config_of(args.config, args.overrides)
    counts = config.model.expert_counts  # a pruned model: its own (uniform) count as well
    experts = tuple(args.experts or dict.fromkeys((config.model.n_experts, max(counts), min(counts))))
    rows = memory_rows(config.model, experts, args.batch, args.seq_len or config.model.max_seq_len,
                       args.weight_dtype, config.kernels.attention)
    print(format_table(config.name, rows, args.batch, args.seq_len or config.model.max_seq_len, args.weight_dtype))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emo-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="print total and active parameter counts of a config or model")
    p.add_argument("config", help="a config YAML, or a model: run dir[@step], emo_jax model folder, HF folder")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(fn=_params)

    p = sub.add_parser("smoke", help="short train run on synthetic packed documents")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(fn=_smoke)

    p = sub.add_parser("train", help="train a model (resumes from run_dir's latest checkpoint)")
    p.add_argument("--config", required=True, help="a YAML file in configs/")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(fn=_train)

    p = sub.add_parser("data", help="build or describe the bundled corpus")
    p.add_argument("data_command", choices=["build", "stats"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_data)

    p = sub.add_parser("convert", help="import a Hugging Face checkpoint (OLMoE/EMO) or export to one")
    p.add_argument("source", help="a model: run dir[@step], emo_jax model folder or Hugging Face folder")
    p.add_argument("out", help="output directory")
    p.add_argument("--to", choices=["emo_jax", "emo", "olmoe"],
                   help="emo_jax: a model folder (default for an HF source), or the HF layout to export (default emo)")
    p.add_argument("--layout", choices=["auto", "olmoe", "emo"], default="auto", help="layout of an HF source")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="export dtype (default: as stored)")
    p.add_argument("--max-shard-gb", type=float, default=4.0, help="split exported safetensors above this size")
    p.add_argument("--pad-id", type=int, help="pad_token_id to write on export (default: routing.eos_id, else 0)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. mesh.expert=8")
    p.set_defaults(fn=_convert)

    p = sub.add_parser("generate", help="generate text with a KV cache (full or pruned model)")
    p.add_argument("model", help="a model: run dir[@step], emo_jax model folder or Hugging Face folder")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], help="a prompt as token ids '1 2 3' (no tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: MODEL/tokenizer.json or data.tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--eos-id", type=int, help="stop token (default: the tokenizer's <|endoftext|>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["auto", "olmoe", "emo"], default="auto", help="layout of an HF model")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(fn=_generate)

    p = sub.add_parser("memory", help="parameter bytes and peak inference memory, full and pruned")
    p.add_argument("config", help="a config YAML, or a model: run dir[@step], emo_jax model folder, HF folder")
    p.add_argument("--experts", type=int, nargs="+", help="experts per layer to tabulate, e.g. 128 32 16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, help="tokens per row (default: model.max_seq_len)")
    p.add_argument("--weight-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(fn=_memory)

    from emo_jax.modular import commands as modular_commands
    modular_commands.register(sub)  # select, prune, eval, analyze, reproduce
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but `key=value` overrides may also follow options
    (`train --config X a=1 --no-resume b=2`): argparse stops filling a positional list at
    the first option and would reject `b=2` as unrecognized."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in a or a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]  # order kept: later overrides still win
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"emo-jax: config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # `train` saves on the first Ctrl-C; this is a second one, or another command
        print(f"emo-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        print(f"emo-jax {args.command}: {one_line(err)}", file=sys.stderr)
        return 1


def one_line(err: BaseException) -> str:
    """The message of a user-facing error on one line (OSError: '[Errno 28] No space ...: path')."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _user_errors() -> tuple[type, ...]:
    """Errors whose message already names the problem and the fix: printed as one line.

    OSError (a missing file, a read-only or full disk) is the environment's, not a bug:
    its message names the path and the cause, so it is printed the same way."""
    from emo_jax.generate import GenerationError
    from emo_jax.inputs import InputError
    from emo_jax.interop.hf_common import InteropError
    from emo_jax.interop.safetensors_io import SafetensorsError
    from emo_jax.parallel.distributed import DistributedError
    from emo_jax.train.checkpoint import CheckpointError
    from emo_jax.train.loop import NonFiniteLossError
    return (GenerationError, InputError, InteropError, SafetensorsError, CheckpointError, NonFiniteLossError,
            DistributedError, OSError)


if __name__ == "__main__":
    sys.exit(main())
