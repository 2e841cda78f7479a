"""Per-component fingerprints of merged weights: sums and norms that agree across devices.

The weights digest (`MergeEngine.weights_digest`) is exact, and so holds only where the merge ran
on the same kind of device in the same dtype: a GPU rounds a few entries differently (fused
multiply-adds, another summation order), and one bit changes the digest. A fingerprint is what
survives that: per component, the sum and the L2 norm of its merged parameters, accumulated in
float64, with its entry count. Two merges agree when every component's fingerprint is within a
relative tolerance (`TOLERANCE`, by the parameters' dtype).

Relative difference of a component: the larger of |Δnorm| / norm and |Δsum| / (√count · norm).
√count · norm bounds |sum| (Cauchy–Schwarz), so changing every entry by a relative ε moves
either measure by at most ε, while a sum that cancels to near zero does not make it fragile.

Example:
    >>> a = {"language": Fingerprint(total=2.0, norm=3.0, count=4)}
    >>> b = {"language": Fingerprint(total=2.0, norm=3.0 * (1 + 1e-9), count=4)}
    >>> check = compare(a, b, tolerance=1e-6)
    >>> check.agree, check.component
    (True, 'language')
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

# Relative tolerance by the dtype the merged parameters are stored in. float32: two devices'
# float32 merges differ by a rounding (about 6e-8 relative) in some entries, which moves a
# component's norm or sum by orders of magnitude less than 1e-6; a 1e-6 difference is another
# merge. bfloat16/float16: an entry whose float32 result lies near a rounding boundary lands
# on the other side on the other device and moves by a whole step (2^-8 relative for bf16),
# so the tolerance is looser; 1e-4 still refuses a 1e-3 change.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-6, torch.bfloat16: 1e-4, torch.float16: 1e-4}

_ROW = 1024  # entries summed in the tensor's float type before the float64 total
_CHUNK = 1 << 18  # half-precision entries converted to float32 at a time on the CPU


@dataclass(frozen=True)
class Fingerprint:
    """One component's merged parameters: float64 sum, L2 norm and entry count."""

    total: float
    norm: float
    count: int

    def to_text(self) -> str:
        """`sum,norm,count` with every digit (repr round-trips a float exactly)."""
        return f"{self.total!r},{self.norm!r},{self.count}"

    @classmethod
    def from_text(cls, text: str) -> Fingerprint:
        """Parse `to_text`'s form; ValueError when it is not that."""
        total, norm, count = text.split(",")
        return cls(float(total), float(norm), int(count))


@dataclass(frozen=True)
class FingerprintCheck:
    """Logged against rebuilt fingerprints: whether they agree, and the worst component."""

    agree: bool
    component: str | None  # the component with the largest difference (or the one missing)
    difference: float  # its relative difference (inf where a component or count differs)
    tolerance: float
    why: str  # one line


def tensor_moments(t: torch.Tensor) -> torch.Tensor:
    """[sum, sum of squares] of `t`'s entries as a float64 tensor on `t`'s device.

    Rows of `_ROW` entries are summed in float32 (or float64) and the row sums in float64: the
    cost of one float32 reduction (a float64 conversion of every entry is many times slower on
    the CPU), with the rows' rounding far below the tolerances. Half-precision tensors are
    converted to float32 by chunks on the CPU (whole on a GPU).
    """
    flat = t.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        if flat.device.type == "cpu" and flat.numel() > _CHUNK:
            parts = [tensor_moments(flat[lo:lo + _CHUNK].float())
                     for lo in range(0, flat.numel(), _CHUNK)]
            return torch.stack(parts).sum(0)
        flat = flat.float()
    head = flat.numel() - flat.numel() % _ROW
    rows, tail = flat[:head].view(-1, _ROW), flat[head:].double()
    total = rows.sum(1).double().sum() + tail.sum()
    squares = torch.linalg.vector_norm(rows, dim=1).double().square().sum() + tail.square().sum()
    return torch.stack([total, squares])


def fingerprints(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Fingerprint]:
    """Fingerprints of (component, tensor) pairs, grouped by component (one read-back).

    Example:
        >>> fingerprints([("head", torch.tensor([3.0, -4.0]))])
        {'head': Fingerprint(total=-1.0, norm=5.0, count=2)}
    """
    components, moments, counts = [], [], []
    for component, t in named:
        components.append(component)
        moments.append(tensor_moments(t))
        counts.append(t.numel())
    values = torch.stack(moments).cpu().tolist() if moments else []
    sums: dict[str, list[float]] = {}
    for component, (total, squares), count in zip(components, values, counts, strict=True):
        acc = sums.setdefault(component, [0.0, 0.0, 0])
        acc[0] += total
        acc[1] += squares
        acc[2] += count
    return {c: Fingerprint(total=acc[0], norm=math.sqrt(max(acc[1], 0.0)), count=int(acc[2]))
            for c, acc in sums.items()}


def tolerance_for(dtypes: Iterable[torch.dtype]) -> float:
    """The loosest `TOLERANCE` of `dtypes` (1e-6 when none is listed there)."""
    return max((TOLERANCE.get(d, 1e-6) for d in dtypes), default=1e-6)


def difference(logged: Fingerprint, rebuilt: Fingerprint) -> float:
    """Relative difference of two fingerprints (see the module's docstring); inf when the
    counts differ."""
    if logged.count != rebuilt.count:
        return math.inf
    scale = max(logged.norm, rebuilt.norm)
    if scale == 0:
        return 0.0 if logged.total == rebuilt.total else math.inf
    return max(abs(rebuilt.norm - logged.norm) / scale,
               abs(rebuilt.total - logged.total) / (math.sqrt(logged.count) * scale))


def compare(logged: Mapping[str, Fingerprint], rebuilt: Mapping[str, Fingerprint], *,
            tolerance: float) -> FingerprintCheck:
    """Whether every component of `logged` and `rebuilt` agrees within `tolerance`."""
    missing = sorted(set(logged) ^ set(rebuilt))
    if missing:
        side = "logged" if missing[0] in logged else "rebuilt"
        return FingerprintCheck(False, missing[0], math.inf, tolerance,
                                f"component {missing[0]} has a fingerprint only in the {side} "
                                f"merge")
    if not logged:
        return FingerprintCheck(False, None, math.inf, tolerance, "no fingerprints to compare")
    diffs = {c: difference(logged[c], rebuilt[c]) for c in logged}
    worst = max(diffs, key=lambda c: diffs[c])
    agree = diffs[worst] <= tolerance
    if logged[worst].count != rebuilt[worst].count:
        why = (f"component {worst} has {rebuilt[worst].count} entries, the logged merge "
               f"{logged[worst].count}")
    else:
        why = (f"largest relative difference {diffs[worst]:.1e} ({worst}), tolerance "
               f"{tolerance:.0e}")
    return FingerprintCheck(agree, worst, diffs[worst], tolerance, why)
