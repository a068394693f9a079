"""Lazy safetensors reading and streaming writing with numpy alone.

The safetensors format is an 8-byte little-endian header length, a JSON header
({name: {dtype, shape, data_offsets}}, optional "__metadata__") and the raw
little-endian tensor bytes. Reading through `np.memmap` touches only the bytes of
the slices asked for, so a converter can fill one device shard at a time without
holding the model in host memory; bfloat16 comes from `ml_dtypes` (a jax
dependency), which the `safetensors` package's numpy API cannot read. Writing
streams one tensor at a time and splits the output into files of bounded size,
with the `model.safetensors.index.json` that transformers expects.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A checkpoint directory or file that cannot be read, naming the problem and the fix."""


def _read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset where the tensor data starts)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path} is not a safetensors file (shorter than 8 bytes); re-export it.")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise SafetensorsError(f"{path} has an implausible header length {length}; the file is corrupt.")
        raw_header = f.read(length)
        if len(raw_header) != length:
            raise SafetensorsError(f"{path} is truncated: its header needs {length} bytes but the file ends after "
                                   f"{len(raw_header)}; re-download or re-export it.")
        try:
            header = json.loads(raw_header)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SafetensorsError(f"{path} has a header that is not valid JSON; the file is corrupt.") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} has a header that is not a JSON object; the file is corrupt.")
    return header, 8 + length


def _check_entries(path: Path, entries: dict, data_start: int) -> None:
    """Every tensor's byte range is well formed, matches its shape and lies inside the file."""
    size = path.stat().st_size
    for name, entry in entries.items():
        try:
            begin, end = (int(v) for v in entry["data_offsets"])
            shape = [int(n) for n in entry["shape"]]
            code = entry["dtype"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor '{name}' has a malformed header entry; the file is corrupt.") \
                from None
        if not 0 <= begin <= end or any(n < 0 for n in shape):
            raise SafetensorsError(f"{path}: tensor '{name}' has invalid data_offsets [{begin}, {end}]; "
                                   "the file is corrupt.")
        if code in DTYPES and end - begin != math.prod(shape) * DTYPES[code].itemsize:
            raise SafetensorsError(f"{path}: tensor '{name}' holds {end - begin} bytes but shape {shape} of "
                                   f"{code} needs {math.prod(shape) * DTYPES[code].itemsize}; the file is corrupt.")
        if data_start + end > size:
            raise SafetensorsError(f"{path} is truncated: tensor '{name}' ends at byte {data_start + end} but the "
                                   f"file has {size} bytes; re-download or re-export it.")


class SafetensorsFile:
    """One .safetensors file, tensors exposed as read-only memory maps."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header, self._data_start = _read_header(self.path)
        self.metadata: dict = header.pop("__metadata__", None) or {}
        _check_entries(self.path, header, self._data_start)
        self._entries: dict = header
        self._map: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._entries[name]["dtype"]
        if code not in DTYPES:
            raise SafetensorsError(f"tensor '{name}' in {self.path} has dtype {code}, which emo_jax cannot read; "
                                   "convert the checkpoint to float32, float16 or bfloat16 first.")
        return DTYPES[code]

    def array(self, name: str) -> np.ndarray:
        """A lazy, read-only view of the tensor (nothing is read until it is sliced)."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = self._entries[name]["data_offsets"]
        flat = self._map[self._data_start + begin:self._data_start + end]
        return flat.view(self.dtype(name)).reshape(self.shape(name))


class SafetensorsReader:
    """All tensors of a Hugging Face checkpoint directory (one file or an index of shards)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise SafetensorsError(f"{index} is not a valid index (JSON with a 'weight_map' of tensor -> "
                                       "file); re-download or re-export the checkpoint.") from None
            for f in files:
                if not (directory / f).is_file():
                    raise SafetensorsError(f"{directory / f} is missing (listed in {index}); the checkpoint is "
                                           "incomplete: re-download or re-export it.")
            files = {f: SafetensorsFile(directory / f) for f in files}
            self._where = {name: files[f] for name, f in weight_map.items()}
        elif (directory / SINGLE_FILE).is_file():
            single = SafetensorsFile(directory / SINGLE_FILE)
            self._where = {name: single for name in single.keys()}
        else:
            found = sorted(p.name for p in directory.glob("*.safetensors"))
            if len(found) == 1:
                single = SafetensorsFile(directory / found[0])
                self._where = {name: single for name in single.keys()}
            else:
                raise SafetensorsError(
                    f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}; point at a Hugging Face checkpoint "
                    "directory saved with safetensors (save_pretrained(..., safe_serialization=True)).")
        self.directory = directory

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._file(name).dtype(name)

    def array(self, name: str) -> np.ndarray:
        return self._file(name).array(name)

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise SafetensorsError(f"tensor '{name}' is missing from {self.directory}; the checkpoint is "
                                   "incomplete or in another layout (try --layout olmoe / emo).")
        return self._where[name]


def _header_bytes(entries: dict, metadata: dict | None) -> bytes:
    header = dict(entries)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict | None = None) -> None:
    """Writes (name, array) pairs to one safetensors file; arrays are consumed one by one,
    but the list is materialised for the header, so callers pass one file's worth."""
    items = [(name, np.ascontiguousarray(a)) for name, a in tensors]
    entries, offset = {}, 0
    for name, a in items:
        if a.dtype not in DTYPE_NAMES:
            raise SafetensorsError(f"tensor '{name}' has dtype {a.dtype}, which safetensors cannot store here.")
        entries[name] = {"dtype": DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                         "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    with open(path, "wb") as f:
        f.write(_header_bytes(entries, metadata))
        for _, a in items:
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def write_checkpoint(directory: str | Path, tensors: Iterator[tuple[str, np.ndarray]],
                     max_shard_bytes: int = 4 << 30, metadata: dict | None = None) -> list[Path]:
    """Streams (name, array) pairs into `model.safetensors`, or into
    `model-0000i-of-0000n.safetensors` shards plus the index when they exceed
    `max_shard_bytes`. At most one shard's tensors are held in memory at a time."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    written: list[Path] = []
    size = 0
    temp_names: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        name = f"shard-{len(temp_names):05d}.tmp"
        write_file(directory / name, shards[-1], metadata)
        for tensor_name, _ in shards[-1]:
            weight_map[tensor_name] = name
        temp_names.append(name)
        shards[-1] = []

    for name, array in tensors:
        array = np.asarray(array)
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            flush()
            size = 0
        shards[-1].append((name, array))
        size += array.nbytes
        total += array.nbytes
    if shards[-1] or not temp_names:
        flush()
    for old in (SINGLE_FILE, INDEX_FILE):
        (directory / old).unlink(missing_ok=True)
    if len(temp_names) == 1:
        (directory / temp_names[0]).rename(directory / SINGLE_FILE)
        return [directory / SINGLE_FILE]
    final = {t: f"model-{i + 1:05d}-of-{len(temp_names):05d}.safetensors" for i, t in enumerate(temp_names)}
    for temp, name in final.items():
        (directory / temp).rename(directory / name)
        written.append(directory / name)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    return written
