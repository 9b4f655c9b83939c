"""Statistics helpers for the analysis measures: bootstrap CIs, Spearman, Kendall's W.

All functions are deterministic: randomness comes only from `seed` through a
numpy PCG64 generator, so the same inputs and seed give the same numbers.
Spearman and Kendall's W are checked against scipy in tests/analysis/test_stats.py.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from prunesae_jax.errors import InputError


class Interval(NamedTuple):
    """A point estimate with a (percentile) confidence interval."""

    estimate: float
    low: float
    high: float


def _check_boot(n_boot: int, ci: float) -> None:
    if int(n_boot) < 1:
        raise InputError(f"n_boot={n_boot!r}; expected an integer >= 1")
    if not 0.0 < float(ci) < 1.0:
        raise InputError(f"ci={ci!r}; expected a level strictly between 0 and 1, e.g. 0.95")


def _percentile_interval(estimate: float, boots: np.ndarray, ci: float) -> Interval:
    boots = np.asarray(boots, dtype=np.float64)
    boots = boots[np.isfinite(boots)]
    if boots.size == 0:
        return Interval(float(estimate), float("nan"), float("nan"))
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return Interval(float(estimate), float(lo), float(hi))


# Bootstrap indices are drawn in chunks of about this many entries, so that resampling
# 50k features 2000 times never holds a [n_boot, n] index array at once.
_CHUNK_ELEMS = 2**22


def _index_chunks(n: int, n_boot: int, seed: int):
    """Yields [k, n] arrays of resampling indices, n_boot rows in all; the same stream for
    every statistic, so bootstrap_ci and spearman_ci agree draw for draw."""
    rng = np.random.Generator(np.random.PCG64(seed))
    rows = max(1, _CHUNK_ELEMS // max(n, 1))  # rows per chunk
    done = 0
    while done < n_boot:
        k = min(rows, n_boot - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def bootstrap_ci(
    data,
    statistic: Callable[[np.ndarray], float] | None = None,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap CI of `statistic(data)`, resampling axis 0 of `data` with replacement.

    data: [n, ...]; rows are the exchangeable units (seed pairs, features, ...).
    statistic: maps a resampled [n, ...] array to a float; None = the mean over axis 0
      (vectorised). For a paired statistic stack the columns, e.g.
      `bootstrap_ci(np.stack([x, y], 1), lambda a: spearman(a[:, 0], a[:, 1]))`
      (spearman_ci computes exactly that, faster).
    Returns Interval(statistic(data), low, high); non-finite bootstrap replicates
    (e.g. a constant resample for Spearman) are dropped. With n == 1 the interval
    collapses onto the estimate.
    """
    _check_boot(n_boot, ci)
    data = np.asarray(data)
    if data.ndim == 0 or data.shape[0] == 0:
        raise InputError(f"data shape {data.shape}; expected at least one row along axis 0")
    n = data.shape[0]
    boots = []
    if statistic is None:
        values = data.astype(np.float64).reshape(n, -1).mean(axis=1)  # per-row mean; equal row sizes
        estimate = float(np.mean(values))
        for idx in _index_chunks(n, int(n_boot), seed):
            boots.append(values[idx].mean(axis=1))
    else:
        estimate = float(statistic(data))
        for idx in _index_chunks(n, int(n_boot), seed):
            boots.append(np.array([float(statistic(data[i])) for i in idx]))
    return _percentile_interval(estimate, np.concatenate(boots), ci)


