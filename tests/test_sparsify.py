"""sparsify: counter-based random masks (same bits on any device), magnitude histograms, ranks."""

from __future__ import annotations

import pytest
import torch

from vlmexp.errors import MergeError
from vlmexp.merge import sparsify as sp

_U64 = 1 << 64
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def splitmix64(key: int, i: int) -> int:
    """Output i of splitmix64 from state `key`, in Python integers (the published algorithm)."""
    z = (key + (i + 1) * 0x9E3779B97F4A7C15) % _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % _U64
    return z ^ (z >> 31)


# ----------------------------------------------------------------------------- counter stream


@pytest.mark.parametrize("key", [0, 1, 0xDEADBEEFCAFEBABE, _U64 - 1])
def test_stream_bits_are_splitmix64_of_key_and_index(key):
    stream = sp.CounterStream(key)
    for start in (0, 5, (1 << 40) - 3):
        bits = stream.bits(start, start + 6).tolist()
        assert [b % _U64 for b in bits] == [splitmix64(key, i) for i in range(start, start + 6)]
    # a uniform number is the top 53 bits over 2^53, in [0, 1)
    u = stream.uniform(0, 6).tolist()
    assert u == [(splitmix64(key, i) >> 11) / 2.0 ** 53 for i in range(6)]


def test_stream_keys_come_from_the_parts():
    a = sp.CounterStream.of(0, "model.layer.weight", "vqa")
    assert a == sp.CounterStream.of(0, "model.layer.weight", "vqa")
    assert len({a.key, sp.CounterStream.of(1, "model.layer.weight", "vqa").key,
                sp.CounterStream.of(0, "model.layer.bias", "vqa").key,
                sp.CounterStream.of(0, "model.layer.weight", "text").key}) == 4
    assert a.child(0) != a.child(1) and a.child(0) == a.child(0)
    torch.manual_seed(5)
    first = sp.CounterStream.fresh()
    torch.manual_seed(5)
    assert sp.CounterStream.fresh() == first


def test_random_mask_is_a_function_of_key_and_index_only():
    stream = sp.CounterStream.of(3, "t", "d")
    delta = torch.randn(300, 70, generator=torch.Generator().manual_seed(0))
    mask = sp.random_mask(delta, 0.4, stream)
    assert mask.shape == delta.shape and mask.dtype == torch.bool
    # whatever the chunking
    for chunk in (1, 7, 1000, 1 << 20):
        assert torch.equal(sp.random_mask(delta, 0.4, stream, chunk=chunk), mask)
    # whatever the other entries and the values: entry i is decided by number i alone
    assert torch.equal(sp.random_mask(torch.zeros(300 * 70), 0.4, stream), mask.reshape(-1))
    assert torch.equal(sp.random_mask(torch.zeros(500), 0.4, stream),
                       mask.reshape(-1)[:500])
    assert torch.equal(mask.reshape(-1), stream.uniform(0, delta.numel()) < 0.4)
    # another key, another mask
    assert not torch.equal(sp.random_mask(delta, 0.4, sp.CounterStream.of(4, "t", "d")), mask)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.9])
def test_random_mask_keeps_the_density_independently(density):
    n = 1 << 20
    a = sp.random_mask(torch.zeros(n), density, sp.CounterStream.of(0, "w", "vqa"))
    b = sp.random_mask(torch.zeros(n), density, sp.CounterStream.of(0, "w", "text"))
    sigma = (density * (1 - density) / n) ** 0.5
    assert abs(a.float().mean().item() - density) < 5 * sigma
    # two donors' masks are independent: both kept with probability density²
    both = (a & b).float().mean().item()
    assert abs(both - density ** 2) < 5 * (density ** 2 * (1 - density ** 2) / n) ** 0.5
    # neighbours are independent too
    pairs = (a[1:] & a[:-1]).float().mean().item()
    assert abs(pairs - density ** 2) < 5 * (density ** 2 * (1 - density ** 2) / n) ** 0.5


def test_uniform_numbers_fill_the_unit_interval_evenly():
    u = sp.CounterStream(7).uniform(0, 1 << 18)
    assert u.dtype == torch.float64 and 0 <= u.min().item() and u.max().item() < 1
    counts = torch.histc(u, bins=16, min=0, max=1)
    expected = u.numel() / 16
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 40  # 15 degrees of freedom: p < 0.001 above 37.7


def test_della_mask_draws_below_its_probabilities():
    delta = torch.randn(64, 500, generator=torch.Generator().manual_seed(1))
    stream = sp.CounterStream.of(0, "w", "vqa")
    mask = sp.rank_magnitude_sampling_mask(delta, 0.5, 0.15, stream)
    probs = sp.rank_magnitude_keep_probs(delta, 0.5, 0.15)
    assert torch.equal(mask.reshape(-1), stream.uniform(0, delta.numel()) < probs.reshape(-1))
    assert torch.equal(sp.rank_magnitude_sampling_mask(delta, 0.5, 0.15, stream, chunk=9), mask)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@NEEDS_CUDA
