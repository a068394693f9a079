"""How one emo_jax parameter is made of Hugging Face tensors, and back.

Every emo_jax array is a reshape + transpose of one HF tensor (attention, norms,
router) or a stack of such tensors, one per expert. `FromHF` records the reshape
(`split`, grouped per HF axis) and the transpose (`perm`); `read_region` reads only
the rectangle of the HF tensor(s) that one device shard needs; `to_hf` inverts the
map for export. Reshape and transpose are exact, so import/export round trips are
bit-exact.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, Union

import numpy as np


class TensorSource(Protocol):
    def shape(self, name: str) -> tuple[int, ...]: ...

    def array(self, name: str) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class FromHF:
    """emo = transpose(reshape(hf[:rows], split), perm).

    hf_shape: the stored HF shape. groups[j]: how many `split` axes HF axis j becomes
    (e.g. q_proj [H*Dh, D] -> split (H, Dh, D), groups (2, 1)). perm[i]: the split
    axis that emo axis i is. rows: keep the first `rows` entries of HF axis 0 (the
    EMO router has an unused row per shared expert); export pads them with zeros.
    row_offset: the kept rows start there (the EMO shared router: the last n_s rows of
    `mlp.gate.weight`, when n_s >= 2); the same HF tensor then feeds two emo arrays and
    export merges their rows (`merge_rows`).
    """

    name: str
    hf_shape: tuple[int, ...]
    split: tuple[int, ...]
    groups: tuple[int, ...]
    perm: tuple[int, ...]
    rows: int | None = None
    row_offset: int = 0

    def __post_init__(self):
        assert sum(self.groups) == len(self.split) == len(self.perm), self
        assert len(self.groups) == len(self.hf_shape), self
        assert math.prod(self.split) == math.prod(self._kept_shape()), self
        assert self.row_offset == 0 or self.rows is not None, self
        assert self.row_offset + (self.rows or 0) <= self.hf_shape[0], self

    def _kept_shape(self) -> tuple[int, ...]:
        if self.rows is None:
            return self.hf_shape
        return (self.rows,) + self.hf_shape[1:]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.split[p] for p in self.perm)


@dataclasses.dataclass(frozen=True)
class Stacked:
    """emo = stack(parts) along a new leading axis (the expert axis)."""

    parts: tuple[FromHF, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts),) + self.parts[0].shape


Source = Union[FromHF, Stacked]


def transposed(name: str, hf_shape: tuple[int, int]) -> FromHF:
    """A torch Linear weight [out, in] as an emo [in, out] matrix."""
    return FromHF(name, hf_shape, hf_shape, (1, 1), (1, 0))


def identity(name: str, hf_shape: tuple[int, ...]) -> FromHF:
    return FromHF(name, hf_shape, hf_shape, (1,) * len(hf_shape), tuple(range(len(hf_shape))))


def _normalise(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Concrete step-1 slices for every axis (make_array_from_callback passes slice(None))."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
        out.append(slice(start, stop))
    return tuple(out)


def _read_one(source: TensorSource, src: FromHF, index: tuple[slice, ...]) -> np.ndarray:
    """The emo-layout region `index` of one FromHF, reading only a covering HF rectangle."""
    view_index: list[slice] = [slice(None)] * len(src.split)
    for emo_axis, view_axis in enumerate(src.perm):
        view_index[view_axis] = index[emo_axis]
    hf_index, inner_index, region_split = [], [], []
    axis = 0
    for count in src.groups:
        group = range(axis, axis + count)
        outer = view_index[axis]
        inner = math.prod(src.split[a] for a in group[1:])
        # The outer split axis maps to a contiguous HF range; inner axes are read whole.
        hf_index.append(slice(outer.start * inner, outer.stop * inner))
        region_split.append(outer.stop - outer.start)
        inner_index.append(slice(None))
        for a in group[1:]:
            region_split.append(src.split[a])
            inner_index.append(view_index[a])
        axis += count
    if src.row_offset:
        hf_index[0] = slice(hf_index[0].start + src.row_offset, hf_index[0].stop + src.row_offset)
    hf = source.array(src.name)[tuple(hf_index)]
    view = np.asarray(hf).reshape(region_split)[tuple(inner_index)]
    return np.ascontiguousarray(view.transpose(src.perm))


def read_region(source: TensorSource, src: Source, index: tuple = ()) -> np.ndarray:
    """The region `index` (a tuple of slices; () = everything) of the emo array of `src`."""
    index = _normalise(index, src.shape)
    if isinstance(src, FromHF):
        return _read_one(source, src, index)
    experts = range(index[0].start, index[0].stop)
    return np.stack([_read_one(source, src.parts[e], index[1:]) for e in experts])


def to_hf(src: Source, emo: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The HF tensor(s) of an emo array: the inverse of `read_region` (zero-padded rows)."""
    if isinstance(src, Stacked):
        return [pair for part, e in zip(src.parts, emo) for pair in to_hf(part, e)]
    kept = src._kept_shape()
    hf = np.ascontiguousarray(np.transpose(emo, np.argsort(src.perm))).reshape(kept)
    if src.rows is not None and src.rows < src.hf_shape[0]:
        full = np.zeros(src.hf_shape, hf.dtype)
        full[src.row_offset:src.row_offset + src.rows] = hf
        hf = full
    return [(src.name, hf)]


def merge_rows(parts: list[tuple[FromHF, np.ndarray]]) -> np.ndarray:
    """One HF tensor from several row-range parts (each array full-size, from `to_hf`):
    rows a part owns are copied from it, the rest stay zero."""
    out = np.zeros(parts[0][0].hf_shape, parts[0][1].dtype)
    for src, hf in parts:
        if src.rows is None:
            raise ValueError(f"tensor '{src.name}' is mapped whole more than once")
        out[src.row_offset:src.row_offset + src.rows] = hf[src.row_offset:src.row_offset + src.rows]
    return out


def hf_names(src: Source) -> list[FromHF]:
    return list(src.parts) if isinstance(src, Stacked) else [src]
