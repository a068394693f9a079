"""emo_jax against transformers' OlmoeForCausalLM (PyTorch) on the same machine, same
weights, float32: training, forward and greedy-generation tokens/s, as a table.

  bash benchmarks/bench_vs_torch.sh                 (jemalloc as the launch scripts set it)
  PYTHONPATH=. JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_vs_torch.py
  ... --shapes S1 --rounds 5 --compile

Run it through benchmarks/bench_vs_torch.sh, or with the launch scripts' allocator
(launch/allocator.sh): with glibc both frameworks page-fault every large buffer they
free and allocate again, and the ratios then measure the allocator (BUILD_NOTES.md).

Needs the `interop` extra (torch, transformers). One process; every measured row is
compiled and warmed up first (jit / torch.compile time excluded), then the rounds
alternate between the rows (in a rotating order; in each round every row makes one
untimed call, then --repeats timed calls, so that no row is timed on the first call
after another framework ran) and the tables show the medians of all timed calls. Before timing, the emo_jax weights are exported to
the HF OLMoE layout (emo_jax/interop), loaded into transformers, and the logits of
both are compared (the run stops if they differ by more than 1e-3).

Shapes (issue 16), both 4 layers, vocab 8192, no shared expert, QK-norm (OLMoE):
  S1: d 128, 4 heads, 32 experts top-4, expert hidden 64, batch 16 x 256
  S2: d 256, 8 heads, 64 experts top-8, expert hidden 128, batch 8 x 512
Rows:
  emo_jax standard  routing.pool=none (OLMoE routing), one document per row
  emo_jax EMO       routing.pool=random (document pools, sizes k..E), the same tokens
                    packed as documents of 32-256 tokens (attention and pools per document)
  torch eager       OlmoeForCausalLM, AdamW, causal attention over the whole row
  torch.compile     the same model through torch.compile (default inductor backend),
                    with --compile: compiling the training and forward graphs took
                    883 s at S2 on this 2-core machine under load (a C++ build per
                    graph), which does not fit the ~10-minute default run
Training = forward + backward + clipped AdamW update (emo_jax's step also computes
its load-balance and z losses). Forward = logits of the whole batch, no gradient.
Generation = greedy decoding of --new-tokens tokens after a --prompt-len prompt with a
KV cache, batch as the shape's (emo_jax: `emo_jax.generate`, one jitted scan; torch:
`model.generate(do_sample=False)`); EMO routing does not change decoding (pools are a
training-time device), so emo_jax generation is one row.

Share of peak = model FLOP/s (6 x active matmul parameters + attention per trained
token, a third of that per forward token; emo_jax.train.metrics.flops_per_token) over
a float32 [2048 x 2048] @ [2048 x 2048] matmul measured in the same framework.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from emo_jax.config import load_config
from emo_jax.generate import SamplingConfig, generate
from emo_jax.interop import export_hf
from emo_jax.model import build_model
from emo_jax.synthetic import packed_batch
from emo_jax.train.metrics import active_matmul_params, flops_per_token
from emo_jax.train.optimizer import make_optimizer
from emo_jax.train.step import init_train_state, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # d, layers, heads, experts, top_k, hidden, vocab, batch, seq
    "S1": (128, 4, 4, 32, 4, 64, 8192, 16, 256),
    "S2": (256, 4, 8, 64, 8, 128, 8192, 8, 512),
}


def emo_config(shape: str, pooled: bool, extra_positions: int):
    d, layers, heads, experts, top_k, hidden, vocab, batch, seq = SHAPES[shape]
    overrides = [f"model.vocab_size={vocab}", f"model.d_model={d}", f"model.n_layers={layers}",
                 f"model.n_heads={heads}", f"model.head_dim={d // heads}", f"model.n_experts={experts}",
                 f"model.top_k={top_k}", f"model.expert_hidden={hidden}", "model.dtype=float32",
                 "model.remat=none", f"model.max_seq_len={seq + extra_positions}", f"data.seq_len={seq}",
                 f"data.global_batch_size={batch}", "mesh.expert=1", "mesh.data=1", "optimizer.warmup_steps=1",
                 "loss.lb_scope=micro_batch"]
    if pooled:
        overrides += ["routing.pool=random", f"routing.pool_min={top_k}", f"routing.pool_max={experts}"]
    return load_config(os.path.join(ROOT, "configs", "olmoe_1b7b.yaml"), overrides)


def batches(shape: str, seed: int = 0) -> tuple[dict, dict]:
    """(standard batch: one document per row, EMO batch: the same tokens as packed documents)."""
    _, _, _, _, _, _, vocab, batch, seq = SHAPES[shape]
    packed = packed_batch(np.random.default_rng(seed), batch, seq, vocab, min_doc=32, max_doc=256)
    whole = dict(packed, segment_ids=np.ones_like(packed["segment_ids"]),
                 positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
                 loss_mask=np.ones_like(packed["loss_mask"]))
    whole["loss_mask"][:, -1] = 0.0
    whole["targets"] = np.concatenate([packed["inputs"][:, 1:], packed["inputs"][:, :1]], axis=1)
    return whole, packed


def cpu_description() -> str:
    """The host CPU as /proc/cpuinfo names it, with its widest vector extension: the
    ratios move with the host (BUILD_NOTES.md, "Tenth session", an AVX2-only one)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "CPU model unknown"
    first_cpu = (line.split(":", 1) for line in info.split("\n\n")[0].splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in first_cpu}
    flags = set(fields.get("flags", "").split())
    isa = next((name for name in ("avx512f", "avx2", "avx", "sse4_2") if name in flags), "-")
    return (f"{fields.get('model name', 'CPU model unknown')} (family {fields.get('cpu family', '?')}, "
            f"model {fields.get('model', '?')}, {isa})")


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def jax_peak(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, a).block_until_ready()
    return 2 * n ** 3 / statistics.median(time_call(lambda: mm(a, a).block_until_ready()) for _ in range(repeats))


