"""vlmexp.merge.methods and .sparsify against plain float64 references of the papers' formulas.

The references below loop over entries on purpose: they share no code or trick with the
implementation. Agreement with mergekit itself is in test_methods_mergekit.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from vlmexp.errors import MergeError
from vlmexp.merge import sparsify as sp
from vlmexp.merge.methods import (
    METHODS,
    mask_is_deterministic,
    merge_tensor,
    sparsify_mask,
    task_arithmetic,
)

F64 = torch.float64


def _tensors(n_donors: int = 3, shape: tuple[int, ...] = (6, 7), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=F64)
    deltas = [torch.randn(shape, generator=g, dtype=F64) * (0.5 + i) for i in range(n_donors)]
    return base, deltas


def _merge64(method, base, donors, donor_params, params=None, **kw):
    return merge_tensor(method, base, donors, donor_params, params or {}, dtype=F64, **kw)


# ----------------------------------------------------------------------------- references


def ref_keep_top(delta: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask keeping the k entries of largest magnitude (plain sort)."""
    flat = delta.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: abs(flat[i]), reverse=True)
    mask = [0.0] * len(flat)
    for i in order[:k]:
        mask[i] = 1.0
    return torch.tensor(mask, dtype=F64).reshape(delta.shape)


def ref_breadcrumbs_keep(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """0/1 mask: drop the top gamma·n by magnitude, keep the next density·n."""
    flat = delta.reshape(-1).tolist()
    n = len(flat)
    order = sorted(range(n), key=lambda i: abs(flat[i]), reverse=True)
    n_top = int(gamma * n)
    target = int(density * n)
    n_top = min(n_top, n - target)
    mask = [0.0] * n
    for i in order[n_top : n_top + target]:
        mask[i] = 1.0
    return torch.tensor(mask, dtype=F64).reshape(delta.shape)


def ref_ties(base, trimmed, weights, normalize, lam):
    """TIES: elect the sign of Σ w_i τ_i per entry, mean of the agreeing entries (weighted)."""
    out = base.clone().reshape(-1)
    flats = [t.reshape(-1).tolist() for t in trimmed]
    for j in range(out.numel()):
        values = [w * f[j] for w, f in zip(weights, flats, strict=True)]
        sign = 1.0 if sum(values) >= 0 else -1.0
        agree = [(v, w) for v, w in zip(values, weights, strict=True) if v != 0 and math.copysign(1, v) == sign]
        total = sum(v for v, _ in agree)
        if normalize:
            divisor = sum(w for _, w in agree)
            total = total / divisor if divisor != 0 else total
        out[j] += lam * total
    return out.reshape(base.shape)


def ref_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


# ----------------------------------------------------------------------------- registry


def test_registry_is_complete_and_described() -> None:
    expected = {
        "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
        "breadcrumbs_ties", "della", "della_linear", "slerp", "nuslerp", "model_stock", "karcher",
    }
    assert set(METHODS) == expected
    for name, spec in METHODS.items():
        assert spec.name == name
        assert spec.paper.startswith("https://")
        assert spec.inputs in ("deltas", "weights")
        assert spec.random == (name in {"dare_ties", "dare_linear", "della", "della_linear"})
        assert mask_is_deterministic(name) == (not spec.random)
        names = [p.name for p in spec.donor_params + spec.method_params]
        assert len(names) == len(set(names))


# ----------------------------------------------------------------------------- task arithmetic


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("lam", [1.0, 0.6])
def test_task_arithmetic_formula(normalize: bool, lam: float) -> None:
    base, deltas = _tensors()
    weights = [0.7, -0.2, 1.3]
    ours = _merge64(
        "task_arithmetic", base, deltas, [{"weight": w} for w in weights],
        {"normalize": normalize, "lambda": lam},
    )
    total = sum(w * d for w, d in zip(weights, deltas, strict=True))
    expected = base + lam * (total / sum(weights) if normalize else total)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_formula_with_base_weight(normalize: bool) -> None:
    base, deltas = _tensors(2)
    donors = [base + d for d in deltas]
    ours = _merge64(
        "linear", base, deltas, [{"weight": 0.3}, {"weight": 0.9}],
        {"normalize": normalize, "base_weight": 0.4},
    )
    total = 0.4 * base + 0.3 * donors[0] + 0.9 * donors[1]
    expected = total / 1.6 if normalize else total
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    with pytest.raises(MergeError, match="sum to 0"):
        _merge64("linear", base, deltas[:1], [{"weight": 1.0}], {"base_weight": -1.0})


@pytest.mark.parametrize(("densities", "normalize", "lam"), [
    ((0.3, 0.5, 0.8), True, 1.0), ((0.5, 0.5, 0.5), False, 0.7), ((1.0, 0.2, 1.0), True, 1.2),
])
def test_ties_formula(densities, normalize, lam) -> None:
    base, deltas = _tensors()
    weights = [1.0, 0.5, 0.8]
    ours = _merge64(
        "ties", base, deltas, [{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)],
        {"normalize": normalize, "lambda": lam},
    )
    n = deltas[0].numel()
    trimmed = [
        d * ref_keep_top(d, max(1, int(p * n))) if p < 1 else d for d, p in zip(deltas, densities, strict=True)
    ]
    torch.testing.assert_close(ours, ref_ties(base, trimmed, weights, normalize, lam), atol=1e-12, rtol=0)


def test_sign_consensus_count() -> None:
    """'count' elects the majority sign by votes, not by mass."""
    base = torch.zeros(2, dtype=F64)
    deltas = [torch.tensor([1.0, -1.0], dtype=F64), torch.tensor([1.0, -1.0], dtype=F64),
              torch.tensor([-10.0, 5.0], dtype=F64)]
    params = {"normalize": True, "lambda": 1.0}
    count = task_arithmetic(base, deltas, [{"weight": 1.0}] * 3, params, consensus="count")
    total = task_arithmetic(base, deltas, [{"weight": 1.0}] * 3, params, consensus="sum")
    assert count.tolist() == [1.0, -1.0]
    assert total.tolist() == [-10.0, 5.0]


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.1), (0.8, 0.05), (0.9, 0.3), (0.3, 0.0)])
def test_breadcrumbs_formula(density: float, gamma: float) -> None:
    base, deltas = _tensors(2)
    weights = [1.0, 0.6]
    dp = [{"weight": w, "density": density, "gamma": gamma} for w in weights]
    ours = _merge64("breadcrumbs", base, deltas, dp)
    kept = [d * ref_breadcrumbs_keep(d, density, gamma) for d in deltas]
    expected = base + sum(w * k for w, k in zip(weights, kept, strict=True))
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)
    ours_ties = _merge64("breadcrumbs_ties", base, deltas, dp, {"normalize": True})
    expected_ties = ref_ties(base, kept, weights, True, 1.0)
    torch.testing.assert_close(ours_ties, expected_ties, atol=1e-12, rtol=0)


