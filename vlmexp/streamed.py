"""A checkpoint read tensor by tensor: its module tree on the meta device, and where each
in-memory tensor lies in its safetensors files.

The merge engine needs each donor only long enough to subtract the base from it, one tensor at
a time. Opening a donor with transformers holds the whole donor in memory (one more model's
bytes at the engine's peak); `open_streamed` reads the safetensors headers instead, maps each
stored key to its in-memory name with transformers' own renaming rules (legacy LLaVA and
Qwen-VL layouts included), and `StreamedModel.read` reads one tensor with plain file reads (no
memory map, whose pages would count as the process's memory while it is open).

A checkpoint transformers would change on load beyond renaming keys (fused or split tensors,
modules it keeps in float32 whatever the dtype, pickle files) is not streamed: `open_streamed`
returns the reason, and the caller opens it with `checkpoint.open_model`.

Example:
    >>> streamed, why = open_streamed("models/vqa-expert")      # doctest: +SKIP
    >>> streamed.read("lm_head.weight").shape                   # doctest: +SKIP
    torch.Size([1000, 64])
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmexp.checkpoint import (
    SAFE_INDEX,
    SAFE_WEIGHTS,
    ResolvedModel,
    check_weights,
    model_skeleton,
    resolve_model,
)
from vlmexp.errors import CheckpointError

_ST_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
    "F32": torch.float32, "F64": torch.float64,
}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor in a safetensors file: its file, dtype, shape and byte range."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class StreamedModel:
    """A checkpoint opened without reading its weights (see the module docstring).

    `model` is the module tree on the meta device (names, shapes, ties: what `layout.align`
    reads); `tensors` maps every in-memory state-dict name to where it is stored.
    """

    model: torch.nn.Module
    source: ResolvedModel
    tensors: dict[str, StoredTensor]

    def read(self, name: str) -> torch.Tensor:
        """The tensor stored for in-memory name `name`, on the CPU."""
        return read_stored(self.tensors[name])

    @property
    def largest_tensor_bytes(self) -> int:
        return max((t.nbytes for t in self.tensors.values()), default=0)

    def weights_sha256(self) -> str:
        """`checkpoint.weights_sha256` of the model transformers would open, computed one tensor
        at a time: sorted in-memory names, tied tensors once (the first name)."""
        state = self.model.state_dict(keep_vars=True)
        digest = hashlib.sha256()
        seen: set[int] = set()
        since_trim = 0
        for name in sorted(state):
            ident = id(state[name])
            if ident in seen:
                continue
            seen.add(ident)
            tensor = self.read(name)
            dtype = str(tensor.dtype).removeprefix("torch.")
            digest.update(f"{name}\0{dtype}\0{tuple(tensor.shape)}\0".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # no copy
            since_trim += tensor.nbytes
            del tensor
            if since_trim >= TRIM_EVERY:
                release_freed_memory()
                since_trim = 0
        return digest.hexdigest()


# bytes read between two `release_freed_memory` calls while a checkpoint is streamed
TRIM_EVERY = 256 << 20


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`).

    Streamed tensors of a few to a few tens of MB fall below glibc's mmap threshold and come
    from the heap; freed between the tensors kept beside them (task vectors), their pages stay
    with the process unless trimmed: measured on a 2B-shaped model, 1.8 GB more resident
    memory per donor than its task vectors, and 2 GB more at the peak while it was read.
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to give back this way
        pass


def read_stored(t: StoredTensor) -> torch.Tensor:
    """Read one stored tensor with plain file reads into a fresh CPU tensor."""
    out = torch.empty(t.shape, dtype=t.dtype)
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    with open(t.file, "rb", buffering=0) as f:
        f.seek(t.begin)
        done = 0
        while done < t.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{t.file}: truncated while reading {t.key}")
            done += n
    return out


def safetensors_entries(folder: Path) -> dict[str, StoredTensor]:
    """Every stored key of the folder's safetensors files (one file or an index), from headers."""
    index = folder / SAFE_INDEX
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.is_file() else [SAFE_WEIGHTS])
    entries: dict[str, StoredTensor] = {}
    for name in files:
        path = folder / name
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        start = 8 + header_len
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {key} has dtype {entry['dtype']}, which "
                                      "vlmexp does not read")
            begin, stop = entry["data_offsets"]
            entries[key] = StoredTensor(path, key, dtype, tuple(entry["shape"]), start + begin,
                                        start + stop)
    return entries


def open_streamed(path_or_id: str | os.PathLike | ResolvedModel, revision: str | None = None, *,
                  trust_remote_code: bool = False,
                  allow_pickle: bool = False) -> tuple[StreamedModel | None, str]:
    """Open a checkpoint to be read tensor by tensor; (None, why) when transformers' loader must
    open it instead (the module docstring says when). Faults of the files are CheckpointErrors.
    """
    source = path_or_id if isinstance(path_or_id, ResolvedModel) else resolve_model(
        path_or_id, revision, allow_pickle=allow_pickle)
    weights = check_weights(source.folder, allow_pickle=allow_pickle)
    if not weights.name.startswith(SAFE_WEIGHTS):
        return None, f"{weights.name} is not safetensors"
    skeleton = model_skeleton(source, trust_remote_code=trust_remote_code)
    if getattr(skeleton, "_keep_in_fp32_modules", None) or getattr(
            skeleton, "_keep_in_fp32_modules_strict", None):
        return None, f"{type(skeleton).__name__} keeps some modules in float32 on load"
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(skeleton)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    state = skeleton.state_dict(keep_vars=True)
    tensors: dict[str, StoredTensor] = {}
    for key, stored in safetensors_entries(source.folder).items():
        name, converter = rename_source_key(key, renamings, converters,
                                            skeleton.base_model_prefix, state)
        if converter is not None:
            return None, f"transformers converts {key} on load"
        if name not in state:
            return None, f"{key} has no in-memory tensor ({name})"
        if name in tensors:
            return None, f"{key} and {tensors[name].key} both load into {name}"
        expected = state[name]
        if tuple(expected.shape) != stored.shape:
            return None, f"{key}: stored shape {stored.shape}, model {tuple(expected.shape)}"
        if expected.dtype != stored.dtype:  # transformers would cast it on load
            return None, f"{key}: stored as {stored.dtype}, loads as {expected.dtype}"
        tensors[name] = stored
    # tied names share one stored tensor
    by_identity: dict[int, StoredTensor] = {id(state[n]): t for n, t in tensors.items()}
    for name, tensor in state.items():
        if name not in tensors:
            stored = by_identity.get(id(tensor))
            if stored is None:
                return None, f"{name} is not stored (transformers would initialise it)"
            tensors[name] = stored
    return StreamedModel(model=skeleton, source=source, tensors=tensors), ""