def torch_peak(torch, n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n)
    torch.mm(a, a)
    return 2 * n ** 3 / statistics.median(time_call(lambda: torch.mm(a, a)) for _ in range(repeats))


class EmoRows:
    """The emo_jax rows of one shape: jitted train step, forward, generation."""

    def __init__(self, shape: str, args):
        self.config = emo_config(shape, pooled=False, extra_positions=args.prompt_len + args.new_tokens)
        self.pooled = emo_config(shape, pooled=True, extra_positions=args.prompt_len + args.new_tokens)
        self.whole, self.packed = batches(shape)
        opt = make_optimizer(self.config.optimizer, 1000)
        self.models = {"standard": build_model(self.config), "EMO": build_model(self.pooled)}
        state = init_train_state(self.models["standard"], opt, self.config, jax.random.PRNGKey(0))
        self.params = state.params
        self.states, self.steps, self.fwds = {}, {}, {}
        for name, model, cfg in (("standard", self.models["standard"], self.config),
                                 ("EMO", self.models["EMO"], self.pooled)):
            self.steps[name] = jax.jit(make_train_step(model, opt, cfg), donate_argnums=0)
            self.states[name] = init_train_state(model, opt, cfg, jax.random.PRNGKey(0))
            self.fwds[name] = jax.jit(lambda p, b, r, model=model, train=name == "EMO": model.apply(
                {"params": p}, b["inputs"], b["segment_ids"], b["positions"], train=train,
                rngs={"routing": r})[0])
        self.batch = {"standard": jax.tree.map(jnp.asarray, self.whole),
                      "EMO": jax.tree.map(jnp.asarray, self.packed)}
        self.key = jax.random.PRNGKey(1)
        prompt_rows = self.whole["inputs"][:, :args.prompt_len]
        self.prompts = [list(map(int, row)) for row in prompt_rows]
        self.sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, eos_id=None)

    def train(self, name: str) -> None:
        self.states[name], metrics = self.steps[name](self.states[name], self.batch[name], self.key)
        jax.block_until_ready(metrics["loss"])

    def forward(self, name: str) -> None:
        jax.block_until_ready(self.fwds[name](self.params, self.batch[name], self.key))

    def generate(self) -> np.ndarray:
        return generate(self.config, self.params, self.prompts, self.sampling).tokens


class TorchRows:
    """transformers' OlmoeForCausalLM with the emo_jax weights (eager and compiled)."""

    def __init__(self, torch, transformers, emo: EmoRows, args):
        self.torch = torch
        with tempfile.TemporaryDirectory() as tmp:
            export_hf(emo.params, emo.config, tmp, layout="olmoe")
            self.model = transformers.OlmoeForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32)
        self.model.config.use_cache = True
        self.inputs = torch.tensor(emo.whole["inputs"], dtype=torch.long)
        self.prompts = self.inputs[:, :args.prompt_len].clone()
        self.new_tokens = args.new_tokens
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1)
        self.compiled = None

    def logits(self) -> np.ndarray:
        self.model.eval()
        with self.torch.no_grad():
            return self.model(self.inputs).logits.numpy()

    def compile(self) -> str | None:
        """torch.compile the model (both rows run once here, excluded from timing); the
        reason if it cannot run on this machine."""
        try:
            self.compiled = self.torch.compile(self.model)
            self.train(compiled=True)
            self.forward(compiled=True)
            return None
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the eager rows still run
            self.compiled = None
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    def train(self, compiled: bool = False) -> None:
        model = self.compiled if compiled else self.model
        self.model.train()
        loss = model(input_ids=self.inputs, labels=self.inputs).loss
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def forward(self, compiled: bool = False) -> None:
        model = self.compiled if compiled else self.model
        self.model.eval()
        with self.torch.no_grad():
            model(self.inputs).logits.sum()

    def generate(self):
        self.model.eval()
        with self.torch.no_grad():
            return self.model.generate(self.prompts, attention_mask=self.torch.ones_like(self.prompts),
                                       max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                       do_sample=False, pad_token_id=0, eos_token_id=None)[:, self.prompts.shape[1]:]


