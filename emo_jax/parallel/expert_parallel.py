"""Expert parallelism: the whole MoE layer as a `shard_map` body with explicit collectives.

Outside the MoE block the batch is sharded over (data, fsdp, expert). Inside, every
device routes its own tokens, then token copies travel along the `expert` axis to
the device that owns their expert (experts are sharded over `expert`), run through
the local experts, and travel back. Routing statistics are psum'd over every axis
that shards tokens, so the load-balance loss sees the global expert frequencies.

Shape letters (local view): T local tokens, K experts per token, M = T * K copies,
P expert-parallel peers (size of the `expert` axis), E_l = E / P local experts.

Transports (one switch):
- "all_to_all": a dense exchange of [P, C, D] buffers, C = capacity_factor x M / P
  rows per peer; when a step would overflow them (a global max of the send sizes),
  that step uses worst-case [P, M, D] buffers instead, so nothing is ever dropped;
  works on every backend.
- "ragged_all_to_all": sends only the real rows (GPU, TPU v4+; XLA:CPU cannot
  compile it). The receive buffer is still worst-case sized [P * M, D].
- "emulated_ragged": the ragged offsets and layout with the exchange done by
  all_gather; for checking the ragged arithmetic on CPU, never for speed.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from emo_jax import compat
from emo_jax import kernels
from emo_jax.kernels import MoEBackend
from emo_jax.moe import MoELayerFn, route_tokens, shared_experts_ffn
from emo_jax.parallel.mesh import BATCH_AXES
from emo_jax.routing import RoutingStats

Array = jax.Array
EXPERT_AXIS = "expert"
TRANSPORTS = ("all_to_all", "ragged_all_to_all", "emulated_ragged")
# Rows per peer of the dense all_to_all, in units of the mean M / P (kernels.exchange_capacity).
DEFAULT_EXCHANGE_CAPACITY = 1.5


def resolve_transport(transport: str) -> str:
    """'auto' -> ragged_all_to_all where the backend compiles it, else all_to_all."""
    if transport == "auto":
        return "ragged_all_to_all" if compat.has_ragged_all_to_all() else "all_to_all"
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown expert-parallel transport {transport!r}; use 'auto' or one of {TRANSPORTS}.")
    if transport == "ragged_all_to_all" and not compat.has_ragged_all_to_all():
        raise ValueError(f"kernels.transport=ragged_all_to_all is not supported on backend "
                         f"'{jax.default_backend()}'; use all_to_all (or auto).")
    return transport


class SendPlan(NamedTuple):
    """Where this device's expert-sorted copies go."""

    send_sizes: Array  # i32[P]  copies for each peer (contiguous in the sorted buffer)
    send_offsets: Array  # i32[P]  first sorted row for each peer
    recv_counts: Array  # i32[P, E_l]  rows each peer sends for each of my local experts


def _exclusive_cumsum(x: Array, axis: int = -1) -> Array:
    return jnp.cumsum(x, axis=axis) - x


def send_plan(group_sizes: Array, n_peers: int) -> SendPlan:
    """group_sizes: i32[E] copies per global expert, experts owned in blocks of E_l."""
    per_peer = group_sizes.reshape(n_peers, -1)  # [P, E_l]
    send_sizes = jnp.sum(per_peer, axis=1)
    recv_counts = jax.lax.all_to_all(per_peer, EXPERT_AXIS, 0, 0)
    return SendPlan(send_sizes, _exclusive_cumsum(send_sizes), recv_counts)


def local_group_keys(recv_counts: Array, rows: int, chunk_capacity: int | None) -> Array:
    """Local expert of every row of a receive buffer (E_l for rows holding nothing).

    recv_counts: i32[P, E_l], rows each peer sent for each local expert; each peer's
    chunk is sorted by local expert. chunk_capacity: rows reserved per peer (dense
    layout, chunk q starts at q * capacity), or None for chunks packed back to back
    (ragged layout). Returns i32[rows].
    """
    n_peers, n_local = recv_counts.shape
    expert_keys = jnp.arange(n_local, dtype=jnp.int32)
    if chunk_capacity is not None:
        gaps = chunk_capacity - jnp.sum(recv_counts, axis=1, keepdims=True)  # [P, 1]
        lengths = jnp.concatenate([recv_counts, gaps], axis=1).reshape(-1)
        keys = jnp.tile(jnp.append(expert_keys, n_local), n_peers)
    else:
        tail = rows - jnp.sum(recv_counts)
        lengths = jnp.append(recv_counts.reshape(-1), tail)
        keys = jnp.append(jnp.tile(expert_keys, n_peers), n_local)
    return jnp.repeat(keys, lengths, total_repeat_length=rows)