def spearman_ci(x, y, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> Interval:
    """Spearman correlation with a percentile bootstrap CI over (x, y) pairs.

    Same draws and numbers as `bootstrap_ci(np.stack([x, y], 1), lambda a: spearman(a[:, 0], a[:, 1]))`,
    but without sorting each resample: values are replaced once by their index among the
    unique values, and a resample's average ranks follow from a bincount and a cumsum
    (O(n) per resample instead of O(n log n)).
    """
    _check_boot(n_boot, ci)
    x, y = _paired(x, y)
    n = x.shape[0]
    if n == 0:
        raise InputError("x and y are empty; expected at least one pair")
    estimate = spearman(x, y)
    ux, ix = np.unique(x, return_inverse=True)
    uy, iy = np.unique(y, return_inverse=True)
    mean_rank = (n + 1) / 2.0

    def ranks(codes: np.ndarray, n_unique: int) -> np.ndarray:
        c = np.bincount(codes, minlength=n_unique).astype(np.float64)
        avg = np.cumsum(c) - c + (c + 1.0) / 2.0  # average 1-based rank of each unique value
        return avg[codes] - mean_rank

    boots = []
    for idx in _index_chunks(n, int(n_boot), seed):
        for row in idx:
            rx = ranks(ix[row], ux.shape[0])
            ry = ranks(iy[row], uy.shape[0])
            # Elementwise sums, not np.dot: BLAS threads thrash on a shared machine for 1-D dots.
            den = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
            boots.append(min(1.0, max(-1.0, float(np.sum(rx * ry) / den))) if den > 0 else np.nan)
    return _percentile_interval(estimate, np.array(boots), ci)


def cluster_bootstrap_ci(
    clusters: Sequence[Any],
    statistic: Callable[[list], float],
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Cluster (block) bootstrap CI: resample whole clusters with replacement.

    clusters: one object per cluster (for fragility, one seed's per-feature arrays);
      observations inside a cluster are correlated, so the cluster is the resampling
      unit (Cameron, Gelbach & Miller 2008; the paper's "clusters = seeds").
    statistic: maps a list of clusters (length len(clusters)) to a float.
    Returns Interval(statistic(clusters), low, high); with one cluster the interval
    collapses onto the estimate.
    """
    _check_boot(n_boot, ci)
    clusters = list(clusters)
    if not clusters:
        raise InputError("clusters is empty; expected at least one cluster")
    k = len(clusters)
    estimate = float(statistic(clusters))
    boots = [float(statistic([clusters[j] for j in row])) for idx in _index_chunks(k, int(n_boot), seed) for row in idx]
    return _percentile_interval(estimate, boots, ci)


def rankdata(x) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata 'average')."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise InputError(f"x has shape {x.shape}; expected a 1-D array")
    n = x.shape[0]
    # Average ranks do not depend on the order among equal values, so any sort kind works.
    order = np.argsort(x)
    xs = x[order]
    # Boundaries of runs of equal values in sorted order.
    new_run = np.concatenate([[True], xs[1:] != xs[:-1]]) if n else np.zeros(0, bool)
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate([starts[1:], [n]])
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1 .. end
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = avg[run_id]
    return ranks


def _paired(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise InputError(f"x shape {x.shape}, y shape {y.shape}; expected two 1-D arrays of equal length")
    return x, y


def pearson(x, y) -> float:
    """Pearson correlation; nan when either input is constant or has fewer than 2 values."""
    x, y = _paired(x, y)
    if x.shape[0] < 2:
        return float("nan")
    xc = x - x.mean()
    yc = y - y.mean()
    den = np.sqrt(np.sum(xc * xc) * np.sum(yc * yc))
    if den == 0.0:
        return float("nan")
    return float(np.clip(np.sum(xc * yc) / den, -1.0, 1.0))


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (ties handled as
    in scipy.stats.spearmanr); nan when either input is constant."""
    x, y = _paired(x, y)
    return pearson(rankdata(x), rankdata(y))


def kendalls_w(ratings) -> float:
    """Kendall's coefficient of concordance W with the tie correction.

    ratings: [m raters, n items]; each rater's scores are ranked over the items
      (average ranks for ties). Here the raters are tau levels and the items are
      seed pairs or conditions.
    W = 12 S / (m^2 (n^3 - n) - m sum_j T_j), S = sum_i (R_i - mean R)^2,
    R_i = sum of item i's ranks, T_j = sum over tie groups of rater j of (t^3 - t)
    (Kendall & Babington Smith 1939; equals Friedman's chi^2 / (m (n - 1))).
    1 = all raters rank the items identically; nan when undefined (n < 2 or every
    rater ties all items).
    """
    r = np.asarray(ratings, dtype=np.float64)
    if r.ndim != 2:
        raise InputError(f"ratings shape {r.shape}; expected [m raters, n items]")
    m, n = r.shape
    if m < 1 or n < 2:
        return float("nan")
    ranks = np.stack([rankdata(row) for row in r])  # [m, n]
    totals = ranks.sum(axis=0)
    s = float(np.sum((totals - totals.mean()) ** 2))
    ties = 0.0
    for row in r:
        _, counts = np.unique(row, return_counts=True)
        ties += float(np.sum(counts.astype(np.float64) ** 3 - counts))
    den = m * m * (n**3 - n) - m * ties
    if den <= 0.0:
        return float("nan")
    return 12.0 * s / den
