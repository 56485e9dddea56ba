"""Pure aggregation kernels: arrays and weights in, arrays out (no settings objects, no I/O).

A set of n models is given as ``rows``: n equal-length 1-D arrays, in memory or ``np.memmap``.
Kernels walk them in chunks over the parameter axis, so their extra memory is O(n · chunk)
whatever P is, and spilled models are read sequentially.

Precision rules (see AGGREGATION.md): reductions and weights in float64; distances are computed
on data centred at the reference model (the model the round started from) and accumulated in
float64, then clamped at 0 with a zero diagonal. ‖a−b‖² = ‖a‖² + ‖b‖² − 2a·b on raw float32
weights loses everything when updates are small relative to the weights; centring and float64
make it exact enough (checked against direct distances in the tests).

Preconditions (too few models for f, 2·trim ≥ n) raise :class:`StrategyError`; the
``*_requirement`` functions give the same reason without raising, for ``blocker()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.codec import Array
from common.errors import StrategyError

Rows = Sequence[Array]

# Slabs of about this size stay in L2/L3 and are big enough for BLAS to run at full speed.
_SLAB_BYTES = 8 << 20


def chunk_len(n: int, itemsize: int, slab_bytes: int = _SLAB_BYTES) -> int:
    """Parameters per chunk so that an n-row slab of ``itemsize`` values is ~``slab_bytes``."""
    return max(1024, slab_bytes // max(1, n * itemsize))


def _length(rows: Rows) -> int:
    if not rows:
        raise StrategyError("no model to aggregate")
    return int(rows[0].shape[0])


# --------------------------------------------------------------------------- weights
def normalise_weights(
    weights: Sequence[float] | Array, *, uniform: bool = False, max_ratio: float | None = None
) -> Array:
    """α_i = w_i / Σw in float64, optionally uniform or capped at ``max_ratio`` × median(w).

    The cap bounds what an inflated sample count can buy: with fewer than half of the models
    lying, the median is an honest count.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] == 0:
        raise StrategyError("no model with a positive sample count")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise StrategyError("weights must be finite and > 0")
    if uniform:
        w = np.ones_like(w)
    elif max_ratio is not None:
        w = np.minimum(w, max_ratio * float(np.median(w)))
    alpha: Array = w / w.sum()
    return alpha


def weighted_sum(rows: Rows, coeffs: Array, *, chunk: int | None = None) -> Array:
    """Σ_i coeffs_i · rows_i in float64 (one matrix-vector product per chunk)."""
    p = _length(rows)
    n = len(rows)
    c = np.asarray(coeffs, dtype=np.float64)
    if c.shape != (n,):
        raise StrategyError(f"need {n} coefficients, got shape {c.shape}")
    step = chunk or chunk_len(n, 8)
    out = np.empty(p, dtype=np.float64)
    slab = np.empty((n, min(step, p)), dtype=np.float64)
    for s in range(0, p, step):
        e = min(s + step, p)
        block = slab[:, : e - s]
        for i, row in enumerate(rows):
            np.copyto(block[i], row[s:e], casting="unsafe")
        np.matmul(c, block, out=out[s:e])
    return out


# --------------------------------------------------------------------------- distances
def centred_gram(rows: Rows, reference: Array, *, chunk: int | None = None) -> Array:
    """G_ij = (x_i − ref)·(x_j − ref), accumulated chunk by chunk in float64 (exactly symmetric)."""
    p = _length(rows)
    n = len(rows)
    if reference.shape != (p,):
        raise StrategyError(f"reference has shape {reference.shape}, models ({p},)")
    step = chunk or chunk_len(n, 8)
    gram = np.zeros((n, n), dtype=np.float64)
    slab = np.empty((n, min(step, p)), dtype=np.float64)
    ref = np.empty(min(step, p), dtype=np.float64)
    for s in range(0, p, step):
        e = min(s + step, p)
        block = slab[:, : e - s]
        r = ref[: e - s]
        np.copyto(r, reference[s:e], casting="unsafe")
        for i, row in enumerate(rows):
            np.copyto(block[i], row[s:e], casting="unsafe")
        # float32 − float32 is exact in float64 (unless magnitudes differ by over 2^29), so the
        # centred data carry no rounding error whatever the size of the weights.
        block -= r
        gram += block @ block.T  # BLAS syrk
    return (gram + gram.T) * 0.5


def sq_distances(gram: Array) -> Array:
    """Squared distances from a Gram matrix: clamped at 0, zero diagonal, exactly symmetric."""
    diag = np.diag(gram)
    d2: Array = diag[:, None] + diag[None, :] - 2.0 * gram
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return d2