def _local_experts(x_recv: Array, keys: Array, n_local: int, w_gate: Array, w_up: Array,
                   w_down: Array, backend: MoEBackend, expected_rows: int) -> Array:
    """Runs the rows of a receive buffer through their local experts, in buffer order:
    an MoE with one copy per row and gate 1; rows holding nothing (key E_l) give 0.
    expected_rows: the rows a device receives on average (M, what it sends)."""
    ones = jnp.ones((keys.shape[0], 1), jnp.float32)
    ffn = kernels.local_expert_ffn(backend, expected_rows)
    return ffn(x_recv, keys[:, None], ones, keys < n_local, w_gate, w_up, w_down)


def peer_capacity(copies: int, n_peers: int, capacity_factor: float, align: int = 8) -> int:
    """Rows reserved per peer in the bounded dense exchange: capacity_factor x the mean
    rows a device sends to one peer (M / P), rounded up to `align`, at most M (the
    worst case, which never overflows)."""
    if capacity_factor <= 0:
        raise ValueError(f"kernels.exchange_capacity must be > 0, got {capacity_factor}.")
    mean = -(-copies // n_peers)
    cap = -(-math.ceil(capacity_factor * mean) // align) * align
    return min(max(cap, align), copies)


def _dense_exchange(x_sorted: Array, plan: SendPlan, weights, n_peers: int, backend: MoEBackend,
                    chunk: int) -> Array:
    """all_to_all of [P, chunk, D] buffers (chunk rows reserved per peer); returns the
    expert outputs in sorted order. Exact when every send size is <= chunk (always
    for chunk = M, the worst case)."""
    m, d = x_sorted.shape
    n_local = weights[0].shape[0]
    row = jnp.arange(chunk, dtype=jnp.int32)
    src = plan.send_offsets[:, None] + row[None, :]  # [P, chunk]
    send_valid = row[None, :] < plan.send_sizes[:, None]
    send = jnp.where(send_valid[..., None], x_sorted[jnp.clip(src, 0, m - 1)], 0)
    recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0)  # [P, chunk, D]: recv[q] came from peer q
    keys = local_group_keys(plan.recv_counts, n_peers * chunk, chunk_capacity=chunk)
    y = _local_experts(recv.reshape(n_peers * chunk, d), keys, n_local, *weights, backend, m)
    back = jax.lax.all_to_all(y.reshape(n_peers, chunk, d), EXPERT_AXIS, 0, 0)  # back[p]: what I sent to p
    # Sorted copy i went to peer p = its expert's owner, as row i - send_offsets[p].
    sorted_row = jnp.arange(m, dtype=jnp.int32)
    peer = jnp.sum(sorted_row[:, None] >= plan.send_offsets[None, 1:], axis=1)
    within = jnp.clip(sorted_row - plan.send_offsets[peer], 0, chunk - 1)
    return back[peer, within]


def _bounded_exchange(x_sorted: Array, plan: SendPlan, weights, n_peers: int, backend: MoEBackend,
                      capacity: int) -> Array:
    """The dense exchange with `capacity` rows per peer, dropless: when any device of
    this expert group sends more than that to one peer (a global max of the send
    sizes, one scalar all-reduce), the whole group takes the worst-case exchange for
    this step instead (`lax.cond`, the same branch on every peer of the exchange).
    The worst-case branch is rematerialised (`jax.checkpoint`), so the common branch
    does not carry its [P, M, D]-sized residuals for the backward pass."""
    m = x_sorted.shape[0]
    if capacity >= m:
        return _dense_exchange(x_sorted, plan, weights, n_peers, backend, m)
    overflow = jax.lax.pmax(jnp.max(plan.send_sizes), EXPERT_AXIS) > capacity
    worst = jax.checkpoint(lambda xs, pl, w: _dense_exchange(xs, pl, w, n_peers, backend, m))
    bounded = lambda xs, pl, w: _dense_exchange(xs, pl, w, n_peers, backend, capacity)
    return jax.lax.cond(overflow, worst, bounded, x_sorted, plan, weights)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                *, axis_name):
    """ragged_all_to_all semantics built from all_gather (CPU-compilable, slow)."""
    del recv_sizes
    me = jax.lax.axis_index(axis_name)
    all_operand = jax.lax.all_gather(operand, axis_name)  # [P, M, D]
    in_off = jax.lax.all_gather(input_offsets, axis_name)[:, me]  # [P]  what each sender sends me
    sizes = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    out_off = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    rows = operand.shape[0]
    r = jnp.arange(rows, dtype=jnp.int32)
    valid = r[None, :] < sizes[:, None]  # [P, M]
    src = jnp.clip(in_off[:, None] + r[None, :], 0, rows - 1)
    values = jnp.take_along_axis(all_operand, src[..., None], axis=1)  # [P, M, D]
    dest = jnp.where(valid, out_off[:, None] + r[None, :], output.shape[0])  # out of bounds = dropped
    return output.at[dest.reshape(-1)].set(values.reshape(-1, operand.shape[-1]), mode="drop")


