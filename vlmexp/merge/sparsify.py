"""Sparsifiers for task vectors: which entries of a delta to keep, and how to rescale the rest.

Each sparsifier returns a boolean keep-mask (True = keep) over a delta; `rescale` then scales the
kept entries. Masks are separate from rescaling so that the engine can cache them and reuse them
across trials with other weights.

Random masks (DARE, DELLA) draw from a `CounterStream`: the number for an entry is a hash of the
stream's key (the engine derives it from the recipe's seed, the tensor's name and the donor) and
the entry's index, in torch integer arithmetic, so a mask is the same on the CPU and on a GPU.
What a magnitude sparsifier needs of a delta that does not depend on the density (a
`MagnitudeHistogram`, or DELLA's per-row `magnitude_ranks`) can be computed once and passed back
in as `ranking`, so that a new density costs a pass over the delta, not a new top-k or sort.

Names follow mergekit 0.1.5's `mergekit/sparsify.py` (`della_magprune` is called
`rank_magnitude_sampling` here, after DELLA's MagPrune description).

Example:
    >>> import torch
    >>> delta = torch.tensor([0.1, -3.0, 0.5, 2.0])
    >>> magnitude_mask(delta, density=0.5).tolist()
    [False, True, False, True]
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from dataclasses import dataclass

import torch

from vlmexp.errors import MergeError

MAGNITUDE = "magnitude"
RANDOM = "random"
MAGNITUDE_OUTLIERS = "magnitude_outliers"
RANK_MAGNITUDE_SAMPLING = "rank_magnitude_sampling"

SPARSIFIERS = (MAGNITUDE, RANDOM, MAGNITUDE_OUTLIERS, RANK_MAGNITUDE_SAMPLING)
DETERMINISTIC = frozenset({MAGNITUDE, MAGNITUDE_OUTLIERS})
RESCALE_MODES = ("mergekit", "paper")


# --------------------------------------------------------------------------- counter-based draws

_U64 = 1 << 64


def _signed(value: int) -> int:
    """A 64-bit unsigned value as the int64 with the same bits."""
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


# splitmix64 (Steele, Lea, Flood 2014): the state advances by the golden gamma; the output is
# the state through two xor-shift-multiply rounds
_GAMMA = _signed(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
_STREAM_CHUNK_CPU = 1 << 16  # entries per chunk: a few int64 temporaries stay in cache
_STREAM_CHUNK_GPU = 1 << 22  # fewer kernel launches; 32 MiB per temporary


def _shift_right(z: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Logical right shift of int64 `z` into `out` (torch's >> is arithmetic: mask the sign)."""
    torch.bitwise_right_shift(z, bits, out=out)
    return out.bitwise_and_((1 << (64 - bits)) - 1)


