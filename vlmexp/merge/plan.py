"""The memory plan: what a merge engine will hold, and where, computed before any weight is read.

From the base's layout (its config alone: `checkpoint.model_skeleton`, names, shapes, dtypes)
and what each donor reaches (`Alignment.reach`), for the components recipes may change:

- the live model, on the merge device;
- pristine base copies of the tensors a recipe can change (subtracting an applied delta back
  is not exact in floating point, so they are kept);
- one task vector per donor for the tensors it reaches among those, in the model's own dtype
  (the kernels do their math in float32);
- while a donor is read, its largest tensor (a donor read tensor by tensor,
  `streamed.open_streamed`) or the whole donor (one transformers must open), on the host.

On a GPU, task vectors and then base copies go to the host (pinned memory, streamed to the
device tensor by tensor during an apply) when the device cannot hold them: `placement="auto"`;
"device" or "host" force it. `MergeEngine(components=..., placement=...)` holds exactly the
first three. A plan that cannot fit is a ConfigError before anything is loaded.

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

PLACEMENTS = ("auto", "device", "host")  # where task vectors and base copies live
# float32 elements of a task vector computed at a time (MergeEngine._task_vector's slabs)
SLAB_ELEMENTS = 16 << 20


def donor_reading_bytes(path: str, revision: str | None = None, *,
                        trust_remote_code: bool = False, allow_pickle: bool = False) -> int:
    """What reading a donor holds on the host beside the engine: its largest tensor and the
    float32 slabs it is subtracted in, when it is read tensor by tensor
    (`streamed.open_streamed`); else the whole donor, as transformers' loader holds it."""
    from vlmexp.streamed import open_streamed

    streamed, _ = open_streamed(path, revision, trust_remote_code=trust_remote_code,
                                allow_pickle=allow_pickle)
    if streamed is None:
        from vlmexp.checkpoint import model_skeleton

        skeleton = model_skeleton(path, revision, trust_remote_code=trust_remote_code)
        return sum(p.numel() * p.element_size() for p in skeleton.parameters())
    largest = max(streamed.tensors.values(), key=lambda t: t.nbytes, default=None)
    if largest is None:
        return 0
    numel = 1
    for dim in largest.shape:
        numel *= dim
    # the tensor as read, and three float32 slabs: donor, base, difference
    return largest.nbytes + 3 * 4 * min(numel, SLAB_ELEMENTS)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes the engine will hold, by what and where (see the module docstring)."""

    device: str
    model_bytes: int
    pristine_bytes: int
    task_vector_bytes: dict[str, int] = field(default_factory=dict)
    largest_donor_bytes: int = 0  # the most one donor holds while it is read (on the host)
    free_bytes: int | None = None  # the device's free memory the plan assumed
    vectors_on: str = "device"  # where task vectors live: "device" or "host"
    pristine_on: str = "device"  # where base copies live
    host_free_bytes: int | None = None  # the host's free memory (a GPU plan with host parts)

    @property
    def on_cpu(self) -> bool:
        return self.device.startswith("cpu")

    @property
    def held_bytes(self) -> int:
        """What the engine holds once every donor is loaded, wherever it lives."""
        return self.model_bytes + self.pristine_bytes + sum(self.task_vector_bytes.values())

    @property
    def device_bytes(self) -> int:
        """What the engine holds on the merge device."""
        return (self.model_bytes + (self.pristine_bytes if self.pristine_on == "device" else 0)
                + (sum(self.task_vector_bytes.values()) if self.vectors_on == "device" else 0))

    @property
    def host_bytes(self) -> int:
        """What a GPU engine holds on the host at its peak (its host parts, a donor being read);
        on the CPU, 0 (everything is `device_bytes` and the donor's part of `peak_bytes`)."""
        if self.on_cpu:
            return 0
        return ((self.pristine_bytes if self.pristine_on == "host" else 0)
                + (sum(self.task_vector_bytes.values()) if self.vectors_on == "host" else 0)
                + self.largest_donor_bytes)

    @property
    def peak_bytes(self) -> int:
        """The most held on the merge device at once (on a CPU-only machine the donor being
        read shares the one memory)."""
        return self.device_bytes + (self.largest_donor_bytes if self.on_cpu else 0)

    def check(self) -> None:
        """ConfigError when the plan does not fit the free memory it assumed."""
        if self.free_bytes is not None and self.peak_bytes > self.free_bytes:
            raise ConfigError(
                f"memory plan: the merge engine needs {_gb(self.peak_bytes)} on {self.device} "
                f"(model {_gb(self.model_bytes)}"
                + (f", base copies {_gb(self.pristine_bytes)}"
                   if self.pristine_on == "device" else "")
                + (f", task vectors {_gb(sum(self.task_vector_bytes.values()))}"
                   if self.vectors_on == "device" else "")
                + (f", a donor while it is read {_gb(self.largest_donor_bytes)}"
                   if self.on_cpu else "")
                + f") but {_gb(self.free_bytes)} is free; search fewer components (space.pin) "
                  f"or use a device with more memory")
        if (not self.on_cpu and self.host_free_bytes is not None
                and self.host_bytes > self.host_free_bytes):
            raise ConfigError(
                f"memory plan: the merge engine needs {_gb(self.host_bytes)} of host memory "
                f"beside {self.device} but {_gb(self.host_free_bytes)} is free")

    def describe(self) -> str:
        """The plan as a few lines of text: bytes per placement, and the free memory assumed."""
        where = {"device": self.device, "host": "host"}
        lines = [f"memory plan on {self.device}:",
                 f"  live model             {_gb(self.model_bytes):>10}  {self.device}",
                 f"  base copies            {_gb(self.pristine_bytes):>10}  "
                 f"{where[self.pristine_on]}"]
        lines += [f"  task vector {name:<10} {_gb(n):>10}  {where[self.vectors_on]}"
                  for name, n in self.task_vector_bytes.items()]
        lines.append(f"  a donor while read     {_gb(self.largest_donor_bytes):>10}  "
                     f"{'cpu' if self.on_cpu else 'host'}")
        if self.on_cpu:
            lines.append(f"  peak                   {_gb(self.peak_bytes):>10}  "
                         f"({self.peak_bytes / max(self.model_bytes, 1):.2f}× the model)")
        else:
            lines.append(f"  on {self.device:<19} {_gb(self.device_bytes):>10}")
            lines.append(f"  on the host            {_gb(self.host_bytes):>10}")
        free = "unknown" if self.free_bytes is None else _gb(self.free_bytes)
        lines.append(f"  free on {self.device:<14} {free:>10}")
        if not self.on_cpu:
            host = "unknown" if self.host_free_bytes is None else _gb(self.host_free_bytes)
            lines.append(f"  free on the host       {host:>10}")
        return "\n".join(lines)


def plan_memory(layout: Layout, reach: Mapping[str, Collection[str]],
                components: Collection[str], *, device: str,
                donor_bytes: Mapping[str, int] | None = None,
                free_bytes: int | None = None, placement: str = "auto",
                vector_dtype: torch.dtype | None = None,
                host_free_bytes: int | None = None) -> MemoryPlan:
    """The memory plan of an engine over `layout` whose recipes may change `components`.

    Args:
        layout: the base's layout (from `checkpoint.model_skeleton`: no weight read).
        reach: donor → the components its task vector reaches (`Alignment.reach`).
        components: the components recipes may change (`SearchSpace.changed_components`).
        device: the merge device ("cpu", "cuda", "cuda:1").
        donor_bytes: donor → what it holds while it is read (`streamed.reading_bytes`;
            default: the base's size).
        free_bytes: the device's free memory (default: measured now, `free_memory`).
        placement: where task vectors and base copies live on a GPU: "device", "host", or
            "auto" (the device while everything fits there, else task vectors on the host,
            then base copies too). On the CPU there is one memory, and only "auto".
        vector_dtype: the task vectors' dtype (None: each tensor's own, as the engine's default).
        host_free_bytes: the host's free memory for a GPU plan (default: measured now).
    """
    if placement not in PLACEMENTS:
        raise ConfigError(f"memory_placement: {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if device.startswith("cpu") and placement != "auto":
        raise ConfigError(f"memory_placement: {placement} cannot change anything on the CPU (one "
                          "memory holds everything); leave it auto")
    kept = [p for p in layout.params.values() if p.component in components]
    model = sum(p.nbytes for p in layout.params.values())
    vectors = {}
    for donor, reached in reach.items():
        vectors[donor] = sum(p.numel * (vector_dtype.itemsize if vector_dtype else
                                        p.nbytes // max(p.numel, 1))
                             for p in kept if p.component in reached)
    sizes = dict(donor_bytes or {})
    largest = max((sizes.get(d, model) for d in reach), default=0)
    free = free_memory(device) if free_bytes is None else free_bytes
    plan = MemoryPlan(device=device, model_bytes=model,
                      pristine_bytes=sum(p.nbytes for p in kept), task_vector_bytes=vectors,
                      largest_donor_bytes=largest, free_bytes=free)
    if plan.on_cpu:
        return plan
    host_free = free_memory("cpu") if host_free_bytes is None else host_free_bytes
    choices = {"device": [("device", "device")], "host": [("host", "host")],
               "auto": [("device", "device"), ("host", "device"), ("host", "host")]}[placement]
    for vectors_on, pristine_on in choices:
        plan = MemoryPlan(device=device, model_bytes=model, pristine_bytes=plan.pristine_bytes,
                          task_vector_bytes=vectors, largest_donor_bytes=largest, free_bytes=free,
                          vectors_on=vectors_on, pristine_on=pristine_on,
                          host_free_bytes=host_free)
        if free is None or plan.peak_bytes <= free:
            break
    return plan


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
    """Bytes in the largest binary unit that keeps them at 1 or more (GiB at most)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


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
