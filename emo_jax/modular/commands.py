"""`emo-jax select | prune | eval | analyze | reproduce`: argparse wiring around the
pure functions of this package. Every user error is one line on stderr, exit code 1."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Callable

from emo_jax.modular import ModularError


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--checkpoint", dest="model", required=True, metavar="SOURCE",
                   help="a training run dir (RUN_DIR or RUN_DIR@STEP), an emo_jax model folder (emo-jax prune, "
                        "emo-jax convert) or a Hugging Face folder (OLMoE/EMO, full or pruned)")
    p.add_argument("--step", type=int, default=None, help="a run's checkpoint step (default: the latest)")


def _pool_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", default=None, metavar="none|N",
                   help="document pool at inference: 'none' (HF-style) or a fixed pool of N experts "
                        "(default: the checkpoint's routing.eval_pool)")


def _calibration_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--keep", "-K", required=required, metavar="K",
                   help="experts kept per layer, shared included: one K or K0,K1,... per layer")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--domain", help="calibrate on the first --docs training documents of this domain "
                                        "of the checkpoint's dataset")
    group.add_argument("--calibration", nargs="+", metavar="FILE",
                       help="calibration text: .txt (one document) or .jsonl ('text' per line) files")
    p.add_argument("--docs", type=int, default=4, help="documents of --domain to calibrate on (default 4)")
    p.add_argument("--max-batches", type=int, default=2, help="calibration batches at most (default 2)")
    p.add_argument("--method", default="probability", choices=("probability", "frequency", "random"),
                   help="score: mean router probability (the paper's), top-k frequency, or a random subset")
    p.add_argument("--seed", type=int, default=0, help="seed of --method random")
    _pool_arg(p)


def _overrides(pool: str | None, overrides: list[str]) -> list[str]:
    """--pool as routing overrides, followed by the dotted overrides (data/routing)."""
    if pool is None:
        return list(overrides)
    if pool == "none":
        return ["routing.eval_pool=none", *overrides]
    if pool.isdigit():
        return ["routing.eval_pool=fixed", f"routing.eval_pool_size={int(pool)}", *overrides]
    raise ModularError(f"--pool {pool!r} must be 'none' or a number of experts.")


def _calibration_batches(config, args) -> tuple[list, str]:
    from emo_jax.modular import documents
    if args.calibration:
        texts = documents.read_documents(args.calibration)
        source = ", ".join(args.calibration)
    elif args.domain:
        texts = documents.domain_documents(config.data.data_dir, config.data.dataset, args.domain, "train", args.docs)
        source = f"{args.docs} training documents of {args.domain}"
    else:
        raise ModularError("give calibration text: --domain NAME (bundled/built dataset) or --calibration FILE.")
    return documents.text_batches(texts, config, args.max_batches), source


def _selection(config, params, args):
    from emo_jax.modular.prune import parse_counts
    from emo_jax.modular.select import greedy_selection, random_selection
    counts = parse_counts(args.keep, config.model.n_layers)
    if args.method == "random":
        return random_selection(config, counts, args.seed)
    batches, source = _calibration_batches(config, args)
    return greedy_selection(config, params, batches, counts, args.method, source)


def _print_selection(selection) -> None:
    for layer, keep in enumerate(selection.keep):
        print(f"layer {layer}: K={selection.counts[layer]} routed experts kept {list(keep)} (+ shared)")


def _load(args):
    """The model of --model/--step (any source kind, parameters only) with --pool and overrides applied."""
    from emo_jax import artifact
    overrides = _overrides(getattr(args, "pool", None), getattr(args, "overrides", []))
    if any(o.split("=", 1)[0].startswith("model.") for o in overrides):
        raise ModularError("model.* cannot be overridden on a trained model (its parameters fix the shapes).")
    loaded = artifact.load(args.model, step=args.step, overrides=overrides)
    return loaded.config, loaded.params, loaded.source


def select_main(args) -> int:
    config, params, _ = _load(args)
    selection = _selection(config, params, args)
    _print_selection(selection)
    if args.out:
        Path(args.out).write_text(selection.to_json())
        print(f"selection: {args.out}")
    return 0


def prune_main(args) -> int:
    from emo_jax import artifact
    from emo_jax.modular.prune import check_counts, param_bytes, prune
    from emo_jax.modular.select import Selection
    from emo_jax.config import parse_overrides
    config, params, source = _load(argparse.Namespace(model=args.model, step=args.step, pool=args.pool))
    if args.selection:
        path = Path(args.selection)
        if not path.is_file():
            raise ModularError(f"selection file {path} does not exist; write one with `emo-jax select --out`.")
        selection = Selection.from_json(path.read_text())
    elif args.keep:
        selection = _selection(config, params, args)
    else:
        raise ModularError("give --selection FILE (from `emo-jax select`) or --keep K with calibration text.")
    tree = parse_overrides(args.overrides)
    if "model" in tree:
        raise ModularError("model.* cannot be overridden when pruning; the selection fixes the shapes.")
    out = Path(args.out).absolute()
    # `emo-jax train --config OUT/config.yaml` fine-tunes the pruned model into OUT/finetune.
    train = {"run_dir": str(out / "finetune"), "init_from": str(out), **tree.pop("train", {})}
    if not train.get("checkpoint_every", config.train.checkpoint_every):
        train["checkpoint_every"] = train.get("steps", config.train.steps)  # fine-tuning must save its end
    check_counts(config.model, selection.counts)
    new_config, new_params = prune(config, params, selection.keep, train=train, name=f"{config.name}_pruned",
                                   **tree)
    before, after = param_bytes(params), param_bytes(new_params)
    artifact.save(out, new_config, new_params)
    (out / "selection.json").write_text(selection.to_json())
    _print_selection(selection)
    print(f"parameter bytes: {before['total']:,} -> {after['total']:,} "
          f"({100 * after['total'] / before['total']:.1f}%); experts {before['experts']:,} -> {after['experts']:,}")
    print(f"pruned model: {out} (model.layer_experts={list(new_config.model.expert_counts)}), from "
          f"{source.describe()}; fine-tune it with `emo-jax train --config {out / 'config.yaml'}`")
    (out / "prune.json").write_text(json.dumps({"source": str(source.path), "source_kind": source.kind,
                                                "source_step": source.step, "bytes_before": before,
                                                "bytes_after": after}, indent=1))
    return 0


def eval_main(args) -> int:
    from emo_jax.modular import documents
    from emo_jax.modular.evaluate import heldout_loss
    config, params, source = _load(args)
    d = config.data
    results = {}
    if args.calibration:
        sets = {"files": documents.read_documents(args.calibration)}
    else:
        domains = args.domains or documents.dataset_domains(d.data_dir, d.dataset)
        sets = {name: documents.domain_documents(d.data_dir, d.dataset, name, args.split) for name in domains}
    for name, texts in sets.items():
        results[name] = heldout_loss(config, params, documents.text_batches(texts, config, args.max_batches))
        r = results[name]
        print(f"{name:<22} loss {r['loss']:.4f}  perplexity {r['perplexity']:10.2f}  tokens {int(r['tokens'])}")
    tokens = sum(r["tokens"] for r in results.values())
    mean = sum(r["loss"] * r["tokens"] for r in results.values()) / max(tokens, 1.0)
    pool = "none" if config.routing.eval_pool == "none" else f"fixed {config.routing.eval_pool_size}"
    print(f"{'ALL':<22} loss {mean:.4f}  ({source.describe()}, experts per layer {list(config.model.expert_counts)}, "
          f"pool {pool})")
    if args.json:
        Path(args.json).write_text(json.dumps({"source": str(source.path), "step": source.step, "pool": pool,
                                               "domains": results, "loss": mean,
                                               "layer_experts": list(config.model.expert_counts)}, indent=1))
    return 0


def analyze_main(args) -> int:
    from emo_jax.modular import analyze, documents
    config, params, _ = _load(args)
    d = config.data
    domains = args.domains or documents.dataset_domains(d.data_dir, d.dataset)
    texts = {name: documents.domain_documents(d.data_dir, d.dataset, name, args.split, args.docs_per_domain)
             for name in domains}
    summary = analyze.analyze_documents(config, params, texts)
    out = Path(args.out)
    paths = analyze.write_tables(summary, out) + analyze.plot(summary, out, title=Path(args.model).name)
    print(analyze.format_summary(summary))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def reproduce_main(args) -> int:
    from emo_jax.config import load_config
    from emo_jax.modular import reproduce
    from emo_jax.modular.prune import check_counts
    config = load_config(args.config, args.overrides)
    try:
        keep = tuple(int(k) for k in args.keep.split(",")) if args.keep else ()
    except ValueError:
        raise ModularError(f"--keep {args.keep!r} must be comma-separated integers, e.g. 32,16,8,4.") from None
    for k in keep:
        check_counts(config.model, (k,) * config.model.n_layers)
    if args.seeds < 1:
        raise ModularError(f"--seeds {args.seeds} must be at least 1.")
    opts = reproduce.Options(keep=keep, calibration_docs=args.calibration_docs,
                             calibration_batches=args.calibration_batches, eval_batches=args.eval_batches,
                             random_seeds=args.random_seeds, method=args.method, analysis_docs=args.analysis_docs,
                             domains=tuple(args.domains or ()), seeds=args.seeds)
    reproduce.run(config, args.out or config.train.run_dir, opts, log=lambda s: print(s, flush=True))
    return 0


def _guarded(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(args) -> int:
        try:
            return fn(args)
        except (ModularError, FileNotFoundError) as err:
            print(f"emo-jax {name}: {err}", file=sys.stderr)
            return 1
    return run


def register(sub) -> None:
    """Adds the selective-expert subcommands to the `emo-jax` subparsers."""
    p = sub.add_parser("select", help="choose K experts per layer for a domain or calibration text")
    _checkpoint_args(p)
    _calibration_args(p, required=True)
    p.add_argument("--out", default=None, help="write the selection as JSON here")
    p.add_argument("overrides", nargs="*", help="section.key=value (data/routing)")
    p.set_defaults(fn=_guarded("select", select_main))

    p = sub.add_parser("prune", help="physically remove unselected experts: a smaller standalone checkpoint")
    _checkpoint_args(p)
    p.add_argument("--selection", default=None, help="a selection JSON from `emo-jax select --out`")
    _calibration_args(p, required=False)
    p.add_argument("--out", required=True, metavar="NEW_RUN_DIR", help="run_dir of the pruned model")
    p.add_argument("overrides", nargs="*", help="section.key=value for the pruned config (not model.*), "
                                                "e.g. optimizer.peak_lr=3e-4 train.steps=200 for fine-tuning")
    p.set_defaults(fn=_guarded("prune", prune_main))

    p = sub.add_parser("eval", help="held-out loss and perplexity per domain (full or pruned model)")
    _checkpoint_args(p)
    _pool_arg(p)
    p.add_argument("--domains", nargs="+", default=None, help="domains to evaluate (default: all)")
    p.add_argument("--split", default="validation")
    p.add_argument("--max-batches", type=int, default=None, help="batches per domain at most (default: all)")
    p.add_argument("--calibration", nargs="+", metavar="FILE", help="evaluate on these files instead")
    p.add_argument("--json", default=None, help="also write the results as JSON")
    p.add_argument("overrides", nargs="*", help="section.key=value (data/routing)")
    p.set_defaults(fn=_guarded("eval", eval_main))

    p = sub.add_parser("analyze", help="per-domain routing similarity, expert usage, specialisation measures (PNG+JSON+CSV)")
    _checkpoint_args(p)
    _pool_arg(p)
    p.add_argument("--domains", nargs="+", default=None)
    p.add_argument("--docs-per-domain", type=int, default=16)
    p.add_argument("--split", default="validation")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("overrides", nargs="*", help="section.key=value (data/routing)")
    p.set_defaults(fn=_guarded("analyze", analyze_main))

    p = sub.add_parser("reproduce", help="train EMO + standard MoE, prune per domain to K = E..E/8, compare")
    p.add_argument("--config", required=True, help="an EMO config, e.g. configs/reproduce_cpu.yaml")
    p.add_argument("--out", default=None, help="output directory (default: the config's train.run_dir)")
    p.add_argument("--keep", default=None, help="K values, e.g. 32,16,8,4 (default: E, E/2, E/4, E/8)")
    p.add_argument("--seeds", type=int, default=1,
                   help="training seeds: mean and std over them (finished seeds in --out are reused)")
    p.add_argument("--calibration-docs", type=int, default=4)
    p.add_argument("--calibration-batches", type=int, default=1)
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches per domain")
    p.add_argument("--random-seeds", type=int, default=2, help="random expert subsets per K (the baseline)")
    p.add_argument("--method", default="probability", choices=("probability", "frequency"))
    p.add_argument("--analysis-docs", type=int, default=16, help="validation documents per domain for the analysis")
    p.add_argument("--domains", nargs="+", default=None)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(fn=_guarded("reproduce", reproduce_main))