@dataclass(frozen=True)
class CounterStream:
    """Uniform numbers in [0, 1) as a pure function of a 64-bit key and an entry's index.

    Number i is splitmix64's output i from state `key`, computed with torch int64 operations
    (multiplication wraps on every device; right shifts are masked to be logical), so the CPU and
    a GPU give the same bits, and a number depends neither on how the index range is chunked nor
    on any other entry. Numbers are multiples of 2^-53, as float64.

    Example:
        >>> stream = CounterStream.of(0, "model.layers.0.mlp.up_proj.weight", "vqa")
        >>> torch.equal(stream.uniform(0, 10)[4:], stream.uniform(4, 10))
        True
    """

    key: int  # 0 <= key < 2**64

    @classmethod
    def of(cls, *parts: object) -> CounterStream:
        """A stream keyed by sha256 of `parts` (e.g. seed, tensor name, donor name)."""
        digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
        return cls(int.from_bytes(digest[:8], "little"))

    @classmethod
    def fresh(cls) -> CounterStream:
        """A stream keyed from torch's global generator (so `torch.manual_seed` repeats it)."""
        return cls(int(torch.randint(0, 1 << 62, (1,))))

    def child(self, *parts: object) -> CounterStream:
        """An independent stream derived from this one and `parts` (e.g. a donor's index)."""
        return CounterStream.of(self.key, *parts)

    def bits(self, start: int, stop: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """The raw 64-bit outputs for indices [start, stop), as int64."""
        z = torch.arange(start + 1, stop + 1, dtype=torch.int64, device=device)
        z.mul_(_GAMMA).add_(_signed(self.key))
        t = torch.empty_like(z)
        z.bitwise_xor_(_shift_right(z, 30, t)).mul_(_MIX1)
        z.bitwise_xor_(_shift_right(z, 27, t)).mul_(_MIX2)
        return z.bitwise_xor_(_shift_right(z, 31, t))

    def uniform(self, start: int, stop: int,
                device: str | torch.device = "cpu") -> torch.Tensor:
        """Uniform float64 numbers in [0, 1) for indices [start, stop): the top 53 bits."""
        z = self.bits(start, stop, device)
        return _shift_right(z, 11, z).to(torch.float64).mul_(2.0 ** -53)


def _stream_chunk(device: torch.device) -> int:
    return _STREAM_CHUNK_CPU if device.type == "cpu" else _STREAM_CHUNK_GPU


def _draw(delta: torch.Tensor, stream: CounterStream | None, below: float | torch.Tensor,
          chunk: int | None) -> torch.Tensor:
    """Keep-mask of delta's shape: entry i is kept when uniform number i < below (or below[i])."""
    stream = stream if stream is not None else CounterStream.fresh()
    n = delta.numel()
    keep = torch.empty(n, dtype=torch.bool, device=delta.device)
    step = chunk or _stream_chunk(delta.device)
    flat_below = below.reshape(-1) if isinstance(below, torch.Tensor) else None
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        bound = flat_below[lo:hi] if flat_below is not None else below
        torch.lt(stream.uniform(lo, hi, delta.device), bound, out=keep[lo:hi])
    return keep.reshape(delta.shape)


# --------------------------------------------------------------------------- magnitude order


def _kth_smallest(magnitudes: torch.Tensor, k: int,
                  histogram: MagnitudeHistogram | None = None) -> torch.Tensor:
    """The k-th smallest value (1-based) of a flat tensor, as a 0-d tensor (O(n), no full sort).

    With the magnitudes' histogram, a kthvalue over the one bucket that holds it.
    """
    if histogram is not None:
        return histogram.kth_smallest(magnitudes, k)
    return torch.kthvalue(magnitudes, k).values


def _bit_pattern(magnitudes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Non-negative floats as integers of the same order, and the shift to a bucket id.

    A bucket is 1/32 of a power of two (5 mantissa bits), so a bell-shaped delta puts at most a
    few per cent of its entries in one bucket.
    """
    if magnitudes.dtype == torch.float64:
        return magnitudes.view(torch.int64), 52 - 5
    return magnitudes.view(torch.int32), 23 - 5


@dataclass(frozen=True)
class MagnitudeHistogram:
    """How many magnitudes of a delta fall in each bucket: the density-independent part of a
    magnitude top-k, for `magnitude_mask` and `magnitude_outliers_mask`.

    Buckets are ranges of the magnitudes' bit patterns (for non-negative floats the bits order
    as the values do), so membership is exact. The k-th smallest magnitude lies in the bucket
    where the running count passes k: one pass selects that bucket's entries and a kthvalue
    over them finds it; ties and any distribution are handled exactly (a bucket holding most
    entries, e.g. zeros, only makes it as slow as a full kthvalue). Small: a few kB per tensor.
    """

    numel: int
    buckets: tuple[int, ...]  # ids of the non-empty buckets, ascending
    ends: tuple[int, ...]  # ends[i]: entries in buckets[: i + 1]

    @classmethod
    def of(cls, delta: torch.Tensor) -> MagnitudeHistogram:
        bits, shift = _bit_pattern(_flat_magnitudes(delta))
        counts = torch.bincount((bits >> shift).reshape(-1)).cpu()
        ids = counts.nonzero().reshape(-1)
        return cls(delta.numel(), tuple(ids.tolist()), tuple(counts[ids].cumsum(0).tolist()))

    @property
    def nbytes(self) -> int:
        return 16 * len(self.buckets) + 64

    def kth_smallest(self, magnitudes: torch.Tensor, k: int) -> torch.Tensor:
        """The k-th smallest (1-based) of `magnitudes`, the flat magnitudes it was built from."""
        if magnitudes.numel() != self.numel or not 1 <= k <= self.numel:
            raise MergeError(f"magnitude histogram of {self.numel} entries asked for entry {k} "
                             f"of {magnitudes.numel()}")
        i = bisect_right(self.ends, k - 1)
        below = self.ends[i - 1] if i else 0
        bits, shift = _bit_pattern(magnitudes)
        inside = bits >= self.buckets[i] << shift
        upper = (self.buckets[i] + 1) << shift
        if upper <= torch.iinfo(bits.dtype).max:  # (the last bucket, of NaNs, has no upper end)
            inside &= bits < upper
        return torch.kthvalue(magnitudes[inside], k - below).values


def _flat_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    magnitudes = delta.detach().abs().reshape(-1)
    # kthvalue is not implemented for half precision on every device; ranks are the same in fp32.
    return magnitudes if magnitudes.dtype in (torch.float32, torch.float64) else magnitudes.float()


def magnitude_mask(delta: torch.Tensor, density: float,
                   histogram: MagnitudeHistogram | None = None) -> torch.Tensor:
    """Keep the `max(1, int(density * n))` entries of largest magnitude (TIES' trim step).

    As mergekit: density >= 1 keeps everything, density <= 0 keeps nothing. The threshold is found
    with `torch.kthvalue` (over one bucket, given the delta's `MagnitudeHistogram`); entries tied
    with it are all kept (mergekit breaks ties by sort order).
    """
    n = delta.numel()
    if density >= 1 or n == 0:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    if density <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    k = max(1, int(density * n))
    magnitudes = _flat_magnitudes(delta)
    threshold = _kth_smallest(magnitudes, n - k + 1, histogram)
    return (magnitudes >= threshold).reshape(delta.shape)


def magnitude_outliers_mask(delta: torch.Tensor, density: float, gamma: float,
                            histogram: MagnitudeHistogram | None = None) -> torch.Tensor:
    """Model Breadcrumbs: drop the `int(gamma * n)` largest entries, then the smallest.

    Keeps `int(density * n)` entries, those ranked just below the removed outliers; when
    density + gamma > 1 the outlier removal shrinks so that the density is met (as mergekit).

    Difference from mergekit 0.1.5: where `int(density * n) == 0` (a small tensor, e.g. a norm
    vector, with a low density) mergekit keeps nothing and zeroes the whole delta; here the delta
    is kept intact, since the sparsifier cannot express any density on so few entries.
    """
    n = delta.numel()
    target = int(density * n)
    if density >= 1 or n == 0 or target == 0:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    magnitudes = _flat_magnitudes(delta)
    mask = magnitudes <= _kth_smallest(magnitudes, n_bottom + target, histogram)
    if n_bottom > 0:
        mask &= magnitudes > _kth_smallest(magnitudes, n_bottom, histogram)
    return mask.reshape(delta.shape)


def random_mask(delta: torch.Tensor, density: float, stream: CounterStream | None = None, *,
                chunk: int | None = None) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`.

    Entry i is kept when `stream`'s number i is below `density` (a fresh stream if None);
    `chunk` entries are drawn at a time (the mask does not depend on it).
    """
    if density >= 1:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    return _draw(delta, stream, float(density), chunk)


def _rank_rows(delta: torch.Tensor) -> torch.Tensor:
    """View of `delta` as rows for DELLA's ranking: 1-D is one row, N-D is [shape[0], -1]."""
    if delta.dim() < 2:
        return delta.reshape(1, -1)
    return delta.reshape(delta.shape[0], -1)


def magnitude_ranks(delta: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank within its row (0 = smallest), in delta's shape: the
    density-independent part of DELLA's keep probabilities.

    Rows are the last dimension of 2-D tensors and the whole of 1-D ones (as mergekit); an N-D
    tensor is ranked per leading index over its flattened rest (mergekit ranks along dim 1).
    Equal magnitudes rank by position (a stable sort), the same on every device. Held as int16
    where rows are short enough, else int32.
    """
    rows = _rank_rows(delta.detach())
    width = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    dtype = torch.int16 if width <= 1 << 15 else torch.int32
    positions = torch.arange(width, dtype=dtype, device=delta.device)
    ranks = torch.empty(rows.shape, dtype=dtype, device=delta.device)
    ranks.scatter_(1, order, positions.expand_as(ranks))
    return ranks.reshape(delta.shape)


def rank_magnitude_keep_probs(delta: torch.Tensor, density: float, epsilon: float,
                              ranks: torch.Tensor | None = None) -> torch.Tensor:
    """DELLA MagPrune keep probabilities: linear in the magnitude rank within each row.

    The smallest entry of a row gets `density - epsilon`, the largest `density + epsilon`; rows
    as `magnitude_ranks` (given as `ranks`, or computed here).
    """
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeError(
            f"della: density ± epsilon must lie in (0, 1), got density={density}, "
            f"epsilon={epsilon}"
        )
    if ranks is None:
        ranks = magnitude_ranks(delta)
    width = _rank_rows(ranks).shape[1]
    # rank 0 .. width-1 → 0 .. 1; a row of one entry gets the middle probability, not 0/0
    scale = 2 * epsilon / (width - 1) if width > 1 else 0.0
    probs = ranks.to(torch.float32, copy=True).mul_(scale)
    probs.add_(density - epsilon if width > 1 else density)
    return probs.reshape(delta.shape)


def rank_magnitude_sampling_mask(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    stream: CounterStream | None = None,
    ranks: torch.Tensor | None = None,
    *,
    chunk: int | None = None,
) -> torch.Tensor:
    """DELLA: keep each entry with its rank-based probability (see `rank_magnitude_keep_probs`):
    entry i is kept when `stream`'s number i is below its probability."""
    if density >= 1:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    if density <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    probs = rank_magnitude_keep_probs(delta, density, epsilon, ranks)
    return _draw(delta, stream, probs, chunk)


def ranking(sparsification: str, delta: torch.Tensor) -> MagnitudeHistogram | torch.Tensor | None:
    """What `sparsification`'s mask needs of `delta` whatever the density (None: nothing).

    A `MagnitudeHistogram` for magnitude and magnitude_outliers, `magnitude_ranks` for
    rank_magnitude_sampling; pass it back to `sparsify_mask` as `ranking`.
    """
    if sparsification in (MAGNITUDE, MAGNITUDE_OUTLIERS):
        return MagnitudeHistogram.of(delta)
    if sparsification == RANK_MAGNITUDE_SAMPLING:
        return magnitude_ranks(delta)
    return None


def sparsify_mask(
    sparsification: str,
    delta: torch.Tensor,
    *,
    density: float,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    stream: CounterStream | None = None,
    ranking: MagnitudeHistogram | torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The keep-mask of `delta` under `sparsification`, or None where everything is kept.

    `stream`: the random numbers of DARE and DELLA (a fresh stream if None). `ranking`: this
    delta's `ranking(sparsification, delta)`, when the caller kept it (computed here if None).
    """
    if density >= 1:
        return None
    if sparsification == MAGNITUDE:
        return magnitude_mask(delta, density, ranking)
    if sparsification == RANDOM:
        return random_mask(delta, density, stream)
    if sparsification == MAGNITUDE_OUTLIERS:
        return magnitude_outliers_mask(delta, density, gamma, ranking)
    if sparsification == RANK_MAGNITUDE_SAMPLING:
        return rank_magnitude_sampling_mask(delta, density, epsilon, stream, ranking)
    raise MergeError(f"unknown sparsification {sparsification!r}; known: {', '.join(SPARSIFIERS)}")