def pairwise_sq_distances(rows: Rows, reference: Array, *, chunk: int | None = None) -> Array:
    return sq_distances(centred_gram(rows, reference, chunk=chunk))


# --------------------------------------------------------------------------- Krum / Bulyan
def krum_requirement(n: int, f: int, method: str = "krum") -> str | None:
    need = 2 * f + 3
    return None if n >= need else f"{method} needs n >= 2f+3 = {need} models, has {n}"


def _scores(d2: Array, neighbours: int) -> Array:
    masked = np.array(d2, dtype=np.float64)
    np.fill_diagonal(masked, np.inf)  # exclude self by index, not by sort position
    masked.sort(axis=1)  # sum in ascending order: the score depends on the multiset only
    scores: Array = masked[:, :neighbours].sum(axis=1)
    return scores


def krum_scores(d2: Array, f: int) -> Array:
    """score(i) = Σ of the n−f−2 smallest squared distances from model i to the others."""
    n = d2.shape[0]
    reason = krum_requirement(n, f)
    if reason is not None:
        raise StrategyError(reason)
    return _scores(d2, n - f - 2)


def krum_select(d2: Array, f: int, m: int = 1) -> Array:
    """Indices of the ``m`` best-scored models, best first; ties go to the lower index."""
    scores = krum_scores(d2, f)
    if not 1 <= m <= d2.shape[0] - f:
        raise StrategyError(f"multi-krum needs 1 <= m <= n - f = {d2.shape[0] - f}, has m = {m}")
    return np.argsort(scores, kind="stable")[:m]


def bulyan_requirement(n: int, f: int) -> str | None:
    need = 4 * f + 3
    return None if n >= need else f"bulyan needs n >= 4f+3 = {need} models, has {n}"


def bulyan_select(d2: Array, f: int) -> Array:
    """θ = n−2f models chosen by Krum repeated on the shrinking set, in selection order.

    The distance matrix is computed once; each round only rescores the remaining models with
    Krum's |R|−f−2 neighbours, but never fewer than two: the last rounds would otherwise score
    with one neighbour (or none), where mutual nearest neighbours tie exactly and the index,
    i.e. the arrival order, would decide which model is dropped.
    """
    n = d2.shape[0]
    reason = bulyan_requirement(n, f)
    if reason is not None:
        raise StrategyError(reason)
    remaining = np.arange(n)
    chosen: list[int] = []
    for _ in range(n - 2 * f):
        k = len(remaining)
        neighbours = min(max(k - f - 2, 2), k - 1)
        scores = _scores(d2[np.ix_(remaining, remaining)], neighbours)
        best = int(np.argmin(scores))  # first minimum: ties go to the lower index
        chosen.append(int(remaining[best]))
        remaining = np.delete(remaining, best)
    return np.asarray(chosen, dtype=np.intp)


# --------------------------------------------------------------------------- coordinate-wise
# Coordinate-wise rules gather a chunk of every model into a (chunk × n) slab and sort each row:
# NumPy's SIMD sort is faster than np.partition here (and far faster than a partition with two
# kth), and sorted rows make every per-coordinate result depend on the values only, not on the
# order the models arrived in.
def _sorted_slab(rows: Rows, s: int, e: int, out: Array) -> Array:
    block = out[: e - s]
    for i, row in enumerate(rows):
        block[:, i] = row[s:e]
    block.sort(axis=1)
    return block


def coordinate_median(rows: Rows, *, chunk: int | None = None) -> Array:
    """Per-coordinate median in the rows' dtype, bit-identical to ``np.median(axis=0)``.

    Even n: the mean of the two middle values computed in the input precision as np.median
    does, except that where that overflows (two huge values) it halves before adding.
    """
    p = _length(rows)
    n = len(rows)
    dtype = rows[0].dtype
    step = chunk or chunk_len(n, dtype.itemsize, 4 << 20)
    half = n // 2
    two = dtype.type(2)
    out = np.empty(p, dtype=dtype)
    slab = np.empty((min(step, p), n), dtype=dtype)
    for s in range(0, p, step):
        e = min(s + step, p)
        block = _sorted_slab(rows, s, e, slab)
        upper = block[:, half]
        if n % 2:
            out[s:e] = upper
            continue
        lower = block[:, half - 1]
        with np.errstate(over="ignore"):
            mid = (lower + upper) / two
        bad = ~np.isfinite(mid)
        if bad.any():
            mid[bad] = lower[bad] / two + upper[bad] / two
        out[s:e] = mid
    return out