def run_shape(shape: str, args, torch, transformers, peaks: dict) -> None:
    d, layers, heads, experts, top_k, hidden, vocab, batch, seq = SHAPES[shape]
    print(f"\n=== {shape}: d {d}, {layers} layers, {heads} heads, {experts} experts top-{top_k}, "
          f"expert hidden {hidden}, vocab {vocab}, batch {batch} x {seq}", flush=True)
    emo = EmoRows(shape, args)
    tch = TorchRows(torch, transformers, emo, args)
    emo_logits = np.asarray(emo.fwds["standard"](emo.params, emo.batch["standard"], emo.key))
    per_position = np.max(np.abs(emo_logits - tch.logits()), axis=-1)  # [B, S]
    off = float(np.mean(per_position > 1e-4))
    print(f"logits, emo_jax vs transformers (same weights, float32): max |diff| {per_position.max():.2e}, "
          f"median {np.median(per_position):.2e}; positions above 1e-4: {off:.2%}", flush=True)
    # A freshly initialised router is nearly uniform: rounding can swap two experts of
    # almost equal probability at the top-k boundary, which changes that token (and the
    # tokens attending to it) by ~1e-3. Everything else must agree to float32 rounding.
    if not (np.median(per_position) < 1e-5 and off < 0.05):
        sys.exit("logits differ: the comparison would not be of the same model.")
    gen_emo, gen_torch = emo.generate(), tch.generate().numpy()
    agree = float(np.mean(gen_emo == gen_torch))
    print(f"greedy tokens equal in {agree:.1%} of positions", flush=True)

    rows = {  # (framework, routing) -> {task: callable}
        ("emo_jax", "standard"): {"train": lambda: emo.train("standard"), "forward": lambda: emo.forward("standard"),
                                  "generate": emo.generate},
        ("emo_jax", "EMO"): {"train": lambda: emo.train("EMO"), "forward": lambda: emo.forward("EMO")},
        ("torch", "eager"): {"train": tch.train, "forward": tch.forward, "generate": tch.generate},
    }
    compile_note = "skipped (pass --compile; it compiles C++ for minutes per graph)"
    if args.compile:
        start = time.perf_counter()
        reason = tch.compile()
        if reason is None:
            compile_note = f"compiled in {time.perf_counter() - start:.0f} s (excluded)"
            rows[("torch", "compile")] = {"train": lambda: tch.train(compiled=True),
                                          "forward": lambda: tch.forward(compiled=True)}
        else:
            compile_note = f"cannot run here: {reason}"
    print(f"torch.compile: {compile_note}", flush=True)
    for tasks in rows.values():  # warm-up (jit compile) outside the timing
        for fn in tasks.values():
            fn()
    times = {(row, task): [] for row, tasks in rows.items() for task in tasks}
    order = list(times)
    for r in range(args.rounds):
        for key in order[r % len(order):] + order[:r % len(order)]:
            rows[key[0]][key[1]]()  # untimed: the first call after switching rows
            times[key] += [time_call(rows[key[0]][key[1]]) for _ in range(args.repeats)]
    tokens = {"train": batch * seq, "forward": batch * seq, "generate": batch * args.new_tokens}
    flops = flops_per_token(emo.config, active_matmul_params(emo.config))
    flops_of = {"train": flops, "forward": flops / 3, "generate": None}
    rate = {key: tokens[key[1]] / statistics.median(v) for key, v in times.items()}
    ref = lambda task: rate.get((("torch", "eager"), task))
    print(f"\n{'row':22s} {'task':9s} {'tokens/s':>10s} {'vs torch eager':>15s} {'share of peak':>14s}  (median of "
          f"{args.rounds} rounds x {args.repeats} calls)")
    for (row, task), value in rate.items():
        peak = peaks["jax" if row[0] == "emo_jax" else "torch"]
        share = f"{flops_of[task] * value / peak:13.1%}" if flops_of[task] else f"{'-':>13s}"
        vs = f"{value / ref(task):14.2f}x" if ref(task) else f"{'-':>15s}"
        print(f"{row[0] + ' ' + row[1]:22s} {task:9s} {value:10.0f} {vs} {share}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["S1", "S2"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each row per round")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile rows (minutes of compiling)")
    args = parser.parse_args()
    try:
        import torch
        import transformers
    except ImportError as exc:
        sys.exit(f"bench_vs_torch needs the interop extra (torch, transformers): {exc}")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    peaks = {"jax": jax_peak(), "torch": torch_peak(torch)}
    print(f"machine: {platform.machine()}, {cpu_description()}, {os.cpu_count()} CPUs "
          f"(load average {os.getloadavg()[0]:.1f}); jax {jax.__version__} on {jax.default_backend()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    preload = os.environ.get("LD_PRELOAD", "")
    print(f"host allocator (both frameworks, one process): {'jemalloc' if 'jemalloc' in preload else preload or 'system'}"
          f"{', MALLOC_CONF=' + os.environ['MALLOC_CONF'] if os.environ.get('MALLOC_CONF') else ''}")
    print(f"float32 matmul peak (2048^3): jax {peaks['jax'] / 1e9:.1f} GFLOP/s, torch {peaks['torch'] / 1e9:.1f} GFLOP/s")
    for shape in args.shapes:
        run_shape(shape, args, torch, transformers, peaks)


if __name__ == "__main__":
    main()