def _ragged_exchange(x_sorted: Array, plan: SendPlan, weights, n_peers: int, emulate: bool,
                     backend: MoEBackend) -> Array:
    """Sends only real rows; receive buffer [P * M, D] (worst case, dropless)."""
    exchange = _emulated_ragged_all_to_all if emulate else jax.lax.ragged_all_to_all
    m, d = x_sorted.shape
    n_local = weights[0].shape[0]
    me = jax.lax.axis_index(EXPERT_AXIS)
    # all_sizes[q, p]: rows peer q sends to peer p.
    all_sizes = jax.lax.all_gather(plan.send_sizes, EXPERT_AXIS)
    recv_sizes = all_sizes[:, me]
    recv_offsets = _exclusive_cumsum(recv_sizes)  # my chunks, in sender order
    # My chunk for peer p lands after the chunks of senders q < me in p's buffer.
    remote_offsets = jnp.sum(jnp.where(jnp.arange(n_peers)[:, None] < me, all_sizes, 0), axis=0)
    recv = exchange(x_sorted, jnp.zeros((n_peers * m, d), x_sorted.dtype), plan.send_offsets,
                    plan.send_sizes, remote_offsets, recv_sizes, axis_name=EXPERT_AXIS)
    keys = local_group_keys(plan.recv_counts, n_peers * m, chunk_capacity=None)
    y = _local_experts(recv, keys, n_local, *weights, backend, m)
    # Back: my chunk from peer q returns to q's sorted buffer at q's send offset for me.
    all_send_offsets = jax.lax.all_gather(plan.send_offsets, EXPERT_AXIS)  # [q, p]
    back_offsets = all_send_offsets[:, me]
    return exchange(y, jnp.zeros((m, d), y.dtype), recv_offsets, recv_sizes, back_offsets,
                    plan.send_sizes, axis_name=EXPERT_AXIS)


def expert_parallel_ffn(x: Array, expert_ids: Array, gates: Array, valid: Array, w_gate: Array,
                        w_up: Array, w_down: Array, *, n_peers: int, transport: str,
                        backend: MoEBackend | None = None, capacity_factor: float | None = None) -> Array:
    """Local view of the dropless expert computation with experts sharded over `expert`.

    x: [T, D]; expert_ids: i32[T, K] global expert ids; gates: f32[T, K]; valid:
    bool[T]; w_*: this device's E_l experts; backend: dispatch, combine and the local
    expert computation (default: the reference); capacity_factor: rows reserved per
    peer by the dense all_to_all, in units of the mean M / P (None: the worst case M).
    Returns [T, D].
    """
    backend = backend or kernels.backend_for("reference")
    n_local = w_gate.shape[0]
    if n_peers == 1:
        return backend.moe_ffn(x, expert_ids, gates, valid, w_gate, w_up, w_down)
    sent = backend.dispatch(x, expert_ids, valid, n_local * n_peers)
    plan = send_plan(sent.group_sizes, n_peers)
    weights = (w_gate, w_up, w_down)
    if transport == "all_to_all":
        m = sent.x_sorted.shape[0]
        capacity = m if capacity_factor is None else peer_capacity(m, n_peers, capacity_factor)
        y_sorted = _bounded_exchange(sent.x_sorted, plan, weights, n_peers, backend, capacity)
    else:
        y_sorted = _ragged_exchange(sent.x_sorted, plan, weights, n_peers, emulate=transport == "emulated_ragged",
                                    backend=backend)
    return backend.combine(y_sorted, sent.order, sent.valid_sorted, gates)