def trim_requirement(n: int, trim: int) -> str | None:
    if 2 * trim < n:
        return None
    return f"trimmed_mean needs n > 2·trim = {2 * trim} models, has {n}"


def trimmed_mean(rows: Rows, trim: int, *, chunk: int | None = None) -> Array:
    """Per coordinate, the float64 mean of the values left after dropping ``trim`` at each end."""
    p = _length(rows)
    n = len(rows)
    reason = trim_requirement(n, trim)
    if reason is not None:
        raise StrategyError(reason)
    dtype = rows[0].dtype
    step = chunk or chunk_len(n, dtype.itemsize, 4 << 20)
    out = np.empty(p, dtype=np.float64)
    slab = np.empty((min(step, p), n), dtype=dtype)
    for s in range(0, p, step):
        e = min(s + step, p)
        block = _sorted_slab(rows, s, e, slab)
        np.sum(block[:, trim : n - trim], axis=1, dtype=np.float64, out=out[s:e])
    out /= n - 2 * trim
    return out


def bulyan_coordinates(rows: Rows, f: int, *, chunk: int | None = None) -> Array:
    """Bulyan's second stage on the θ selected rows: per coordinate, the float64 mean of the
    β = θ − 2f values closest to the median.

    The β values closest to a point form a window of consecutive sorted values; the window
    with the smallest largest distance wins, the lowest on ties, so the result depends only on
    the multiset of values (permutation invariant).
    """
    p = _length(rows)
    theta = len(rows)
    beta = theta - 2 * f
    if beta < 1:
        raise StrategyError(f"bulyan needs more than 2f = {2 * f} selected models, has {theta}")
    dtype = rows[0].dtype
    step = chunk or chunk_len(theta, 8, 4 << 20)
    out = np.empty(p, dtype=np.float64)
    slab = np.empty((min(step, p), theta), dtype=dtype)
    position = np.arange(theta)
    zero = dtype.type(0)
    for s in range(0, p, step):
        e = min(s + step, p)
        block = _sorted_slab(rows, s, e, slab)
        h = theta // 2
        if theta % 2:
            med = block[:, h].astype(np.float64)
        else:
            med = (block[:, h - 1].astype(np.float64) + block[:, h]) * 0.5
        starts = block[:, : 2 * f + 1].astype(np.float64)
        ends = block[:, beta - 1 :].astype(np.float64)
        reach = np.maximum(med[:, None] - starts, ends - med[:, None])
        first = np.argmin(reach, axis=1)[:, None]
        window = (position >= first) & (position < first + beta)
        np.sum(np.where(window, block, zero), axis=1, dtype=np.float64, out=out[s:e])
    out /= beta
    return out


# --------------------------------------------------------------------------- geometric median
@dataclass(frozen=True, slots=True)
class WeiszfeldResult:
    """The geometric median as coefficients over the models (Σ = 1) and how it was reached."""

    coeffs: Array
    iterations: int
    objective: float


def _distances_to_combination(gram: Array, coeffs: Array) -> Array:
    """‖Σ_k c_k x_k − x_i‖ for every i, from the centred Gram matrix (Σc = 1)."""
    gc = gram @ coeffs
    d2 = float(coeffs @ gc) - 2.0 * gc + np.diag(gram)
    dist: Array = np.sqrt(np.maximum(d2, 0.0))
    return dist


def weiszfeld(
    gram: Array, alpha: Array, *, nu: float, maxiter: int, ftol: float
) -> WeiszfeldResult:
    """RFA's smoothed Weiszfeld iterations (Pillutla et al. 2022) in coefficient space.

    v⁰ = Σα_i x_i; β_i = α_i / max(ν, ‖v − x_i‖); v ← Σβ_i x_i / Σβ_i; stop when
    |obj_prev − obj| ≤ ftol·obj with obj = Σα_i ‖v − x_i‖ (ftol = 0 runs all ``maxiter``
    iterations). Every v is a combination of the models, so the iterations need only the n×n
    Gram matrix; the caller forms v in one pass.
    """
    a = np.asarray(alpha, dtype=np.float64)
    coeffs = a.copy()
    dist = _distances_to_combination(gram, coeffs)
    objective = float(a @ dist)
    iterations = 0
    while iterations < maxiter:
        iterations += 1
        beta = a / np.maximum(nu, dist)
        coeffs = beta / beta.sum()
        dist = _distances_to_combination(gram, coeffs)
        previous, objective = objective, float(a @ dist)
        if ftol > 0 and abs(previous - objective) <= ftol * objective:
            break
    return WeiszfeldResult(coeffs=coeffs, iterations=iterations, objective=objective)
