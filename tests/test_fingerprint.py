"""merge.fingerprint: per-component sums and norms, their text form, and the tolerance check."""

from __future__ import annotations

import math

import pytest
import torch

from vlmexp.merge import fingerprint as fp
from vlmexp.merge.fingerprint import Fingerprint, compare, difference, fingerprints


def reference(tensors: list[torch.Tensor]) -> Fingerprint:
    """float64 all the way."""
    ts = [t.double() for t in tensors]
    return Fingerprint(total=sum(t.sum().item() for t in ts),
                       norm=math.sqrt(sum((t * t).sum().item() for t in ts)),
                       count=sum(t.numel() for t in ts))


@pytest.mark.parametrize("dtype, n", [(torch.float32, 5000), (torch.float32, 3),
                                      (torch.float64, 10_000), (torch.bfloat16, (1 << 18) * 2 + 77),
                                      (torch.float16, 1000)])
def test_moments_are_the_float64_sum_and_norm(dtype, n):
    g = torch.Generator().manual_seed(n)
    a = (torch.randn(n, generator=g) * 0.02 + 0.001).to(dtype)
    b = torch.randn(7, 9, generator=g).to(dtype)
    part = a[1:12]  # a view, misaligned
    got = fingerprints([("language", a), ("head", b), ("language", part)])
    assert got["language"].count == n + part.numel() and got["head"].count == 63
    assert difference(reference([a, part]), got["language"]) < 1e-7
    assert difference(reference([b]), got["head"]) < 1e-7
    assert got["language"].total == pytest.approx(reference([a, part]).total, rel=1e-5, abs=1e-6)


def test_text_form_round_trips_every_digit():
    f = Fingerprint(total=-1 / 3, norm=math.pi * 1e10, count=123_456_789_012)
    assert f.to_text() == "-0.3333333333333333,31415926535.89793,123456789012"
    assert Fingerprint.from_text(f.to_text()) == f
    with pytest.raises(ValueError):
        Fingerprint.from_text("1.0,2.0")


def test_a_devices_rounding_agrees_and_a_real_change_does_not():
    g = torch.Generator().manual_seed(0)
    weights = {"language": [torch.randn(300, 200, generator=g) * 0.02 for _ in range(3)],
               "projector": [torch.randn(64, 32, generator=g) * 0.05]}
    logged = fingerprints((c, t) for c, ts in weights.items() for t in ts)

    def rebuilt(change) -> dict[str, Fingerprint]:
        return fingerprints((c, change(t.clone())) for c, ts in weights.items() for t in ts)

    def one_ulp(t: torch.Tensor) -> torch.Tensor:  # a third of the entries, up or down
        up = torch.nextafter(t, torch.full_like(t, math.inf))
        down = torch.nextafter(t, torch.full_like(t, -math.inf))
        pick = torch.randint(0, 3, t.shape, generator=g)
        return torch.where(pick == 0, up, torch.where(pick == 1, down, t))

    check = compare(logged, rebuilt(one_ulp), tolerance=1e-6)
    assert check.agree and 0 < check.difference < 1e-7
    assert check.why.startswith("largest relative difference")
    far = compare(logged, rebuilt(lambda t: t * (1 + 1e-3)), tolerance=1e-6)
    assert not far.agree and far.difference == pytest.approx(1e-3, rel=1e-3)
    # a change the norm cannot see (signs) moves the sum
    flipped = compare(logged, rebuilt(lambda t: torch.where(t > 0.03, -t, t)), tolerance=1e-6)
    assert not flipped.agree and flipped.component in ("language", "projector")


def test_bfloat16_rounding_flips_stay_within_its_tolerance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, generator=g) * 0.02
    # another device's float32 result a rounding away; a few entries round to another bf16
    y = x * (1 + torch.randn(4096, generator=g) * 3e-3 * (torch.rand(4096, generator=g) < 0.002))
    a, b = fingerprints([("c", x.bfloat16())]), fingerprints([("c", y.bfloat16())])
    assert (x.bfloat16() != y.bfloat16()).any()
    diff = difference(a["c"], b["c"])
    assert fp.tolerance_for({torch.bfloat16}) == 1e-4 and diff < 1e-4
    assert not compare(a, {"c": Fingerprint(b["c"].total, b["c"].norm * 1.001, 4096)},
                       tolerance=1e-4).agree


def test_components_and_counts_must_match():
    f = Fingerprint(1.0, 2.0, 10)
    check = compare({"vision": f, "language": f}, {"language": f}, tolerance=1e-6)
    assert not check.agree and check.component == "vision"
    assert check.why == "component vision has a fingerprint only in the logged merge"
    check = compare({"language": f}, {"language": Fingerprint(1.0, 2.0, 11)}, tolerance=1e-6)
    assert not check.agree and check.difference == math.inf
    assert check.why == "component language has 11 entries, the logged merge 10"
    assert not compare({}, {}, tolerance=1e-6).agree
    zero = Fingerprint(0.0, 0.0, 5)
    assert compare({"head": zero}, {"head": zero}, tolerance=1e-6).agree


def test_the_tolerance_is_the_loosest_of_the_dtypes():
    assert fp.tolerance_for({torch.float32}) == 1e-6
    assert fp.tolerance_for({torch.float32, torch.float16}) == 1e-4
    assert fp.tolerance_for([]) == 1e-6
