"""vlmexp.merge.kernels on bfloat16 and float16 storage: what they read, what they write, what
they count, against torch's own casts. The float32 kernels are tested in test_methods.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmexp.merge import kernels

NARROW = [torch.bfloat16, torch.float16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _edge_values() -> torch.Tensor:
    """float32 values where rounding to bfloat16 or float16 is easy to get wrong."""
    b, h = 2.0 ** -8, 2.0 ** -11  # half an ulp at 1.0 of bfloat16, of float16
    values = [
        1.0, 1 + b, 1 + 3 * b, 1 + b + 2 ** -20, -(1 + b), 1 - b / 2,  # bf16 ties, above a tie
        1 + h, 1 + 3 * h, -(1 + 3 * h), 1 + h + 2 ** -20,  # fp16 ties
        1e-39, -1e-39, 1.1754942e-38, 1e-45, 9.2e-41,  # float32 subnormals (bf16 keeps them)
        6e-8, 5.96e-8, 2.98e-8, 3e-8, 1e-5, -1e-5,  # fp16 subnormals, and underflow to 0
        0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"),
        3.4e38, 3.3961e38, 3.39e38, -3.4e38,  # bf16: to inf above 3.3961e38, not below
        65504.0, 65519.0, 65520.0, -65520.0, 1e5,  # fp16: to inf from 65520 on
    ]
    payloads = np.array([0x7F800001, 0xFFC00001, 0x7FBFFFFF, 0x7FC12345], dtype=np.uint32)
    return torch.cat([torch.tensor(values, dtype=torch.float32),
                      torch.from_numpy(payloads.view(np.int32)).view(torch.float32)])


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("offset", [0, 5])
def test_written_values_round_as_torch_casts_and_count_as_stored(dtype, offset):
    # out = -0·1 + fma(x, 1, ·) + fma(-0, 1, ·) is x itself for every float32 x (NaN, -0 and
    # subnormals too), so what is written is x rounded: it must have the bits of x.to(dtype)
    # in the entries before out's first 64-byte line, in the streamed lines and after them
    # (offset: entries of out before a line boundary), and count what is NaN or inf as stored
    edge = _edge_values()
    n = kernels.MIN_ELEMENTS + 37
    x = edge.repeat(n // edge.numel() + 1)[:n].contiguous()
    x[offset:offset + edge.numel()] = edge  # all of them in the first entries, one by one
    x[n - edge.numel():] = edge  # and after the last whole line
    out = torch.empty(n + 64, dtype=dtype)[offset:offset + n]
    base = torch.full((n,), -0.0, dtype=dtype)
    bad = kernels.weighted_sum(out, base, 1.0, [x, torch.full((n,), -0.0)], [1.0, 1.0])
    expected = x.to(dtype)
    assert torch.equal(_bits(out), _bits(expected))
    assert bad == int((~expected.isfinite()).sum()) > int((~x.isfinite()).sum())  # overflows
    # the sign merges round and count the same way (checked against their float32 result)
    signs, wide = torch.empty(n, dtype=dtype), torch.empty(n)
    counted = [kernels.merge(target, base, [x, torch.zeros(n)], [None, None], [1.0, 1.0],
                             [1.0, 1.0], lam=1.0, normalize=False, consensus=None)
               for target in (signs, wide)]
    assert torch.equal(_bits(signs), _bits(wide.to(dtype)))
    assert counted[0] == int((~wide.to(dtype).isfinite()).sum()) > counted[1]


@pytest.mark.parametrize("dtype", NARROW)
def test_every_stored_value_is_read_exactly(dtype):
    # all 65536 bit patterns as the base: widened to float32 exactly, so that written back
    # each one is itself (a NaN: NaN)
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    base = patterns.view(dtype)
    out = torch.empty_like(base)
    zero = torch.full_like(base, -0.0)
    bad = kernels.weighted_sum(out, base, 1.0, [zero, zero], [1.0, 1.0])
    nan = base.isnan()
    assert torch.equal(_bits(out)[~nan], patterns[~nan])
    assert bool(out[nan].isnan().all())
    assert bad == int((~base.isfinite()).sum()) == (2048 if dtype == torch.float16 else 256)
    # and as a task vector: base + 1·δ
    out = torch.empty_like(base)
    kernels.weighted_sum(out, zero, 1.0, [base, zero], [1.0, 1.0])
    assert torch.equal(_bits(out)[~nan], patterns[~nan])


def _torch_weighted_sum(out_dtype, base, base_coef, deltas, coefs):
    """The torch path: float32 math (the inputs widened), then cast."""
    result = torch.mul(base.float(), base_coef)
    for d, c in zip(deltas, coefs, strict=True):
        result.add_(d.float(), alpha=c)
    return result.to(out_dtype)


# (out, base, task vectors): the engine's storage plans (float32 task vectors or the model's
# dtype), and a float32 output from narrower inputs
_STORAGES = [
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16, torch.float32),
    (torch.float16, torch.float16, torch.float16),
    (torch.float32, torch.float16, torch.float32),
]


def test_one_queue_runs_every_storage_with_the_torch_paths_bits():
    g = torch.Generator().manual_seed(3)
    queue, checks = kernels.Queue(), []
    for i, (out_dtype, base_dtype, delta_dtype) in enumerate(_STORAGES):
        n = 3 * 16 * 1024 + 17 * (i + 1)
        base = torch.randn(n + 1, generator=g).to(base_dtype)[1:]  # misaligned input
        deltas = [(torch.randn(n, generator=g) * 0.05).to(delta_dtype) for _ in range(2)]
        masks = [torch.rand(n, generator=g) < 0.6, None]
        out = torch.empty(n + 32, dtype=out_dtype)[i:i + n]
        coefs = [0.7, -0.4]
        queue.weighted_sum(out, base, 1.25, deltas, coefs)
        expected = _torch_weighted_sum(out_dtype, base, 1.25, deltas, coefs)
        signs = torch.empty(n, dtype=out_dtype)
        options = {"lam": 0.9, "normalize": True, "consensus": "sum"}
        queue.sign_merge(signs, base, deltas, masks, [1.0, 1.5], coefs, **options)
        # the sign merge on float32 copies of the inputs, cast: the same bits
        wide = torch.empty(n)
        kernels.merge(wide, base.float(), [d.float() for d in deltas], masks, [1.0, 1.5],
                      coefs, **options)
        checks.append((out, expected, signs, wide.to(out_dtype)))
    assert queue.run() == [0] * 2 * len(_STORAGES)
    for i, (out, expected, signs, cast) in enumerate(checks):
        assert torch.equal(out, expected), _STORAGES[i]
        assert torch.equal(signs, cast), _STORAGES[i]
        assert not torch.equal(signs, out)


def test_unrounded_tells_an_overflow_of_float16_from_a_nan():
    n = kernels.MIN_ELEMENTS
    base = torch.zeros(n, dtype=torch.float16)
    big = torch.zeros(n)
    big[[3, n - 1]] = 60000.0
    nan = torch.zeros(n)
    nan[7] = float("nan")
    queue = kernels.Queue()
    outs = [torch.empty(n, dtype=torch.float16) for _ in range(3)] + [torch.empty(n)]
    queue.weighted_sum(outs[0], base, 1.0, [big, big], [1.0, 1.0])  # 120000: overflows
    queue.weighted_sum(outs[1], base, 1.0, [big, nan], [1.0, 1.0])  # fits, one NaN
    queue.sign_merge(outs[2], base, [big, big], [None, None], [1.0, 1.0], [1.0, 1.0],
                     lam=1.0, normalize=False, consensus="sum")  # overflows
    queue.weighted_sum(outs[3], base, 1.0, [nan, big], [1.0, 1.0])  # float32: nothing rounded
    assert queue.run() == [2, 1, 2, 1]
    assert sorted(queue.unrounded) == [0, 1, 2]
    for i in (0, 2):
        source = queue.unrounded[i]
        assert source.dtype == torch.float32 and bool(source.isfinite().all())
        assert source[3].item() == source[n - 1].item() == 120000.0
        assert torch.equal(source.to(torch.float16), outs[i])
    assert queue.unrounded[1][7].isnan() and int(queue.unrounded[1].isnan().sum()) == 1
    queue.run()
    assert queue.unrounded == {}