def test_masks_have_the_same_bits_on_cpu_and_cuda():
    stream = sp.CounterStream.of(0, "model.language_model.layers.0.mlp.up_proj.weight", "vqa")
    n = 3 * (1 << 22) + 11  # several GPU chunks and a ragged end
    assert torch.equal(stream.bits(0, n, "cuda").cpu(), stream.bits(0, n))
    delta = torch.randn(700, 300, generator=torch.Generator().manual_seed(2))
    cuda = delta.cuda()
    assert torch.equal(sp.random_mask(cuda, 0.3, stream).cpu(), sp.random_mask(delta, 0.3, stream))
    assert torch.equal(sp.rank_magnitude_sampling_mask(cuda, 0.4, 0.1, stream).cpu(),
                       sp.rank_magnitude_sampling_mask(delta, 0.4, 0.1, stream))
    hist = sp.MagnitudeHistogram.of(cuda)
    assert hist == sp.MagnitudeHistogram.of(delta)
    for density in (0.1, 0.37, 0.8):
        assert torch.equal(sp.magnitude_mask(cuda, density, hist).cpu(),
                           sp.magnitude_mask(delta, density))


# ----------------------------------------------------------------------------- magnitude order


def tied_delta(n: int, seed: int) -> torch.Tensor:
    """Magnitudes with many ties and zeros, both signs."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-12, 13, (n,), generator=g).float() / 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_histogram_finds_every_order_statistic_exactly(dtype):
    for delta in (tied_delta(3001, 0), torch.randn(2048, generator=torch.Generator())):
        delta = delta.to(dtype)
        hist = sp.MagnitudeHistogram.of(delta)
        magnitudes = sp._flat_magnitudes(delta)
        ordered = torch.sort(magnitudes).values
        for k in range(1, delta.numel() + 1, 37):
            assert hist.kth_smallest(magnitudes, k).item() == ordered[k - 1].item(), k
        assert hist.kth_smallest(magnitudes, delta.numel()) == ordered[-1]
        assert hist.ends[-1] == delta.numel()


def test_histogram_masks_equal_the_top_k_for_any_density():
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(256, 300, generator=g) * 0.02, tied_delta(40_000, 1).reshape(200, 200),
              torch.zeros(50, 40)]
    for delta in deltas:
        hist = sp.ranking(sp.MAGNITUDE, delta)
        assert hist == sp.ranking(sp.MAGNITUDE_OUTLIERS, delta)
        assert hist.nbytes < 64_000
        for density in (0.0, 0.013, 0.2, 0.5, 0.731, 0.99, 1.0):
            assert torch.equal(sp.magnitude_mask(delta, density, hist),
                               sp.magnitude_mask(delta, density)), density
            for gamma in (0.0, 0.01, 0.3):
                assert torch.equal(sp.magnitude_outliers_mask(delta, density, gamma, hist),
                                   sp.magnitude_outliers_mask(delta, density, gamma))


def test_histogram_refuses_another_tensor():
    hist = sp.MagnitudeHistogram.of(torch.randn(100))
    with pytest.raises(MergeError, match="histogram of 100 entries"):
        hist.kth_smallest(torch.rand(99), 5)


def test_cached_ranks_give_the_same_della_probabilities_and_masks():
    delta = torch.randn(30, 40, 5, generator=torch.Generator().manual_seed(4))
    ranks = sp.ranking(sp.RANK_MAGNITUDE_SAMPLING, delta)
    assert ranks.dtype == torch.int16 and ranks.shape == delta.shape
    # each row (leading index) holds the ranks 0 .. 199 once, ordered as the magnitudes
    rows = ranks.reshape(30, -1).long()
    assert torch.equal(rows.sort(dim=1).values, torch.arange(200).expand(30, 200))
    mags = delta.abs().reshape(30, -1)
    assert torch.equal(mags.gather(1, rows.argsort(dim=1)), mags.sort(dim=1).values)
    stream = sp.CounterStream(9)
    for density in (0.2, 0.5):
        assert torch.equal(sp.rank_magnitude_keep_probs(delta, density, 0.15, ranks),
                           sp.rank_magnitude_keep_probs(delta, density, 0.15))
        assert torch.equal(sp.sparsify_mask(sp.RANK_MAGNITUDE_SAMPLING, delta, density=density,
                                            stream=stream, ranking=ranks),
                           sp.rank_magnitude_sampling_mask(delta, density, 0.15, stream))
    # equal magnitudes rank by position, so every device ranks them alike
    tied = torch.tensor([[0.5, -0.5, 0.1, 0.5]])
    assert sp.magnitude_ranks(tied).tolist() == [[1, 2, 0, 3]]
    assert sp.ranking(sp.RANDOM, delta) is None
