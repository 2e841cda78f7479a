"""The memory plan: what a merge engine will hold, and where, computed before any weight is read.

From the base's layout (its config alone: `checkpoint.model_skeleton`, names, shapes, dtypes)
and what each donor reaches (`Alignment.reach`), for the components recipes may change:

- the live model, on the merge device;
- pristine base copies of the tensors a recipe can change (subtracting an applied delta back
  is not exact in floating point, so they are kept);
- one task vector per donor for the tensors it reaches among those, in the engine's math
  dtype (float32 today);
- while a donor is opened, the whole donor (on the host).

`MergeEngine(components=...)` holds exactly the first three. A plan that cannot fit the
device's free memory is a ConfigError before anything is loaded.

Example:
    >>> plan = plan_memory(layout, reach, {"language"}, device="cpu")  # doctest: +SKIP
    >>> print(plan.describe())  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch

from vlmexp.errors import ConfigError
from vlmexp.layout import Layout

TASK_VECTOR_DTYPE = torch.float32  # what MergeEngine stores task vectors in (its math dtype)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes the engine will hold, by what and where (see the module docstring)."""

    device: str
    model_bytes: int
    pristine_bytes: int
    task_vector_bytes: dict[str, int] = field(default_factory=dict)
    largest_donor_bytes: int = 0
    free_bytes: int | None = None  # the device's free memory the plan assumed

    @property
    def held_bytes(self) -> int:
        """What the engine holds once every donor is loaded."""
        return self.model_bytes + self.pristine_bytes + sum(self.task_vector_bytes.values())

    @property
    def peak_bytes(self) -> int:
        """The most held at once: the last donor open beside everything else (on a CPU-only
        machine the donor shares the one memory)."""
        return self.held_bytes + (self.largest_donor_bytes if self.device.startswith("cpu")
                                  else 0)

    def check(self) -> None:
        """ConfigError when the plan does not fit the free memory it assumed."""
        if self.free_bytes is not None and self.peak_bytes > self.free_bytes:
            raise ConfigError(
                f"memory plan: the merge engine needs {_gb(self.peak_bytes)} on {self.device} "
                f"(model {_gb(self.model_bytes)}, base copies {_gb(self.pristine_bytes)}, task "
                f"vectors {_gb(sum(self.task_vector_bytes.values()))}"
                + (f", a donor while it loads {_gb(self.largest_donor_bytes)}"
                   if self.device.startswith("cpu") else "")
                + f") but {_gb(self.free_bytes)} is free; search fewer components (space.pin) "
                  f"or use a device with more memory")

    def describe(self) -> str:
        """The plan as a few lines of text."""
        lines = [f"memory plan on {self.device}:",
                 f"  live model             {_gb(self.model_bytes):>10}",
                 f"  base copies            {_gb(self.pristine_bytes):>10}"]
        lines += [f"  task vector {name:<10} {_gb(n):>10}"
                  for name, n in self.task_vector_bytes.items()]
        lines.append(f"  held                   {_gb(self.held_bytes):>10}  "
                     f"({self.held_bytes / max(self.model_bytes, 1):.2f}× the model)")
        if self.device.startswith("cpu"):
            lines.append(f"  peak (a donor loading) {_gb(self.peak_bytes):>10}  "
                         f"({self.peak_bytes / max(self.model_bytes, 1):.2f}× the model)")
        free = "unknown" if self.free_bytes is None else _gb(self.free_bytes)
        lines.append(f"  free on {self.device:<14} {free:>10}")
        return "\n".join(lines)


def plan_memory(layout: Layout, reach: Mapping[str, Collection[str]],
                components: Collection[str], *, device: str,
                donor_bytes: Mapping[str, int] | None = None,
                free_bytes: int | None = None) -> MemoryPlan:
    """The memory plan of an engine over `layout` whose recipes may change `components`.

    Args:
        layout: the base's layout (from `checkpoint.model_skeleton`: no weight read).
        reach: donor → the components its task vector reaches (`Alignment.reach`).
        components: the components recipes may change (`SearchSpace.changed_components`).
        device: the merge device ("cpu", "cuda", "cuda:1").
        donor_bytes: donor → its whole size (default: the base's size).
        free_bytes: the device's free memory (default: measured now, `free_memory`).
    """
    kept = [p for p in layout.params.values() if p.component in components]
    model = sum(p.nbytes for p in layout.params.values())
    vectors = {}
    for donor, reached in reach.items():
        vectors[donor] = sum(p.numel * TASK_VECTOR_DTYPE.itemsize for p in kept
                             if p.component in reached)
    sizes = dict(donor_bytes or {})
    largest = max((sizes.get(d, model) for d in reach), default=0)
    return MemoryPlan(device=device, model_bytes=model, pristine_bytes=sum(p.nbytes for p in kept),
                      task_vector_bytes=vectors, largest_donor_bytes=largest,
                      free_bytes=free_memory(device) if free_bytes is None else free_bytes)


def free_memory(device: str) -> int | None:
    """The device's free memory in bytes now (CUDA: the driver's count; CPU: MemAvailable)."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str | int) -> int:
    """`"20GiB"`, `"80GB"`, `"1.5 TiB"` or a plain number of bytes.

    Example:
        >>> parse_bytes("1.5GiB"), parse_bytes(1024)
        (1610612736, 1024)
    """
    if isinstance(text, int):
        return text
    raw = str(text).strip().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = raw[len(number):].upper()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value < 0:
        raise ConfigError(f"memory_budget: {text!r} is not a size (e.g. 20GiB, 80GB, 1024)")
    return int(value * _UNITS[unit])
