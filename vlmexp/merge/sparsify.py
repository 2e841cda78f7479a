"""Sparsifiers for task vectors: which entries of a delta to keep, and how to rescale the rest.

Each sparsifier returns a boolean keep-mask (True = keep) over a delta; `rescale` then scales the
kept entries. Masks are separate from rescaling so that the engine can cache deterministic masks
(magnitude, magnitude_outliers) and reuse them across trials with other weights.

Names follow mergekit 0.1.5's `mergekit/sparsify.py` (`della_magprune` is called
`rank_magnitude_sampling` here, after DELLA's MagPrune description).

Example:
    >>> import torch
    >>> delta = torch.tensor([0.1, -3.0, 0.5, 2.0])
    >>> magnitude_mask(delta, density=0.5).tolist()
    [False, True, False, True]
"""

from __future__ import annotations

import torch

from vlmexp.errors import MergeError

MAGNITUDE = "magnitude"
RANDOM = "random"
MAGNITUDE_OUTLIERS = "magnitude_outliers"
RANK_MAGNITUDE_SAMPLING = "rank_magnitude_sampling"

SPARSIFIERS = (MAGNITUDE, RANDOM, MAGNITUDE_OUTLIERS, RANK_MAGNITUDE_SAMPLING)
DETERMINISTIC = frozenset({MAGNITUDE, MAGNITUDE_OUTLIERS})
RESCALE_MODES = ("mergekit", "paper")


def _kth_smallest(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of a flat tensor, as a 0-d tensor (O(n), no full sort)."""
    return torch.kthvalue(magnitudes, k).values


def _flat_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    magnitudes = delta.detach().abs().reshape(-1)
    # kthvalue is not implemented for half precision on every device; ranks are the same in fp32.
    return magnitudes if magnitudes.dtype in (torch.float32, torch.float64) else magnitudes.float()


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `max(1, int(density * n))` entries of largest magnitude (TIES' trim step).

    As mergekit: density >= 1 keeps everything, density <= 0 keeps nothing. The threshold is found
    with `torch.kthvalue`; entries tied with it are all kept (mergekit breaks ties by sort order).
    """
    n = delta.numel()
    if density >= 1 or n == 0:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    if density <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    k = max(1, int(density * n))
    magnitudes = _flat_magnitudes(delta)
    threshold = _kth_smallest(magnitudes, n - k + 1)
    return (magnitudes >= threshold).reshape(delta.shape)


def magnitude_outliers_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
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
    mask = magnitudes <= _kth_smallest(magnitudes, n_bottom + target)
    if n_bottom > 0:
        mask &= magnitudes > _kth_smallest(magnitudes, n_bottom)
    return mask.reshape(delta.shape)


def random_mask(
    delta: torch.Tensor, density: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`."""
    if density >= 1:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    uniform = torch.rand(delta.shape, generator=generator, device=delta.device)
    return uniform < density


def _rank_rows(delta: torch.Tensor) -> torch.Tensor:
    """View of `delta` as rows for DELLA's ranking: 1-D is one row, N-D is [shape[0], -1]."""
    if delta.dim() < 2:
        return delta.reshape(1, -1)
    return delta.reshape(delta.shape[0], -1)


def rank_magnitude_keep_probs(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities: linear in the magnitude rank within each row.

    The smallest entry of a row gets `density - epsilon`, the largest `density + epsilon`.
    Rows are the last dimension of 2-D tensors and the whole of 1-D ones (as mergekit); an N-D
    tensor is ranked per leading index over its flattened rest (mergekit ranks along dim 1).
    """
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeError(
            f"della: density ± epsilon must lie in (0, 1), got density={density}, "
            f"epsilon={epsilon}"
        )
    rows = _rank_rows(delta.detach())
    width = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1)
    positions = torch.arange(width, dtype=torch.float32, device=delta.device)
    ranks = torch.empty(rows.shape, dtype=torch.float32, device=delta.device)
    ranks.scatter_(1, order, positions.expand_as(ranks))
    # rank 0 .. width-1 → 0 .. 1; a row of one entry gets the middle probability, not 0/0
    scale = 2 * epsilon / (width - 1) if width > 1 else 0.0
    probs = ranks.mul_(scale).add_(density - epsilon if width > 1 else density)
    return probs.reshape(delta.shape)


def rank_magnitude_sampling_mask(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA: keep each entry with its rank-based probability (see `rank_magnitude_keep_probs`)."""
    if density >= 1:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    if density <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    probs = rank_magnitude_keep_probs(delta, density, epsilon)
    uniform = torch.rand(delta.shape, generator=generator, device=delta.device)
    return uniform < probs


def sparsify_mask(
    sparsification: str,
    delta: torch.Tensor,
    *,
    density: float,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """The keep-mask of `delta` under `sparsification`, or None where everything is kept."""
    if density >= 1:
        return None
    if sparsification == MAGNITUDE:
        return magnitude_mask(delta, density)
    if sparsification == RANDOM:
        return random_mask(delta, density, generator)
    if sparsification == MAGNITUDE_OUTLIERS:
        return magnitude_outliers_mask(delta, density, gamma)
    if sparsification == RANK_MAGNITUDE_SAMPLING:
        return rank_magnitude_sampling_mask(delta, density, epsilon, generator)
    raise MergeError(f"unknown sparsification {sparsification!r}; known: {', '.join(SPARSIFIERS)}")


def apply_mask(
    delta: torch.Tensor,
    mask: torch.Tensor,
    *,
    rescale: bool,
    rescale_mode: str,
    sparsification: str,
    density: float,
    epsilon: float = 0.15,
) -> torch.Tensor:
    """`delta * mask` in a fresh tensor, rescaled when `rescale` is true.

    rescale_mode "mergekit": multiply by ||delta||_1 / ||delta * mask||_1 over the whole tensor
    (skipped where either norm is below 1e-7), as mergekit 0.1.5 does.
    rescale_mode "paper": divide each kept entry by its keep probability (DARE's 1/p; DELLA's
    per-entry 1/p_i; `density` for the deterministic sparsifiers, keeping the expected sum).
    """
    kept = delta * mask
    if not rescale:
        return kept
    if rescale_mode == "mergekit":
        before = delta.abs().sum()
        after = kept.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            kept.mul_(before / after)
        return kept
    if rescale_mode == "paper":
        if sparsification == RANK_MAGNITUDE_SAMPLING:
            return kept.div_(rank_magnitude_keep_probs(delta, density, epsilon).to(kept.dtype))
        return kept.div_(density) if density > 0 else kept
    raise MergeError(f"unknown rescale_mode {rescale_mode!r}; known: {', '.join(RESCALE_MODES)}")
