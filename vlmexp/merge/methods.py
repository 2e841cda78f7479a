"""Pure per-tensor merge math: tensors in, tensor out, one function per method family.

Every method is declared once, as data, in `_SPECS` (turned into `METHODS`, name → spec): its
input kind, its per-donor and method-level parameters with defaults and ranges (read by the
recipe validator), its donor-count bounds, and its paper. Names, parameters and defaults follow
mergekit 0.1.5, so that a recipe exports to a mergekit YAML that mergekit runs to the same
tensors (within float32 rounding); the docstrings say where vlmexp deliberately differs.

Input kinds: "deltas" methods receive task vectors (donor − base), "weights" methods full donor
weights. The base is always passed. Functions never modify their inputs; they compute in the
dtype they are given (`merge_tensor` converts) and return a fresh tensor. The methods with fused
CPU kernels (`MethodSpec.fused`) take the math dtype as `dtype` and may get their inputs, and
`out`, stored narrower (bfloat16, float16): the kernels read and write those as they are, with
float32 math inside; any other path converts them first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from vlmexp.errors import MergeError
from vlmexp.merge import kernels
from vlmexp.merge import sparsify as sp


@dataclass(frozen=True)
class ParamDef:
    """A method parameter: name, default (None = required), inclusive range, kind, one-line doc."""

    name: str
    default: float | bool | str | None
    low: float | None = None
    high: float | None = None
    kind: str = "float"  # "float" | "bool" | "int" | "str"
    doc: str = ""
    choices: tuple[str, ...] = ()  # allowed values of a "str" parameter


@dataclass(frozen=True)
class MethodSpec:
    """A merge method as data: what it takes, what it needs, where it comes from, its function."""

    name: str
    inputs: str  # "deltas" (donor − base) or "weights" (full donor weights)
    donor_params: tuple[ParamDef, ...]
    method_params: tuple[ParamDef, ...]
    min_donors: int
    max_donors: int | None
    random: bool  # draws from a sparsify.CounterStream (DARE, DELLA)
    mergekit: str | None
    paper: str
    fn: Callable[..., torch.Tensor]
    consensus: str | None = None  # task-arithmetic family: "sum" | "count" sign election
    sparsification: str | None = None  # task-arithmetic family: a name from sparsify.SPARSIFIERS
    # one fused pass on the CPU (vlmexp/merge/kernels.py), which reads and writes bfloat16 and
    # float16 as stored: the function takes `dtype` (the math dtype) and inputs stored narrower
    fused: bool = False


DonorParams = Mapping[str, Any]
Params = Mapping[str, Any]


# --------------------------------------------------------------------------- task arithmetic


def task_arithmetic(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    donor_params: Sequence[DonorParams],
    params: Params,
    *,
    consensus: str | None = None,
    sparsification: str | None = None,
    stream: sp.CounterStream | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
    out: torch.Tensor | None = None,
    checks: dict[str, Any] | None = None,
    batch: kernels.Queue | None = None,
    dtype: torch.dtype | None = None,
    **_: Any,
) -> torch.Tensor:
    """base + lambda · Σ w_i · sparsify(δ_i) [· sign-consensus mask] [/ normalizer].

    Covers task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della and
    della_linear (mergekit's GeneralizedTaskArithmeticMerge). With a consensus ("sum": sign of
    Σ w_i δ_i, TIES; "count": majority of signs) only entries agreeing with the elected sign are
    summed, and `normalize` divides each entry by the sum of the weights that took part (a zero
    sum counts as 1). Without consensus `normalize` divides by Σ w_i (|Σ w_i| < 1e-8 counts as 1).
    `masks[i]`, when given, replaces donor i's sparsification mask (True = keep); otherwise a
    random sparsifier draws donor i's from `stream.child(i)` (a fresh stream if None). `int8_mask`
    is accepted for mergekit compatibility and changes nothing (a memory option there).
    `dtype`: the math dtype (None: base's); see the module docstring for narrower inputs.
    """
    dtype = dtype or base.dtype
    weights = [float(p["weight"]) for p in donor_params]
    lam = float(params["lambda"])
    if sparsification is None and consensus is None:
        # One pass per donor: base + Σ (lambda·w_i / divisor)·δ_i, folded into the coefficients.
        divisor = sum(weights) if params["normalize"] else 1.0
        scale = lam / (divisor if abs(divisor) >= 1e-8 else 1.0)
        return _weighted_sum(base, 1.0, deltas, [w * scale for w in weights], out=out,
                             checks=checks, batch=batch, dtype=dtype)
    kept = [
        _KeptDelta.of(delta, p, params, sparsification,
                      stream.child(i) if stream is not None else None,
                      masks[i] if masks else None, dtype)
        for i, (delta, p) in enumerate(zip(deltas, donor_params, strict=True))
    ]
    if out is None:
        out = torch.empty_like(base, dtype=dtype)
    if (kernels.available([out, base, *deltas], dtype)
            and not isinstance(batch, kernels.ForeachQueue)
            and all(k.per_entry is None for k in kept)):
        # one fused pass instead of a dozen elementwise ones (see vlmexp/merge/kernels.py),
        # now or queued in `batch`; it counts the NaN and inf values it writes
        queue = batch if batch is not None else kernels.Queue()
        queue.sign_merge(out, base, [k.delta for k in kept], [k.mask for k in kept],
                         [k.scale for k in kept], weights, lam=lam,
                         normalize=bool(params["normalize"]), consensus=consensus)
        if batch is None:
            _run_now(queue, checks)
        return out
    # the torch path, in the math dtype (a result for a narrower `out` is cast by merge_tensor)
    base = base.to(dtype)
    kept = [replace(k, delta=k.delta.to(dtype)) for k in kept]
    if out.dtype != dtype:
        out = torch.empty_like(base)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    # Elementwise from here on: on the CPU, work in cache-sized chunks, so that the few
    # temporaries stay in cache and no tensor-sized buffer is allocated (and page-faulted) per
    # merge; on a GPU, one chunk (per-chunk kernel launches would cost more than the math).
    step = _CHUNK if out.device.type == "cpu" else max(flat_out.numel(), 1)
    for lo in range(0, flat_out.numel(), step):
        hi = min(lo + step, flat_out.numel())
        weighted = [k.chunk(lo, hi).mul_(w) for k, w in zip(kept, weights, strict=True)]
        if consensus is None:
            mixed = weighted[0]
            for part in weighted[1:]:
                mixed.add_(part)
            if params["normalize"]:
                divisor = sum(weights)
                if abs(divisor) >= 1e-8:
                    mixed.div_(divisor)
        else:
            mixed, divisor = _elect(weighted, weights, consensus)
            if params["normalize"]:
                mixed.div_(divisor.add_(divisor == 0))  # a zero divisor counts as 1
        torch.add(flat_base[lo:hi], mixed, alpha=lam, out=flat_out[lo:hi])
    return out


_CHUNK = 1 << 18  # elements per chunk of the elementwise part (1 MiB of float32)


@dataclass
class _KeptDelta:
    """A donor's task vector after sparsification: delta · mask · rescale, read by chunks."""

    delta: torch.Tensor  # flat
    mask: torch.Tensor | None  # flat bool, None = keep all
    scale: float  # scalar rescale (mergekit's L1 ratio, or 1/density)
    per_entry: torch.Tensor | None  # flat keep probabilities to divide by (DELLA, paper mode)

    @classmethod
    def of(cls, delta: torch.Tensor, p: DonorParams, params: Params, sparsification: str | None,
           stream: sp.CounterStream | None, mask: torch.Tensor | None,
           dtype: torch.dtype | None = None) -> _KeptDelta:
        """`delta` as stored; its mask and rescale are computed from its values in `dtype`
        (the math dtype; None: its own), so that a narrower stored delta changes neither."""
        stored = delta.reshape(-1)
        density = float(p.get("density", 1.0))
        if sparsification is None or density >= 1:
            return cls(stored, None, 1.0, None)
        if mask is not None and not params["rescale"]:
            # a cached mask, no rescale: nothing reads the values (a bf16 delta's float32
            # copy cost TIES two-thirds of its apply)
            return cls(stored, mask.reshape(-1), 1.0, None)
        delta = delta.to(dtype or delta.dtype)
        flat = delta.reshape(-1)
        if mask is None:
            mask = sp.sparsify_mask(sparsification, delta, density=density,
                                    gamma=float(p.get("gamma", 0.01)),
                                    epsilon=float(p.get("epsilon", 0.15)), stream=stream)
        if mask is None:
            return cls(stored, None, 1.0, None)
        mask = mask.reshape(-1)
        scale, per_entry = 1.0, None
        if params["rescale"]:
            mode = str(params["rescale_mode"])
            if mode == "mergekit":
                before = float(flat.abs().sum())
                after = float(torch.where(mask, flat.abs(), 0).sum())
                if before >= 1e-7 and after >= 1e-7:
                    scale = before / after
            elif mode == "paper":
                if sparsification == sp.RANK_MAGNITUDE_SAMPLING:
                    per_entry = sp.rank_magnitude_keep_probs(
                        delta, density, float(p.get("epsilon", 0.15))).reshape(-1).to(flat.dtype)
                elif density > 0:
                    scale = 1 / density
            else:
                raise MergeError(f"unknown rescale_mode {mode!r}; known: "
                                 f"{', '.join(sp.RESCALE_MODES)}")
        return cls(stored, mask, scale, per_entry)

    def chunk(self, lo: int, hi: int) -> torch.Tensor:
        """A fresh tensor: this donor's kept, rescaled delta on [lo, hi)."""
        part = self.delta[lo:hi]
        part = part * self.mask[lo:hi] if self.mask is not None else part.clone()
        if self.scale != 1.0:
            part.mul_(self.scale)
        if self.per_entry is not None:
            part.div_(self.per_entry[lo:hi])
        return part


def _elect(weighted: list[torch.Tensor], weights: list[float],
           consensus: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign election over weighted deltas: (Σ of the agreeing entries, Σ of their weights).

    The elected sign is that of Σ w_i δ_i ("sum", TIES) or of Σ sign(w_i δ_i) ("count"), +1
    where that is 0; an entry agrees when its sign equals the elected one (zeros never agree).
    """
    if consensus == "sum":
        total = torch.stack(weighted).sum(dim=0)
    elif consensus == "count":
        total = torch.stack([w.sign() for w in weighted]).sum(dim=0)
    else:
        raise MergeError(f"unknown consensus {consensus!r}; known: sum, count")
    # (plain arithmetic on bool tensors: torch.where with scalars is far slower on CPU)
    elected = (total >= 0).to(total.dtype).mul_(2).sub_(1)
    mixed = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for part, w in zip(weighted, weights, strict=True):
        agree = part.sign() == elected
        mixed.add_(part.mul_(agree))
        divisor.add_(agree.to(total.dtype), alpha=w)
    return mixed, divisor


# --------------------------------------------------------------------------- linear


def linear(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    donor_params: Sequence[DonorParams],
    params: Params,
    out: torch.Tensor | None = None,
    checks: dict[str, Any] | None = None,
    batch: kernels.Queue | None = None,
    dtype: torch.dtype | None = None,
    **_: Any,
) -> torch.Tensor:
    """Weighted average of the base (weight `base_weight`) and the donors (weights w_i).

    Computed on task vectors: with S = base_weight + Σ w_i, the normalized average
    (base_weight·base + Σ w_i·donor_i) / S equals base + Σ w_i δ_i / S, and the unnormalized
    sum equals S·base + Σ w_i δ_i. In mergekit terms the base is one more listed model whose
    weight is `base_weight` (0 by default: mergekit then averages only the listed donors).
    A normalized average whose weights sum to 0 is an error (mergekit divides by zero).
    `dtype`: the math dtype (None: base's); see the module docstring for narrower inputs.
    """
    weights = [float(p["weight"]) for p in donor_params]
    total = float(params["base_weight"]) + sum(weights)
    if not params["normalize"]:
        return _weighted_sum(base, total, deltas, weights, out=out, checks=checks,
                             batch=batch, dtype=dtype)
    if total == 0:
        raise MergeError("linear: the weights (base_weight included) sum to 0")
    return _weighted_sum(base, 1.0, deltas, [w / total for w in weights], out=out,
                         checks=checks, batch=batch, dtype=dtype)


def _weighted_sum(
    base: torch.Tensor, base_coef: float, deltas: Sequence[torch.Tensor], coefs: Sequence[float],
    out: torch.Tensor | None = None, checks: dict[str, Any] | None = None,
    batch: kernels.Queue | None = None, dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """base_coef·base + Σ coefs_i·δ_i in the math dtype `dtype` (None: base's), into `out` (or
    a fresh tensor of `dtype`).

    On the CPU (float32 math, numba) one fused pass that reads the inputs and writes `out` as
    stored (float32, bfloat16, float16) and counts the NaN and inf values written (see
    `_run_now`), or only queued in `batch` (out is written, and counted, by batch.run());
    elsewhere one torch pass per term, in `dtype` (a result for a narrower `out` is then a
    fresh tensor, which merge_tensor casts). Same bits either way.
    """
    dtype = dtype or base.dtype
    if out is None:
        out = torch.empty_like(base, dtype=dtype)
    if kernels.available([out, base, *deltas], dtype, batch):
        queue = batch if batch is not None else kernels.Queue()
        queue.weighted_sum(out, base, base_coef, deltas, coefs)
        if batch is None:
            _run_now(queue, checks)
        return out
    base, deltas = base.to(dtype), [d.to(dtype) for d in deltas]
    if out.dtype != dtype:
        out = torch.empty_like(base)
    if base_coef == 1:
        out = torch.add(base, deltas[0], alpha=coefs[0], out=out)
    else:
        out = torch.mul(base, base_coef, out=out).add_(deltas[0], alpha=coefs[0])
    for delta, coef in zip(deltas[1:], coefs[1:], strict=True):
        out.add_(delta, alpha=coef)
    return out


def _run_now(queue: kernels.Queue, checks: dict[str, Any] | None) -> None:
    """Run a queue of one fused merge; record in `checks` how many values it wrote are NaN or
    inf ("non_finite") and, for a narrower `out` with some, its float32 result ("unrounded")."""
    (bad,) = queue.run()
    if checks is not None:
        checks["non_finite"] = bad
        if 0 in queue.unrounded:
            checks["unrounded"] = queue.unrounded[0]


# --------------------------------------------------------------------------- slerp


def slerp(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    donor_params: Sequence[DonorParams],
    params: Params,
    out: torch.Tensor | None = None,
    memo: dict[str, Any] | None = None,
    checks: dict[str, Any] | None = None,
    batch: kernels.Queue | None = None,
    dtype: torch.dtype | None = None,
    **_: Any,
) -> torch.Tensor:
    """Spherical interpolation from the base (t = 0) to the one donor (t = 1), whole tensor.

    As mergekit: the angle is that of the flattened tensors; norms below `epsilon` count as 1;
    when |cos| > `dot_threshold` (near-collinear) it falls back to linear interpolation.
    Computed from the task vector δ: with b·b, b·δ and δ·δ (memoised in `memo`, since they do
    not depend on t) the donor's norm and the angle need no pass over the weights, and the
    result c0·b + c1·(b + δ) = (c0 + c1)·b + c1·δ is a weighted sum, like task arithmetic.
    `dtype`: the math dtype (None: base's); see the module docstring for narrower inputs.
    """
    dtype = dtype or base.dtype
    t = float(donor_params[0]["t"])
    delta = deltas[0]
    if base.numel() == 0:
        return torch.add(base.to(dtype), delta.to(dtype), alpha=t)
    stats = memo.get("slerp") if memo is not None else None
    if stats is None:
        b, d = base.reshape(-1).to(dtype), delta.reshape(-1).to(dtype)
        stats = (float(torch.dot(b, b)), float(torch.dot(b, d)), float(torch.dot(d, d)))
        if memo is not None:
            memo["slerp"] = stats
    bb, bd, dd = stats
    eps = float(params["epsilon"])
    norm0 = math.sqrt(max(bb, 0.0))
    norm1 = math.sqrt(max(bb + 2 * bd + dd, 0.0))
    norm0 = norm0 if norm0 > eps else 1.0
    norm1 = norm1 if norm1 > eps else 1.0
    dot = min(1.0, max(-1.0, (bb + bd) / (norm0 * norm1)))
    if abs(dot) > float(params["dot_threshold"]):
        coef0, coef1 = 1 - t, t
    else:
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        coef0 = math.sin((1 - t) * theta) / sin_theta
        coef1 = math.sin(t * theta) / sin_theta
    return _weighted_sum(base, coef0 + coef1, [delta], [coef1], out=out, checks=checks,
                         batch=batch, dtype=dtype)


# --------------------------------------------------------------------------- nuslerp


def nuslerp(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    donor_params: Sequence[DonorParams],
    params: Params,
    **_: Any,
) -> torch.Tensor:
    """mergekit's NuSLERP: slerp between two donors at t = w_1 / (w_0 + w_1) (0.5 if the sum ≈ 0).

    With `use_base` (default) it interpolates the task vectors and adds the base (mergekit with a
    base_model); without, it interpolates the full donor weights (base + δ_i; mergekit without a
    base_model). `nuslerp_flatten` (default) takes one angle over the whole tensor; otherwise one
    per row (`nuslerp_row_wise`: one per column, i.e. along dim 0). Exactly collinear pairs
    interpolate linearly.
    """
    w0, w1 = (float(p["weight"]) for p in donor_params)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    use_base = bool(params["use_base"])
    v0, v1 = (deltas[0], deltas[1]) if use_base else (base + deltas[0], base + deltas[1])
    shape = v0.shape
    if params["nuslerp_flatten"]:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    elif params["nuslerp_row_wise"]:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    norm0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp_(min=1e-7)
    norm1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp_(min=1e-7)
    cos = ((v0 * v1).sum(dim=-1, keepdim=True) / (norm0 * norm1)).clamp_(-1, 1)
    collinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(collinear, 0, cos))
    sin_theta = torch.sin(theta)
    coef0 = torch.where(collinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef1 = torch.where(collinear, t, torch.sin(t * theta) / sin_theta)
    result = (v0 * coef0).add_(v1 * coef1)
    if not params["nuslerp_flatten"] and params["nuslerp_row_wise"]:
        result = result.transpose(0, -1)
    result = result.reshape(shape)
    return result.add_(base) if use_base else result


# --------------------------------------------------------------------------- model stock


def model_stock(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    donor_params: Sequence[DonorParams],
    params: Params,
    **_: Any,
) -> torch.Tensor:
    """Model Stock: base + t · mean(δ_i), t = N·cosθ / (1 + (N − 1)·cosθ).

    cosθ is the mean pairwise cosine between task vectors: over the whole tensor, or with
    `filter_wise` one per vector along the last dimension (a 1-D tensor is one vector), as
    mergekit. Where the denominator is ≈ 0 (|·| < 1e-6) t = 0 and the base is kept, as mergekit.
    mergekit writes it as t·mean(donors) + (1 − t)·base: the same value.
    """
    count = len(deltas)
    shape = base.shape
    if params["filter_wise"]:
        rows = [d.reshape(1, -1) if d.dim() < 2 else d for d in deltas]
    else:
        rows = [d.reshape(1, -1) for d in deltas]
    norms = [torch.linalg.vector_norm(r, dim=-1) for r in rows]
    cosines = [
        ((rows[i] * rows[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
        for i in range(count)
        for j in range(i + 1, count)
    ]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0, count * cos / torch.where(singular, 1, denominator))
    mean = torch.stack(rows).sum(dim=0).div_(count)
    return mean.mul_(t).reshape(shape).add_(base)


# --------------------------------------------------------------------------- karcher


def karcher(
    base: torch.Tensor,
    donors: Sequence[torch.Tensor],
    donor_params: Sequence[DonorParams],
    params: Params,
    **_: Any,
) -> torch.Tensor:
    """Karcher (Riemannian) mean of the weights on the unit sphere, scaled by their mean norm.

    As mergekit: equal weights; each tensor is a point on the sphere (tensor / ‖tensor‖); the
    mean starts at the normalized average and takes up to `max_iter` tangent steps, stopping when
    the step is below `tol`; tensors of norm ≤ `tol` leave the direction alone. With `use_base`
    (default) the base is one more point, listed last (mergekit with base_model set; without
    base_model mergekit averages the donors only).
    """
    points = list(donors) + ([base] if params["use_base"] else [])
    if len(points) == 1:
        return points[0].clone()
    max_iter, tol = int(params["max_iter"]), float(params["tol"])
    alpha = 1.0 / len(points)
    norms = [float(torch.linalg.vector_norm(p)) for p in points]
    valid = [(p / n).reshape(-1) for p, n in zip(points, norms, strict=True) if n > tol]
    if not valid:
        return torch.zeros_like(base)
    share = 1.0 / len(valid)
    mean = torch.zeros_like(valid[0])
    for unit in valid:
        mean.add_(unit, alpha=share)
    mean_norm = float(torch.linalg.vector_norm(mean))
    mean = valid[0].clone() if mean_norm < tol else mean.div_(mean_norm)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for unit in valid:
            dot = min(1.0, max(-1.0, float(torch.dot(mean, unit))))
            theta = torch.arccos(torch.tensor(dot, dtype=mean.dtype))
            if float(theta) < tol:
                continue
            scale = float(share * theta / torch.sin(theta))
            tangent.add_(unit, alpha=scale).add_(mean, alpha=-scale * dot)
        step = float(torch.linalg.vector_norm(tangent))
        if step < tol:
            break
        mean = torch.mul(mean, torch.cos(torch.tensor(step)).item()).add_(
            tangent, alpha=torch.sin(torch.tensor(step)).item() / step
        )
        unit_norm = float(torch.linalg.vector_norm(mean))
        if unit_norm > tol:
            mean.div_(unit_norm)
    return mean.mul_(sum(alpha * n for n in norms)).reshape(base.shape)


# --------------------------------------------------------------------------- registry

_WEIGHT = ParamDef("weight", None, doc="donor's weight in the sum")
_DENSITY = ParamDef("density", 1.0, 0.0, 1.0, doc="fraction of the task vector kept")
_GAMMA = ParamDef("gamma", 0.01, 0.0, 1.0, doc="fraction of largest-magnitude entries dropped")
_EPSILON = ParamDef("epsilon", 0.15, 0.0, 1.0, doc="spread of keep probabilities over ranks")
_LAMBDA = ParamDef("lambda", 1.0, doc="scale of the merged task vector")
_INT8_MASK = ParamDef("int8_mask", False, kind="bool", doc="mergekit memory option; no effect")
_RESCALE_MODE = ParamDef(
    "rescale_mode",
    "mergekit",
    kind="str",
    choices=sp.RESCALE_MODES,
    doc="'mergekit': L1-norm ratio over the tensor; 'paper': kept entries / keep probability",
)


def _normalize(default: bool) -> ParamDef:
    return ParamDef("normalize", default, kind="bool", doc="divide by the sum of the weights")


def _rescale(default: bool) -> ParamDef:
    return ParamDef("rescale", default, kind="bool", doc="rescale kept entries after sparsifying")


def _task_arithmetic_spec(
    name: str,
    paper: str,
    *,
    consensus: str | None,
    sparsification: str | None,
    normalize: bool,
    rescale: bool,
) -> MethodSpec:
    donor: tuple[ParamDef, ...] = (_WEIGHT, _DENSITY)
    if sparsification == sp.MAGNITUDE_OUTLIERS:
        donor += (_GAMMA,)
    if sparsification == sp.RANK_MAGNITUDE_SAMPLING:
        donor += (_EPSILON,)
    return MethodSpec(
        name=name,
        inputs="deltas",
        donor_params=donor,
        method_params=(
            _normalize(normalize),
            _LAMBDA,
            _rescale(rescale),
            _RESCALE_MODE,
            _INT8_MASK,
        ),
        min_donors=1,
        max_donors=None,
        random=sparsification in (sp.RANDOM, sp.RANK_MAGNITUDE_SAMPLING),
        mergekit=name,
        paper=paper,
        fn=partial(task_arithmetic, consensus=consensus, sparsification=sparsification),
        consensus=consensus,
        sparsification=sparsification,
        fused=True,
    )


_TASK_ARITHMETIC = "https://arxiv.org/abs/2212.04089"
_TIES = "https://arxiv.org/abs/2306.01708"
_DARE = "https://arxiv.org/abs/2311.03099"
_BREADCRUMBS = "https://arxiv.org/abs/2312.06795"
_DELLA = "https://arxiv.org/abs/2406.11617"

_SPECS: list[MethodSpec] = [
    MethodSpec(
        name="linear",
        inputs="deltas",
        donor_params=(_WEIGHT,),
        method_params=(
            _normalize(True),
            ParamDef("base_weight", 0.0, doc="the base's weight in the average"),
        ),
        min_donors=1,
        max_donors=None,
        random=False,
        mergekit="linear",
        paper="https://arxiv.org/abs/2203.05482",
        fn=linear,
        fused=True,
    ),
    _task_arithmetic_spec(
        "task_arithmetic", _TASK_ARITHMETIC, consensus=None, sparsification=None,
        normalize=False, rescale=False,
    ),
    _task_arithmetic_spec(
        "ties", _TIES, consensus="sum", sparsification=sp.MAGNITUDE,
        normalize=True, rescale=False,
    ),
    _task_arithmetic_spec(
        "dare_ties", _DARE, consensus="sum", sparsification=sp.RANDOM,
        normalize=False, rescale=True,
    ),
    _task_arithmetic_spec(
        "dare_linear", _DARE, consensus=None, sparsification=sp.RANDOM,
        normalize=False, rescale=True,
    ),
    _task_arithmetic_spec(
        "breadcrumbs", _BREADCRUMBS, consensus=None, sparsification=sp.MAGNITUDE_OUTLIERS,
        normalize=False, rescale=False,
    ),
    _task_arithmetic_spec(
        "breadcrumbs_ties", _BREADCRUMBS, consensus="sum", sparsification=sp.MAGNITUDE_OUTLIERS,
        normalize=False, rescale=False,
    ),
    _task_arithmetic_spec(
        "della", _DELLA, consensus="sum", sparsification=sp.RANK_MAGNITUDE_SAMPLING,
        normalize=True, rescale=True,
    ),
    _task_arithmetic_spec(
        "della_linear", _DELLA, consensus=None, sparsification=sp.RANK_MAGNITUDE_SAMPLING,
        normalize=False, rescale=True,
    ),
    MethodSpec(
        name="slerp",
        inputs="deltas",
        donor_params=(ParamDef("t", None, 0.0, 1.0, doc="0 = base, 1 = donor"),),
        method_params=(
            ParamDef("dot_threshold", 0.9995, 0.0, 1.0, doc="above: linear interpolation"),
            ParamDef("epsilon", 1e-8, 0.0, doc="norms below count as 1"),
        ),
        min_donors=1,
        max_donors=1,
        random=False,
        mergekit="slerp",
        paper="https://doi.org/10.1145/325165.325242",
        fn=slerp,
        fused=True,
    ),
    MethodSpec(
        name="nuslerp",
        inputs="deltas",
        donor_params=(_WEIGHT,),
        method_params=(
            ParamDef("nuslerp_flatten", True, kind="bool", doc="one angle for the whole tensor"),
            ParamDef("nuslerp_row_wise", False, kind="bool", doc="angles along dim 0"),
            ParamDef("use_base", True, kind="bool", doc="interpolate task vectors, not weights"),
        ),
        min_donors=2,
        max_donors=2,
        random=False,
        mergekit="nuslerp",
        paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
        fn=nuslerp,
    ),
    MethodSpec(
        name="model_stock",
        inputs="deltas",
        donor_params=(),
        method_params=(
            ParamDef("filter_wise", False, kind="bool", doc="one ratio per output row"),
        ),
        min_donors=2,
        max_donors=None,
        random=False,
        mergekit="model_stock",
        paper="https://arxiv.org/abs/2403.19522",
        fn=model_stock,
    ),
    MethodSpec(
        name="karcher",
        inputs="weights",
        donor_params=(),
        method_params=(
            ParamDef("max_iter", 10, 1, kind="int", doc="most tangent steps"),
            ParamDef("tol", 1e-5, 0.0, doc="convergence and zero-norm tolerance"),
            ParamDef("use_base", True, kind="bool", doc="the base is one more point"),
        ),
        min_donors=1,
        max_donors=None,
        random=False,
        mergekit="karcher",
        paper="https://arxiv.org/abs/2603.04972",
        fn=karcher,
    ),
]

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}


# --------------------------------------------------------------------------- entry points


def get_spec(method: str) -> MethodSpec:
    """The spec of `method`, or a MergeError naming the known methods."""
    try:
        return METHODS[method]
    except KeyError:
        raise MergeError(
            f"unknown merge method {method!r}; known: {', '.join(METHODS)}"
        ) from None


def _resolve(defs: Sequence[ParamDef], given: Mapping[str, Any], where: str) -> dict[str, Any]:
    known = {d.name for d in defs}
    unknown = sorted(set(given) - known)
    if unknown:
        raise MergeError(f"{where}: unknown parameter(s) {', '.join(unknown)}")
    resolved = {}
    for d in defs:
        value = given.get(d.name, d.default)
        if value is None:
            raise MergeError(f"{where}: missing required parameter {d.name!r}")
        resolved[d.name] = value
    return resolved


def resolve_donor_params(method: str, donor_params: Mapping[str, Any]) -> dict[str, Any]:
    """One donor's parameters with defaults filled; MergeError on unknown or missing ones."""
    spec = get_spec(method)
    return _resolve(spec.donor_params, donor_params, f"{method} donor")


def resolve_params(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Method-level parameters with defaults filled; MergeError on unknown or missing ones."""
    spec = get_spec(method)
    return _resolve(spec.method_params, params, method)


def mask_is_deterministic(method: str) -> bool:
    """Whether `sparsify_mask(method, ...)` depends only on the delta and the parameters.

    True for methods without sparsification (the mask is None) and for magnitude-based ones
    (ties, breadcrumbs, breadcrumbs_ties). False for DARE and DELLA, whose masks also depend on
    the stream they draw from (the engine keys it by seed, tensor and donor, and caches them so).
    """
    spec = get_spec(method)
    return spec.sparsification is None or spec.sparsification in sp.DETERMINISTIC


def sparsify_mask(
    method: str,
    delta: torch.Tensor,
    donor_params: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
    stream: sp.CounterStream | None = None,
    ranking: sp.MagnitudeHistogram | torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Donor's boolean keep-mask (True = keep) for `method`, or None where nothing is dropped.

    `donor_params` are that donor's parameters for this tensor (defaults filled here). `params`
    is accepted for symmetry with `merge_tensor`; no sparsifier reads method-level parameters.
    `stream`: DARE's and DELLA's random numbers (a fresh stream if None). `ranking`: the
    density-independent part kept by the caller (`mask_ranking`), computed here if None.
    """
    spec = get_spec(method)
    if spec.sparsification is None:
        return None
    p = resolve_donor_params(method, donor_params)
    return sp.sparsify_mask(
        spec.sparsification,
        delta,
        density=float(p["density"]),
        gamma=float(p.get("gamma", 0.01)),
        epsilon=float(p.get("epsilon", 0.15)),
        stream=stream,
        ranking=ranking,
    )


def mask_ranking(method: str, delta: torch.Tensor) -> sp.MagnitudeHistogram | torch.Tensor | None:
    """What `method`'s masks need of `delta` whatever the density (see `sparsify.ranking`):
    compute it once per task vector and pass it to `sparsify_mask` for every density."""
    spec = get_spec(method)
    return sp.ranking(spec.sparsification, delta) if spec.sparsification else None


def merge_tensor(
    method: str,
    base: torch.Tensor,
    donors: Sequence[torch.Tensor],
    donor_params: Sequence[Mapping[str, float]],
    params: Mapping[str, Any],
    *,
    stream: sp.CounterStream | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    memo: dict[str, Any] | None = None,
    check_finite: bool = False,
    batch: kernels.Queue | None = None,
) -> torch.Tensor:
    """Merge one tensor: `method` over the base and the donors, in `dtype`, cast to base's dtype.

    Args:
        method: a key of `METHODS`.
        base: the base's tensor.
        donors: task vectors (donor − base) when `METHODS[method].inputs == "deltas"`, else the
            donors' full weights.
        donor_params: per donor, its resolved parameters for this tensor (defaults filled here).
        params: method-level parameters (defaults filled here).
        stream: the random numbers of DARE and DELLA: donor i draws from `stream.child(i)`
            (a fresh stream, from torch's global generator, if None).
        masks: optional precomputed keep-masks per donor (see `sparsify_mask`); None entries
            are computed here.
        dtype: the math dtype. In float32, the fused CPU kernels read base and donors and
            write `out` in their own dtypes (bfloat16, float16 too): float32 math inside, the
            result rounded to `out`'s dtype, the same bits as a float32 merge cast to it.
        out: where to write the result (base's shape; must not alias an input). Methods that
            can accumulate straight into it do (saving a pass over memory); the others copy.
        memo: a dict kept by the caller per (tensor, donors): methods memoise statistics there
            that depend only on the inputs, not on the parameters (slerp's norms and dot).
        check_finite: raise MergeError when the result has a NaN or an inf: counted by the
            fused CPU kernels in the pass that writes the result, else one vectorised sum (the
            elementwise test runs only when that sum is not finite).
        batch: where the fused CPU merges into `out` (weighted sums: task arithmetic, linear,
            slerp; sign merges: TIES and relatives) are queued rather than computed: `out` holds the result, and its NaN/inf count is
            known, only after `batch.run()` (so check_finite leaves a queued result to it).
            The engine queues a whole apply this way, to merge it in one parallel launch.

    Returns:
        `out` when given, else a new tensor of base's shape and dtype; inputs are unchanged.

    Example:
        >>> import torch
        >>> base = torch.zeros(3)
        >>> deltas = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([1.0, 2.0, 0.0])]
        >>> merge_tensor("ties", base, deltas, [{"weight": 1.0}] * 2, {}).tolist()
        [1.0, 2.0, 0.5]
    """
    spec = get_spec(method)
    n = len(donors)
    if n < spec.min_donors or (spec.max_donors is not None and n > spec.max_donors):
        bounds = (
            f"exactly {spec.min_donors}"
            if spec.max_donors == spec.min_donors
            else f"at least {spec.min_donors}"
            + (f" and at most {spec.max_donors}" if spec.max_donors is not None else "")
        )
        raise MergeError(f"{method} takes {bounds} donor(s), got {n}")
    if len(donor_params) != n:
        raise MergeError(f"{method}: {n} donors but {len(donor_params)} donor parameter sets")
    if masks is not None and len(masks) != n:
        raise MergeError(f"{method}: {n} donors but {len(masks)} masks")
    for i, donor in enumerate(donors):
        if donor.shape != base.shape:
            raise MergeError(
                f"{method}: donor {i} has shape {tuple(donor.shape)}, base {tuple(base.shape)}"
            )
    resolved_donors = [resolve_donor_params(method, p) for p in donor_params]
    resolved = resolve_params(method, params)
    # the fused CPU kernels read bfloat16 and float16 inputs and write such an `out` as they
    # are stored (float32 math inside): they get the stored tensors, not float32 copies
    stored = (spec.fused and out is not None
              and kernels.available([out, base, *donors], dtype, batch))
    direct = out if out is not None and (out.dtype == dtype or stored) else None
    checks: dict[str, Any] = {}  # what the method learned of its result in the pass writing it
    queued = len(batch) if batch is not None and direct is not None else None
    computed = spec.fn(
        base if stored else base.to(dtype),
        [d if stored else d.to(dtype) for d in donors],
        resolved_donors,
        resolved,
        stream=stream,
        masks=masks,
        out=direct,
        memo=memo,
        checks=checks,
        batch=batch if queued is not None else None,  # only results written in place
        dtype=dtype,
    )
    if queued is not None and len(batch) > queued:
        return out  # written and checked by batch.run()
    result = computed
    if out is not None:
        if result is not out:
            out.copy_(result)
        result = out
    else:
        result = result.to(base.dtype)
    if check_finite:
        # the method's count holds only for the very tensor it wrote (not for a cast copy)
        bad = checks.get("non_finite") if result is computed else None
        if bad is None:
            assert_finite(result, source=computed if result is not computed else None)
        elif bad:
            if "unrounded" in checks:  # written narrower: an overflow of its dtype, or a NaN?
                assert_finite(result, source=checks["unrounded"])
            raise MergeError(f"{bad} merged values are NaN or inf")
    return result


def assert_finite(t: torch.Tensor, *, source: torch.Tensor | None = None) -> None:
    """Raise MergeError when `t` holds a NaN or an inf.

    `source`: the values (in the math dtype) that `t` was cast from; where those are finite and
    `t`'s are not, the message says that the merge overflows `t`'s dtype (an fp16 checkpoint
    holds at most ±65504) and gives the largest magnitude.

    Example:
        >>> assert_finite(torch.tensor([7e4]).half(), source=torch.tensor([7e4]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        vlmexp.errors.MergeError: 1 merged values overflow float16 (largest magnitude 70000, ...)
    """
    # NaN and inf propagate through a float sum (one vectorised pass, accumulated in float32 at
    # least, so a large finite half-precision tensor does not overflow its own sum); only when
    # the sum is not finite does the slower elementwise test decide.
    if not t.is_floating_point():
        return
    total = t.sum(dtype=torch.float32) if t.element_size() < 4 else t.sum()
    if math.isfinite(float(total)):
        return
    bad = int((~torch.isfinite(t)).sum())
    if not bad:
        return
    if source is not None and source.dtype != t.dtype and bool(torch.isfinite(source).all()):
        dtype = str(t.dtype).removeprefix("torch.")
        largest = float(source.abs().max())
        raise MergeError(f"{bad} merged values overflow {dtype} (largest magnitude "
                         f"{largest:g}, {dtype} holds ±{torch.finfo(t.dtype).max:g})")
    raise MergeError(f"{bad} merged values are NaN or inf")