def test_breadcrumbs_keeps_small_tensors_intact() -> None:
    """Where int(density·n) == 0 mergekit zeroes the delta; vlmexp leaves it whole."""
    base, deltas = _tensors(1, shape=(8,))
    ours = _merge64("breadcrumbs", base, deltas, [{"weight": 1.0, "density": 0.1}])
    torch.testing.assert_close(ours, base + deltas[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["mergekit", "paper"])
def test_magnitude_rescale_modes(mode: str) -> None:
    base, deltas = _tensors(1, shape=(40, 50))
    dp = [{"weight": 1.0, "density": 0.3}]
    ours = _merge64("ties", base, deltas, dp, {"rescale": True, "rescale_mode": mode}) - base
    kept = deltas[0] * ref_keep_top(deltas[0], int(0.3 * 2000))
    if mode == "mergekit":
        expected = kept * deltas[0].abs().sum() / kept.abs().sum()
    else:
        expected = kept / 0.3
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- random methods


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della_linear", "della"])
@pytest.mark.parametrize("density", [0.2, 0.6])
def test_random_kept_fraction_and_paper_rescale(method: str, density: float) -> None:
    base = torch.zeros(400, 500)
    delta = torch.randn(400, 500, generator=torch.Generator().manual_seed(3))
    out = merge_tensor(
        method, base, [delta], [{"weight": 1.0, "density": density}],
        {"rescale_mode": "paper", "normalize": False}, stream=sp.CounterStream(11),
    )
    kept = out != 0
    assert abs(kept.float().mean().item() - density) < 0.01
    if method.startswith("dare"):
        torch.testing.assert_close(out[kept], delta[kept] / density)
    else:  # DELLA: p_i linear in the magnitude rank within the row, from d − ε to d + ε
        eps = 0.15
        ranks = delta.abs().argsort(dim=1, stable=True).argsort(dim=1).double()
        probs = (density - eps) + 2 * eps * ranks / (delta.shape[1] - 1)
        torch.testing.assert_close(
            out[kept].double(), delta[kept].double() / probs[kept], rtol=1e-6, atol=0
        )
        # larger entries survive more often: top fifth vs bottom fifth of each row
        top = kept[ranks >= 400].float().mean().item()
        bottom = kept[ranks < 100].float().mean().item()
        assert top - bottom > 2 * eps * 0.8 - 0.02


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_mergekit_rescale_preserves_l1(method: str) -> None:
    base = torch.zeros(300, 200)
    delta = torch.randn(300, 200, generator=torch.Generator().manual_seed(4))
    out = merge_tensor(
        method, base, [delta], [{"weight": 1.0, "density": 0.4}], {},
        stream=sp.CounterStream(0),
    )
    assert (out != 0).float().mean().item() == pytest.approx(0.4, abs=0.01)
    assert out.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_methods_are_seeded(method: str) -> None:
    base, deltas = _tensors(2, shape=(50, 60))
    dp = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.4}]

    def run(seed: int) -> torch.Tensor:
        return _merge64(method, base, deltas, dp, stream=sp.CounterStream(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_della_epsilon_range_is_checked() -> None:
    base, deltas = _tensors(1)
    with pytest.raises(MergeError, match="epsilon"):
        _merge64("della", base, deltas, [{"weight": 1.0, "density": 0.9, "epsilon": 0.2}])


# ----------------------------------------------------------------------------- masks


def test_precomputed_masks_are_used_and_cacheable() -> None:
    base, deltas = _tensors(2, shape=(30, 20))
    dp = [{"weight": 1.0, "density": 0.4}, {"weight": 0.7, "density": 0.6}]
    masks = [sparsify_mask("ties", d, p) for d, p in zip(deltas, dp, strict=True)]
    assert [m.sum().item() for m in masks] == [240, 360]
    assert masks[0].dtype == torch.bool
    torch.testing.assert_close(
        _merge64("ties", base, deltas, dp, masks=masks), _merge64("ties", base, deltas, dp),
        atol=0, rtol=0,
    )
    keep_all = [torch.ones_like(masks[0]), None]
    dense = _merge64("ties", base, deltas, [dp[0] | {"density": 1.0}, dp[1]])
    torch.testing.assert_close(_merge64("ties", base, deltas, dp, masks=keep_all), dense)
    assert sparsify_mask("task_arithmetic", deltas[0], {"weight": 1.0}) is None
    assert sparsify_mask("ties", deltas[0], {"weight": 1.0, "density": 1.0}) is None
    assert mask_is_deterministic("breadcrumbs") and not mask_is_deterministic("dare_linear")


def test_magnitude_mask_keeps_at_least_one() -> None:
    delta = torch.tensor([0.1, -0.4, 0.2])
    assert sp.magnitude_mask(delta, 0.1).tolist() == [False, True, False]
    assert not sp.magnitude_mask(delta, 0.0).any()


# ----------------------------------------------------------------------------- slerp family


@pytest.mark.parametrize("t", [0.0, 0.25, 0.7, 1.0])
def test_slerp_formula(t: float) -> None:
    base, deltas = _tensors(1)
    donor = base + deltas[0]
    ours = _merge64("slerp", base, [donor - base], [{"t": t}])
    torch.testing.assert_close(ours, ref_slerp(base, donor, t), atol=1e-12, rtol=0)


def test_slerp_collinear_falls_back_to_lerp() -> None:
    base = torch.linspace(1, 2, 10, dtype=F64)
    donor = base * 3  # cos = 1
    ours = _merge64("slerp", base, [donor - base], [{"t": 0.25}])
    torch.testing.assert_close(ours, base * 1.5, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["flatten", "rows", "columns"])
def test_nuslerp_formula(mode: str) -> None:
    base, deltas = _tensors(2)
    params = {
        "flatten": {},
        "rows": {"nuslerp_flatten": False},
        "columns": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    }[mode]
    ours = _merge64("nuslerp", base, deltas, [{"weight": 1.0}, {"weight": 3.0}], params)
    a, b = deltas
    if mode == "flatten":
        expected = base + ref_slerp(a, b, 0.75)
    elif mode == "rows":
        expected = base + torch.stack([ref_slerp(a[i], b[i], 0.75) for i in range(a.shape[0])])
    else:
        cols = [ref_slerp(a[:, j], b[:, j], 0.75) for j in range(a.shape[1])]
        expected = base + torch.stack(cols, dim=1)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)
    no_base = _merge64("nuslerp", base, deltas, [{"weight": 1.0}, {"weight": 3.0}],
                       {"use_base": False})
    torch.testing.assert_close(no_base, ref_slerp(base + a, base + b, 0.75), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n_donors", [2, 3])
def test_model_stock_formula(n_donors: int) -> None:
    base, deltas = _tensors(n_donors)
    # make the task vectors share a direction so that t is well inside (0, 1)
    deltas = [d + 2 * deltas[0] for d in deltas]
    ours = _merge64("model_stock", base, deltas, [{}] * n_donors)
    flats = [d.reshape(-1) for d in deltas]
    cosines = [
        float(flats[i] @ flats[j] / (flats[i].norm() * flats[j].norm()))
        for i in range(n_donors) for j in range(i + 1, n_donors)
    ]
    cos = sum(cosines) / len(cosines)
    t = n_donors * cos / (1 + (n_donors - 1) * cos)
    average = sum(base + d for d in deltas) / n_donors
    torch.testing.assert_close(ours, t * average + (1 - t) * base, atol=1e-12, rtol=0)
    assert 0 < t < 1


def test_model_stock_filter_wise_per_row() -> None:
    base, deltas = _tensors(2)
    ours = _merge64("model_stock", base, deltas, [{}, {}], {"filter_wise": True})
    for i in range(base.shape[0]):
        a, b = deltas[0][i], deltas[1][i]
        cos = float(a @ b / (a.norm() * b.norm()))
        t = 2 * cos / (1 + cos)
        torch.testing.assert_close(ours[i], base[i] + t * (a + b) / 2, atol=1e-12, rtol=0)


@pytest.mark.parametrize("use_base", [True, False])
def test_karcher_is_a_stationary_point(use_base: bool) -> None:
    """The Karcher mean u* zeroes Σ log_u*(x_i); its norm is the mean of the norms."""
    base, deltas = _tensors(3, shape=(5, 4))
    donors = [base + 0.5 * d for d in deltas]
    ours = _merge64("karcher", base, donors, [{}] * 3,
                    {"max_iter": 200, "tol": 1e-12, "use_base": use_base})
    points = donors + ([base] if use_base else [])
    mean_norm = sum(p.norm() for p in points) / len(points)
    torch.testing.assert_close(ours.norm(), mean_norm, atol=1e-10, rtol=0)
    u = (ours / ours.norm()).reshape(-1)
    gradient = torch.zeros_like(u)
    for p in points:
        x = (p / p.norm()).reshape(-1)
        cos = float(x @ u)
        theta = math.acos(max(-1.0, min(1.0, cos)))
        gradient += theta / math.sin(theta) * (x - cos * u)
    assert gradient.norm().item() < 1e-9


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("method", sorted(METHODS))
def test_inputs_untouched_and_dtype_kept(method: str) -> None:
    spec = METHODS[method]
    n = max(spec.min_donors, min(2, spec.max_donors or 2))
    base64, deltas64 = _tensors(n, shape=(8, 9))
    base = base64.to(torch.bfloat16)
    donors = [(d if spec.inputs == "deltas" else base64 + d).to(torch.bfloat16) for d in deltas64]
    before = [base.clone()] + [d.clone() for d in donors]
    dp = [
        {p.name: (0.5 if p.default is None else p.default) for p in spec.donor_params}
        | ({"density": 0.5} if any(p.name == "density" for p in spec.donor_params) else {})
        for _ in range(n)
    ]
    out = merge_tensor(method, base, donors, dp, {}, stream=sp.CounterStream(0))
    assert out.dtype == torch.bfloat16 and out.shape == base.shape
    assert torch.isfinite(out.float()).all()
    for original, now in zip(before, [base, *donors], strict=True):
        assert torch.equal(original, now)
    # float32 math on bf16 inputs equals the float32 merge cast to bf16
    out32 = merge_tensor(method, base.float(), [d.float() for d in donors], dp, {},
                         stream=sp.CounterStream(0))
    assert torch.equal(out, out32.to(torch.bfloat16))


def test_errors_name_the_fault() -> None:
    base, deltas = _tensors(2)
    with pytest.raises(MergeError, match="unknown merge method 'nope'"):
        merge_tensor("nope", base, deltas, [{}, {}], {})
    with pytest.raises(MergeError, match="missing required parameter 'weight'"):
        merge_tensor("ties", base, deltas, [{}, {}], {})
    with pytest.raises(MergeError, match="unknown parameter.*lamda"):
        merge_tensor("ties", base, deltas, [{"weight": 1}] * 2, {"lamda": 1})
    with pytest.raises(MergeError, match="slerp takes exactly 1 donor"):
        merge_tensor("slerp", base, deltas, [{"t": 0.5}] * 2, {})
    with pytest.raises(MergeError, match="model_stock takes at least 2"):
        merge_tensor("model_stock", base, deltas[:1], [{}], {})
    with pytest.raises(MergeError, match="shape"):
        merge_tensor("linear", base, [deltas[0][:2]], [{"weight": 1}], {})
    with pytest.raises(MergeError, match="rescale_mode"):
        merge_tensor("dare_linear", base, deltas, [{"weight": 1, "density": 0.5}] * 2,
                     {"rescale_mode": "l2"})


# ----------------------------------------------------------------------------- fused CPU kernel


@pytest.mark.parametrize(("method", "donor_params", "params"), [
    ("task_arithmetic", [{"weight": 0.7, "density": 0.6}, {"weight": -0.4}], {"lambda": 0.9}),
    ("ties", [{"weight": 1.0, "density": 0.4}, {"weight": 0.6, "density": 0.7}], {}),
    ("ties", [{"weight": 1.0, "density": 0.4}, {"weight": 0.6, "density": 0.7}],
     {"normalize": False, "lambda": 1.3, "rescale": True}),
    ("breadcrumbs_ties", [{"weight": 1.0, "density": 0.8, "gamma": 0.05},
                          {"weight": 0.5, "density": 0.9}], {"normalize": True}),
    ("dare_linear", [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}], {}),
    ("della", [{"weight": 1.0, "density": 0.5}, {"weight": 0.8, "density": 0.6}], {}),
])
def test_fused_kernel_equals_the_torch_path(monkeypatch, method, donor_params, params):
    """Above kernels.MIN_ELEMENTS the CPU merge runs one fused loop; it must equal the
    elementwise torch path (which GPUs use) on the same inputs and masks."""
    from vlmexp.merge import kernels, methods

    g = torch.Generator().manual_seed(0)
    n = kernels.MIN_ELEMENTS * 3 + 5
    base = torch.randn(n, generator=g)
    deltas = [torch.randn(n, generator=g) * s for s in (0.02, 0.05)]
    masks = [methods.sparsify_mask(method, d, p, params, sp.CounterStream(i))
             for i, (d, p) in enumerate(zip(deltas, donor_params, strict=True))]
    fused = torch.empty(n)
    state = merge_tensor(method, base, deltas, donor_params, params, masks=masks, out=fused,
                         check_finite=True)
    assert state is fused
    monkeypatch.setattr(kernels, "available", lambda *a: False)
    reference = merge_tensor(method, base, deltas, donor_params, params, masks=masks)
    assert (fused - reference).abs().max().item() <= 1e-6
    assert not torch.equal(fused, base)


def test_non_finite_values_are_reported_on_the_fused_path():
    from vlmexp.merge import kernels

    n = kernels.MIN_ELEMENTS
    deltas = [torch.zeros(n), torch.zeros(n)]
    deltas[1][7] = float("inf")
    with pytest.raises(MergeError, match="1 merged values are NaN or inf"):
        merge_tensor("ties", torch.zeros(n), deltas, [{"weight": 1.0}] * 2, {},
                     out=torch.empty(n), check_finite=True)


_WEIGHTED_SUMS = [
    ("task_arithmetic", {}, lambda ws: (1.0, ws)),
    ("task_arithmetic", {"normalize": True, "lambda": 0.8},
     lambda ws: (1.0, [0.8 * w / sum(ws) for w in ws])),
    ("linear", {}, lambda ws: (1.0, [w / sum(ws) for w in ws])),
    ("linear", {"normalize": False, "base_weight": 0.3}, lambda ws: (0.3 + sum(ws), ws)),
]


@pytest.mark.parametrize(("method", "params", "coefficients"), _WEIGHTED_SUMS)
@pytest.mark.parametrize("n_donors", [1, 2, 3])
def test_fused_weighted_sum_equals_float64_and_the_torch_path(monkeypatch, method, params,
                                                              coefficients, n_donors):
    """Task arithmetic and linear above kernels.MIN_ELEMENTS: one fused pass that must give the
    torch path's bits (which GPUs use) and the float64 formula within float32 rounding, and that
    counts the non-finite values itself (no second read of the result)."""
    from vlmexp.merge import kernels, methods

    calls = []
    run = kernels.Queue.run
    monkeypatch.setattr(kernels.Queue, "run", lambda self: calls.append(1) or run(self))
    g = torch.Generator().manual_seed(n_donors)
    n = kernels.MIN_ELEMENTS * 2 + 7  # odd: the vector loop's remainder is covered too
    base = torch.randn(n, generator=g)
    deltas = [torch.randn(n, generator=g) * 0.05 * (i + 1) for i in range(n_donors)]
    weights = [0.7, -0.4, 1.1][:n_donors]
    donor_params = [{"weight": w} for w in weights]

    def no_second_read(t):
        raise AssertionError("the fused pass already counted the non-finite values")

    monkeypatch.setattr(methods, "assert_finite", no_second_read)
    # the kernel streams whole 64-byte lines: an output that starts 0, 4 or 8 bytes past a
    # line boundary has 0, 15 or 14 entries before its first line
    fused = torch.empty(n + 16)[n_donors - 1:n_donors - 1 + n]
    assert merge_tensor(method, base, deltas, donor_params, params, out=fused,
                        check_finite=True) is fused
    assert calls, "the fused kernel did not run"
    base_coef, coefs = coefficients(weights)
    terms = [base.double() * base_coef] + [c * d.double() for c, d in zip(coefs, deltas,
                                                                          strict=True)]
    expected = sum(terms)
    # float32 rounding: one per operation and per coefficient, relative to the terms' size
    bound = 2.0 ** -21 * sum(t.abs() for t in terms)
    assert bool(((fused.double() - expected).abs() <= bound).all())
    assert (fused.double() - expected).abs().max().item() <= 1e-5
    monkeypatch.setattr(kernels, "available", lambda *a: False)
    calls.clear()
    reference = merge_tensor(method, base, deltas, donor_params, params)
    assert not calls
    assert torch.equal(fused, reference)  # bit for bit


@pytest.mark.parametrize("t", [0.3, 1.0])
def test_fused_slerp_equals_float64_and_the_torch_path(monkeypatch, t):
    from vlmexp.merge import kernels

    g = torch.Generator().manual_seed(5)
    n = kernels.MIN_ELEMENTS + 9
    base = torch.randn(n, generator=g)
    delta = torch.randn(n, generator=g)  # far from collinear: the spherical branch
    fused = merge_tensor("slerp", base, [delta], [{"t": t}], {}, check_finite=True)
    expected = ref_slerp(base.double(), base.double() + delta.double(), t)
    assert (fused.double() - expected).abs().max().item() <= 1e-5
    monkeypatch.setattr(kernels, "available", lambda *a: False)
    assert torch.equal(fused, merge_tensor("slerp", base, [delta], [{"t": t}], {}))


def test_fused_weighted_sum_counts_nan_and_inf_exactly(monkeypatch):
    from vlmexp.merge import kernels

    n = kernels.MIN_ELEMENTS + 3
    big = torch.full((n,), 3e38)  # finite entries whose float32 sum overflows: not an error
    assert merge_tensor("task_arithmetic", big, [torch.zeros(n)], [{"weight": 1.0}], {},
                        out=torch.empty(n), check_finite=True).isfinite().all()
    deltas = [torch.zeros(n), torch.zeros(n)]
    deltas[0][5] = float("nan")  # before the first whole line of `out` below
    deltas[1][1000] = -float("inf")  # in a streamed line
    deltas[1][n - 1] = float("inf")  # after the last whole line
    out = torch.empty(n + 3)[3:]  # 12 bytes into a line: 13 entries before the first line
    assert kernels.weighted_sum(out, torch.zeros(n), 1.0, deltas, [0.5, 0.5]) == 3
    assert int((~out.isfinite()).sum()) == 3
    with pytest.raises(MergeError, match="^3 merged values are NaN or inf$"):
        merge_tensor("task_arithmetic", torch.zeros(n), deltas, [{"weight": 0.5}] * 2, {},
                     out=torch.empty(n), check_finite=True)
    with pytest.raises(MergeError, match="^3 merged values are NaN or inf$"):  # a fresh result
        merge_tensor("linear", torch.zeros(n), deltas, [{"weight": 0.5}] * 2, {},
                     check_finite=True)


def test_queued_weighted_sums_equal_one_by_one_and_count_per_sum():
    # one launch for sums of several sizes, alignments and donor counts
    from vlmexp.merge import kernels

    g = torch.Generator().manual_seed(11)
    sums, expected, outs = kernels.Queue(), [], []
    for i, (n, n_donors) in enumerate([(kernels.MIN_ELEMENTS, 2), (5, 2), (40_003, 1),
                                       (3 * 16 * 1024 + 17, 3), (100, 2)]):
        base = torch.randn(n + 1, generator=g)[1:]  # misaligned input
        deltas = [torch.randn(n, generator=g) for _ in range(n_donors)]
        if i == 3:
            deltas[2][[0, n // 2, n - 1]] = float("nan")
        coefs = [0.5 - 0.3 * j for j in range(n_donors)]
        out = torch.empty(n + 16)[i % 16:i % 16 + n]  # 0 … 4 floats past a line boundary
        assert sums.weighted_sum(out, base, 1.0 + 0.25 * i, deltas, coefs) == i
        outs.append(out)
        alone = torch.empty(n)
        expected.append((alone, kernels.weighted_sum(alone, base, 1.0 + 0.25 * i, deltas, coefs)))
    assert sums.run() == [count for _, count in expected] == [0, 0, 0, 3, 0]
    assert len(sums) == 0
    for out, (alone, _) in zip(outs, expected, strict=True):
        assert torch.equal(out.nan_to_num(), alone.nan_to_num())
        assert torch.equal(out.isnan(), alone.isnan())


_SIGN_JOBS = [  # (entries, donors, masked donors, consensus, normalize, lambda)
    (65_536, 2, (0, 1), "sum", True, 1.0),
    (5, 2, (0,), "sum", False, 0.7),
    (40_003, 1, (0,), None, True, 1.3),
    (3 * 16 * 1024 + 17, 3, (1, 2), "count", True, 1.0),
    (300, 2, (), "sum", True, 0.5),
    (70_001, 2, (0, 1), None, False, 1.0),
]


def test_queued_sign_merges_equal_one_by_one_and_the_torch_path():
    # TIES-like merges of several sizes, alignments, donor counts, masks and consensus modes,
    # queued with weighted sums in one Queue: each equals its own kernel call and, within
    # float32 rounding, methods.task_arithmetic's chunked torch path; NaN counted per merge
    from vlmexp.merge import kernels, methods

    g = torch.Generator().manual_seed(5)
    queue, outs, alone, want = kernels.Queue(), [], [], []
    for i, (n, n_donors, masked, consensus, normalize, lam) in enumerate(_SIGN_JOBS):
        base = torch.randn(n + 1, generator=g)[1:]  # misaligned input
        deltas = [torch.randn(n, generator=g) * 0.05 for _ in range(n_donors)]
        masks = [torch.rand(n, generator=g) < 0.6 if j in masked else None
                 for j in range(n_donors)]
        if i == 3:
            deltas[0][[1, n - 2]] = float("inf")  # kept (donor 0 is not masked)
        weights = [1.0 - 0.3 * j for j in range(n_donors)]
        scales = [1.0 + 0.5 * j for j in range(n_donors)]
        options = {"lam": lam, "normalize": normalize, "consensus": consensus}
        out = torch.empty(n + 16)[i % 16:i % 16 + n]
        assert queue.sign_merge(out, base, deltas, masks, scales, weights, **options) == 2 * i
        assert queue.weighted_sum(torch.empty(n), base, 1.0, deltas, weights) == 2 * i + 1
        outs.append(out)
        one = torch.empty(n)
        want.append(kernels.merge(one, base, deltas, masks, scales, weights, **options))
        alone.append(one)
        # the torch path: the scales folded into the deltas, as _KeptDelta.chunk does
        flat = torch.empty(n)
        kept = [methods._KeptDelta(d, m, s, None)
                for d, m, s in zip(deltas, masks, scales, strict=True)]
        step = methods._CHUNK
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            parts = [k.chunk(lo, hi).mul_(w) for k, w in zip(kept, weights, strict=True)]
            if consensus is None:
                mixed = sum(parts[1:], parts[0].clone())
                if normalize and abs(sum(weights)) >= 1e-8:
                    mixed /= sum(weights)
            else:
                mixed, divisor = methods._elect(parts, weights, consensus)
                if normalize:
                    mixed = mixed / divisor.add_(divisor == 0)
            flat[lo:hi] = base[lo:hi] + lam * mixed
        finite = flat.isfinite()
        assert torch.equal(one.isfinite(), finite), i
        assert (one[finite] - flat[finite]).abs().max().item() <= 1e-6, i
    counts = queue.run()
    assert counts[0::2] == want
    assert counts[1::2] == [0, 0, 0, 2, 0, 0]
    assert want[3] == 2 and sum(want) == 2
    assert len(queue) == 0 and queue.mask_bytes == 0
    for out, one in zip(outs, alone, strict=True):
        assert torch.equal(out.nan_to_num(), one.nan_to_num())


_STORED_CASES = [  # weighted sums, sign merges (masks cached or drawn), the torch path
    ("task_arithmetic", [{"weight": 0.7}, {"weight": -0.4}], {"lambda": 0.9}),
    ("linear", [{"weight": 0.7}, {"weight": 0.4}], {}),
    ("slerp", [{"t": 0.3}], {}),
    ("ties", [{"weight": 1.0, "density": 0.4}, {"weight": 0.6, "density": 0.7}], {}),
    ("dare_ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}], {}),
    # DELLA's per-entry rescale has no fused kernel: its torch path must convert the inputs
    ("della", [{"weight": 1.0, "density": 0.5}, {"weight": 0.8, "density": 0.6}],
     {"rescale_mode": "paper"}),
]


@pytest.mark.parametrize(("method", "donor_params", "params"), _STORED_CASES)
@pytest.mark.parametrize(("dtype", "delta_dtype"), [
    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.float16, torch.float16),
])
def test_stored_bf16_and_fp16_merge_as_float32_cast(monkeypatch, method, donor_params, params,
                                                      dtype, delta_dtype):
    """A bf16/fp16 model's tensors, with float32 task vectors or ones in the model's dtype:
    the fused kernels get them as stored (no float32 copies) and write `out` in its dtype,
    with the bits of the float32 merge (of the same values) cast; weighted sums and the
    torch path also with the bits of the float32 torch path cast."""
    from vlmexp.merge import kernels

    g = torch.Generator().manual_seed(1)
    n = kernels.MIN_ELEMENTS * 2 + 11
    base = torch.randn(n, generator=g).to(dtype)
    deltas = [(torch.randn(n, generator=g) * 0.05).to(delta_dtype) for _ in donor_params]
    jobs = []  # the storage of each merge queued: (out, base, task vectors)
    weighted_sum, sign_merge = kernels.Queue.weighted_sum, kernels.Queue.sign_merge
    monkeypatch.setattr(kernels.Queue, "weighted_sum", lambda self, out, base, c, deltas, *a: (
        jobs.append((out.dtype, base.dtype, deltas[0].dtype))
        or weighted_sum(self, out, base, c, deltas, *a)))
    monkeypatch.setattr(kernels.Queue, "sign_merge", lambda self, out, base, deltas, *a, **k: (
        jobs.append((out.dtype, base.dtype, deltas[0].dtype))
        or sign_merge(self, out, base, deltas, *a, **k)))
    out = torch.empty(n, dtype=dtype)
    assert merge_tensor(method, base, deltas, donor_params, params, out=out, check_finite=True,
                        stream=sp.CounterStream(7)) is out
    fused = not params.get("rescale_mode") == "paper"
    assert jobs == ([(dtype, dtype, delta_dtype)] if fused else [])
    wide = [base.float(), [d.float() for d in deltas]]
    float32 = merge_tensor(method, *wide, donor_params, params,
                           stream=sp.CounterStream(7))
    assert float32.dtype == torch.float32 and len(jobs) == 2 * fused
    assert torch.equal(out, float32.to(dtype))
    monkeypatch.setattr(kernels, "available", lambda *a: False)
    torch_path = merge_tensor(method, *wide, donor_params, params,
                              stream=sp.CounterStream(7)).to(dtype)
    if method in ("ties", "dare_ties"):  # float32 results within an ulp or two of the kernel's
        differ = out != torch_path
        assert int(differ.sum()) <= n // 1000
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        assert bool(((out.float() - torch_path.float()).abs()
                     <= ulp * torch_path.float().abs()).all())
    else:
        assert torch.equal(out, torch_path)
    assert not torch.equal(out, base)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_stored_fp16_merge_that_overflows_fp16_says_so(monkeypatch, method):
    # 60000 + 60000 is fine in the kernels' float32 math; written in float16 it is inf: the
    # error says it overflows (with the float32 value), not that the math made a NaN
    from vlmexp.merge import kernels

    runs = []
    run = kernels.Queue.run
    monkeypatch.setattr(kernels.Queue, "run", lambda self: runs.append(len(self)) or run(self))
    n = kernels.MIN_ELEMENTS
    base = torch.zeros(n, dtype=torch.float16)
    deltas = [torch.zeros(n), torch.zeros(n)]
    deltas[0][9] = deltas[1][9] = 60000.0
    out = torch.empty(n, dtype=torch.float16)
    params = {"normalize": False}
    with pytest.raises(MergeError, match=r"^1 merged values overflow float16 \(largest "
                                         r"magnitude 120000, float16 holds ±65504\)$"):
        merge_tensor(method, base, deltas, [{"weight": 1.0}] * 2, params, out=out,
                     check_finite=True)
    assert runs[0] == 1  # through the fused kernel
    deltas[1][9] = -float("inf")  # an inf in the float32 math: not an overflow
    with pytest.raises(MergeError, match=r"^1 merged values are NaN or inf$"):
        merge_tensor(method, base, deltas, [{"weight": 1.0}] * 2, params, out=out,
                     check_finite=True)
    deltas[1][9] = 0.0
    merge_tensor(method, base, deltas, [{"weight": 1.0}] * 2, params, out=out, check_finite=True)
    assert out[9].item() == 60000.0


def test_fused_kernels_may_be_called_from_several_threads():
    # the kernels share one numba thread pool (the workqueue layer aborts the process on a
    # concurrent launch), so the wrappers serialise their launches
    from concurrent.futures import ThreadPoolExecutor

    from vlmexp.merge import kernels

    n = kernels.MIN_ELEMENTS
    base, delta = torch.randn(n), torch.randn(n)

    def merge(i: int) -> bool:
        out = torch.empty(n)
        for _ in range(20):
            assert kernels.weighted_sum(out, base, 1.0, [delta], [float(i)]) == 0
        return torch.equal(out, torch.add(base, delta, alpha=float(i)))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(merge, range(8)))


def test_slerp_memo_gives_the_same_result():
    g = torch.Generator().manual_seed(3)
    base, delta = torch.randn(50, generator=g), torch.randn(50, generator=g)
    memo: dict = {}
    first = merge_tensor("slerp", base, [delta], [{"t": 0.3}], {}, memo=memo)
    assert set(memo) == {"slerp"}
    memo["slerp"] = tuple(memo["slerp"])
    again = merge_tensor("slerp", base, [delta], [{"t": 0.3}], {}, memo=memo)
    assert torch.equal(first, again)
    other = merge_tensor("slerp", base, [delta], [{"t": 0.3}], {}, memo={"slerp": (1.0, 0.0, 1.0)})
    assert not torch.allclose(first, other)  # the memoised statistics are what it uses