def _stack_per_shard(stats: RoutingStats) -> RoutingStats:
    return jax.tree.map(lambda s: s[None], stats)


def make_expert_parallel_moe(mesh: jax.sharding.Mesh, transport: str = "auto",
                             stats: str = "global", backend: str | MoEBackend = "auto",
                             capacity_factor: float | None = DEFAULT_EXCHANGE_CAPACITY) -> MoELayerFn:
    """An MoE layer function (same signature as `moe.moe_layer`) running under shard_map.

    stats: "global" psums the routing statistics over data x fsdp x expert (returned
    replicated); "local" returns each batch shard's own statistics stacked on a
    leading axis [n_shards, ...] (the micro-batch-local ablation). capacity_factor:
    rows per peer of the dense all_to_all buffer in units of the mean (None: the
    worst case); a step that would overflow it takes the worst-case buffer instead.
    """
    transport = resolve_transport(transport)
    moe_backend = backend if isinstance(backend, MoEBackend) else kernels.backend_for(backend)
    if stats not in ("global", "local"):
        raise ValueError(f"stats must be 'global' or 'local', got {stats!r}.")
    n_peers = mesh.shape[EXPERT_AXIS]
    batch_spec = P(BATCH_AXES)
    stats_spec = RoutingStats(*([P() if stats == "global" else batch_spec] * len(RoutingStats._fields)))

    def body(x, segment_ids, pool_sizes, w_router, w_gate, w_up, w_down, w_shared_router, shared_weights, *,
             routed_top_k, n_shared):
        ids, gates, s_gates, layer_stats = route_tokens(x, segment_ids, pool_sizes, w_router, routed_top_k,
                                                        n_shared, w_shared_router)
        b, s, d = x.shape
        k = ids.shape[-1]
        tokens, valid = x.reshape(-1, d), (segment_ids > 0).reshape(-1)
        # Only routed copies travel; the shared experts' slots in the stack get no rows.
        y = expert_parallel_ffn(tokens, ids.reshape(-1, k), gates.reshape(-1, k), valid, w_gate, w_up, w_down,
                                n_peers=n_peers, transport=transport, backend=moe_backend,
                                capacity_factor=capacity_factor)
        if n_shared:
            # Every device runs the shared experts on its own tokens (replicated weights):
            # no exchange, no shard that receives a copy of every token.
            y = y + shared_experts_ffn(tokens, valid, *shared_weights,
                                       None if s_gates is None else s_gates.reshape(-1, n_shared))
        if stats == "global":
            # The balance loss needs frequencies over every token of the step, not this shard's.
            layer_stats = jax.tree.map(lambda v: jax.lax.psum(v, BATCH_AXES), layer_stats)
        else:
            layer_stats = _stack_per_shard(layer_stats)
        return y.reshape(b, s, d), layer_stats

    def moe_fn(x, segment_ids, pool_sizes, w_router, w_gate, w_up, w_down, *, routed_top_k, n_shared,
               w_shared_router=None):
        if w_gate.shape[0] % n_peers:
            raise ValueError(f"{w_gate.shape[0]} experts do not divide over the expert axis of size {n_peers}.")
        if x.shape[0] % _batch_shards(mesh):
            raise ValueError(f"batch of {x.shape[0]} rows does not divide over the "
                             f"{_batch_shards(mesh)} batch shards (data x fsdp x expert).")
        n_routed = w_router.shape[-1]
        # The shared experts' weights, replicated into the shard_map (a small gather of
        # n_s experts); the stack stays whole so that E divides over the expert axis.
        shared_weights = tuple(w[n_routed:] for w in (w_gate, w_up, w_down)) if n_shared else None
        expert_spec = P(EXPERT_AXIS)
        in_specs = (batch_spec, batch_spec, None if pool_sizes is None else batch_spec, P(),
                    expert_spec, expert_spec, expert_spec, None if w_shared_router is None else P(),
                    None if shared_weights is None else (P(), P(), P()))
        fn = compat.shard_map(
            functools.partial(body, routed_top_k=routed_top_k, n_shared=n_shared),
            mesh=mesh, in_specs=in_specs, out_specs=(batch_spec, stats_spec), check_vma=True)
        return fn(x, segment_ids, pool_sizes, w_router, w_gate, w_up, w_down, w_shared_router, shared_weights)

    return moe_fn


def _batch_shards(mesh: jax.sharding.Mesh) -> int:
    n = 1
    for axis in BATCH_AXES:
        n *= mesh.shape[axis]
    return n
