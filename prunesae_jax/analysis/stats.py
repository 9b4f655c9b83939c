"""Statistics helpers for the analysis measures: bootstrap CIs, Spearman, Kendall's W.

All functions are deterministic: randomness comes only from `seed` through a
numpy PCG64 generator, so the same inputs and seed give the same numbers.

scipy.stats where it gives the same numbers: ranks are scipy.stats.rankdata. Our own code
stays where scipy has no equivalent (Kendall's W, the cluster and seed bootstraps) or where
scipy's numbers differ from ours in the last bits, which would change results.json:
`pearson` (scipy.stats.pearsonr scales before the dot product), `spearman` (spearmanr goes
through np.corrcoef; ours is `pearson` of scipy's ranks), `bootstrap_ci` (see there) and
`spearman_ci` (scipy.stats.bootstrap with a spearmanr statistic is about 8x slower on 5000
pairs). tests/analysis/test_analysis_stats.py checks each against scipy.

Seed-level bootstraps. A study trains few SAE seeds (often 3), and its measures are
values of seed PAIRS: pairs that share a seed are not independent, so resampling pairs
overstates the information. `seed_bootstrap_ci` (pairs within one seed set, e.g. seed
stability), `two_way_bootstrap_ci` (dense seed x pruned seed, e.g. survival),
`matched_bootstrap_ci` (pairs (s, s)) and `seed_difference_ci` (a difference of two
conditions that share the dense seeds) resample SEEDS and weight each original pair by
the multiplicity of its seeds in the resample. With fewer than FEW_SEEDS seeds a
percentile CI is rough, so their results (SeedInterval) carry the min and max of the
pair values for the report to print beside the CI.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import scipy.stats

from prunesae_jax.analysis.checks import check_finite
from prunesae_jax.errors import InputError

# Below this many seeds the report prints the range of the pair values beside a seed CI.
FEW_SEEDS = 5


class Interval(NamedTuple):
    """A point estimate with a (percentile) confidence interval."""

    estimate: float
    low: float
    high: float


class SeedInterval(NamedTuple):
    """A seed-bootstrap estimate: Interval fields first, then the range of the values it
    averages (min, max: the pair values, or per-dense-seed differences for
    seed_difference_ci) and n_seeds, the size of the smallest resampled seed set.
    `_asdict()` gives the JSON form {estimate, low, high, min, max, n_seeds}."""

    estimate: float
    low: float
    high: float
    min: float
    max: float
    n_seeds: int

    @property
    def interval(self) -> Interval:
        return Interval(self.estimate, self.low, self.high)

    @property
    def few_seeds(self) -> bool:
        """True when the CI rests on fewer than FEW_SEEDS seeds (print min / max beside it)."""
        return self.n_seeds < FEW_SEEDS


def _check_boot(n_boot: int, ci: float) -> None:
    if int(n_boot) < 1:
        raise InputError(f'n_boot={n_boot!r}; expected an integer >= 1')
    if not 0.0 < float(ci) < 1.0:
        raise InputError(f'ci={ci!r}; expected a level strictly between 0 and 1, e.g. 0.95')


def _percentile_interval(estimate: float, boots: np.ndarray, ci: float) -> Interval:
    boots = np.asarray(boots, dtype=np.float64)
    boots = boots[np.isfinite(boots)]
    if boots.size == 0:
        return Interval(float(estimate), float('nan'), float('nan'))
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

    This is scipy.stats.bootstrap(method='percentile') with the same PCG64 generator: the
    same resamples and the same bootstrap distribution. It is not scipy's function because
    scipy (1.17) takes the percentiles with scipy.stats.quantile, which differs from
    np.quantile in the last bits (in about half of the random cases tried), refuses n == 1 and
    keeps non-finite replicates; and it builds the [n_boot, n] index array in one piece
    unless batched.
    """
    _check_boot(n_boot, ci)
    data = np.asarray(data)
    if data.ndim == 0 or data.shape[0] == 0:
        raise InputError(f'data shape {data.shape}; expected at least one row along axis 0')
    check_finite(data, 'data', 'finite values to resample')
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
        raise InputError('x and y are empty; expected at least one pair')
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


def difference_ci(a, b, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap CI of mean(a) - mean(b) for two independent samples: each
    resample draws a's values and then b's with replacement, from one PCG64 stream.

    For values whose seed pairs are not known (the report's fallback); when they are, use
    seed_difference_ci, which resamples the seeds the two conditions share.
    """
    _check_boot(n_boot, ci)
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise InputError(f'a has {a.size} and b has {b.size} values; expected at least one value in each')
    check_finite(a, 'a', 'finite values to resample')
    check_finite(b, 'b', 'finite values to resample')
    n_boot = int(n_boot)
    rng = np.random.Generator(np.random.PCG64(seed))
    boots = a[rng.integers(0, a.size, (n_boot, a.size))].mean(1) - b[rng.integers(0, b.size, (n_boot, b.size))].mean(1)
    return _percentile_interval(float(a.mean() - b.mean()), boots, ci)


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
        raise InputError('clusters is empty; expected at least one cluster')
    k = len(clusters)
    estimate = float(statistic(clusters))
    boots = [float(statistic([clusters[j] for j in row])) for idx in _index_chunks(k, int(n_boot), seed) for row in idx]
    return _percentile_interval(estimate, boots, ci)


# ----------------------------------------------------------------------------- seed bootstraps


def _pair_table(values, pairs, n_rows: int, n_cols: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sums [n_rows, n_cols], counts [n_rows, n_cols], values [P]) of the pair values;
    a pair listed twice counts twice."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    p = np.asarray(pairs)
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] != v.shape[0]:
        raise InputError(
            f'{name}: pairs shape {p.shape} for {v.shape[0]} values; expected [P, 2] seed indices, one row per value'
        )
    if v.shape[0] == 0:
        raise InputError(f'{name}: no pair values; expected at least one pair')
    check_finite(v, f'{name} values', 'finite pair values (one per seed pair)')
    if not np.issubdtype(p.dtype, np.integer):
        if not np.all(np.isfinite(p)) or np.any(p != np.round(p)):
            raise InputError(f'{name}: pairs hold non-integer entries; expected seed indices')
        p = p.astype(np.int64)
    for col, n in ((0, n_rows), (1, n_cols)):
        if p[:, col].min() < 0 or p[:, col].max() >= n:
            raise InputError(
                f'{name}: pairs column {col} spans [{p[:, col].min()}, {p[:, col].max()}]; '
                f'expected seed indices in [0, {n})'
            )
    sums = np.zeros((n_rows, n_cols))
    counts = np.zeros((n_rows, n_cols))
    np.add.at(sums, (p[:, 0], p[:, 1]), v)
    np.add.at(counts, (p[:, 0], p[:, 1]), 1.0)
    return sums, counts, v


def _check_n(n, name: str) -> int:
    if isinstance(n, bool) or int(n) != n or int(n) < 1:
        raise InputError(f'{name}={n!r}; expected a positive number of seeds')
    return int(n)


def _seed_counts(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """[n_boot, n] multiplicity of each seed in n_boot resamples of n seeds with replacement."""
    idx = rng.integers(0, n, size=(n_boot, n))
    flat = (idx + n * np.arange(n_boot)[:, None]).reshape(-1)
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _weighted_mean(sums, counts, rows, cols) -> np.ndarray:
    """Per resample: sum_ij r_i c_j sums_ij / sum_ij r_i c_j counts_ij (nan with no valid pair)."""
    num = np.einsum('bi,ij,bj->b', rows, sums, cols)
    den = np.einsum('bi,ij,bj->b', rows, counts, cols)
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def seed_bootstrap_ci(
    pair_values, pairs, n_seeds: int, n_boot: int = 2000, ci: float = 0.95, seed: int = 0
) -> SeedInterval:
    """Percentile CI of the mean of pair values, resampling SEEDS (one seed set).

    pair_values [P]: one value per unordered pair of distinct seeds (e.g. the MNN matched
      fraction of seed i's SAE against seed j's); pairs [P, 2]: the seeds (i, j), i != j,
      indices in [0, n_seeds).
    Each resample draws n_seeds seeds with replacement; an original pair (i, j) enters
    with weight count(i) * count(j), so a pair counts only when both of its (distinct)
    seeds were drawn and a seed drawn twice counts twice; a seed drawn twice is never
    paired with itself. Resamples without a valid pair (one seed drawn n times) are
    dropped. Estimate = the plain mean of the pair values.
    """
    _check_boot(n_boot, ci)
    n = _check_n(n_seeds, 'n_seeds')
    sums, counts, v = _pair_table(pair_values, pairs, n, n, 'seed_bootstrap_ci')
    if np.any(np.diag(counts) > 0):
        raise InputError('seed_bootstrap_ci: a pair (s, s) pairs a seed with itself; expected distinct seeds i != j')
    c = _seed_counts(np.random.Generator(np.random.PCG64(seed)), n, int(n_boot))
    iv = _percentile_interval(float(v.mean()), _weighted_mean(sums, counts, c, c), ci)
    return SeedInterval(*iv, float(v.min()), float(v.max()), n)


def two_way_bootstrap_ci(
    pair_values, pairs, n_a: int, n_b: int, n_boot: int = 2000, ci: float = 0.95, seed: int = 0
) -> SeedInterval:
    """Percentile CI of the mean of pair values over two independent seed sets.

    pair_values [P]: the value of (seed i of set A, seed j of set B), e.g. the survival of
      dense seed i's features in pruned seed j's SAE; pairs [P, 2]: (i, j), i in [0, n_a),
      j in [0, n_b); any subset of the n_a x n_b grid (e.g. only i != j).
    Each resample draws A's seeds and B's seeds with replacement, independently; pair
    (i, j) enters with weight count_A(i) * count_B(j). Resamples that keep no listed pair
    are dropped. n_seeds of the result = min(n_a, n_b).
    """
    _check_boot(n_boot, ci)
    n_a, n_b = _check_n(n_a, 'n_a'), _check_n(n_b, 'n_b')
    sums, counts, v = _pair_table(pair_values, pairs, n_a, n_b, 'two_way_bootstrap_ci')
    rng = np.random.Generator(np.random.PCG64(seed))
    ca = _seed_counts(rng, n_a, int(n_boot))
    cb = _seed_counts(rng, n_b, int(n_boot))
    iv = _percentile_interval(float(v.mean()), _weighted_mean(sums, counts, ca, cb), ci)
    return SeedInterval(*iv, float(v.min()), float(v.max()), min(n_a, n_b))


def matched_bootstrap_ci(values, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> SeedInterval:
    """Percentile CI of the mean of matched-pair values: values[s] belongs to the pair
    (dense seed s, pruned seed s); the seed s is resampled as one unit (one-way)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    n = v.shape[0]
    if n == 0:
        raise InputError('values is empty; expected one value per seed s of the pairs (s, s)')
    _check_boot(n_boot, ci)
    sums, counts, v = _pair_table(v, np.stack([np.arange(n)] * 2, 1), n, n, 'matched_bootstrap_ci')
    c = _seed_counts(np.random.Generator(np.random.PCG64(seed)), n, int(n_boot))
    iv = _percentile_interval(float(v.mean()), _weighted_mean(sums, counts, c, np.ones_like(c)), ci)
    return SeedInterval(*iv, float(v.min()), float(v.max()), n)


def seed_difference_ci(
    a_values,
    a_pairs,
    b_values,
    b_pairs,
    n_dense: int,
    matched: bool = False,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> SeedInterval:
    """CI of mean(A) - mean(B) for two conditions measured against the SAME dense seeds,
    e.g. survival(Wanda) - survival(magnitude) at one sparsity.

    a_values [P_a], a_pairs [P_a, 2]: condition A's value for (dense seed i, A's pruned
      seed j); likewise b_*. Dense seeds are in [0, n_dense); each condition's pruned
      seeds in [0, max index + 1).
    Each resample draws the dense seeds once, for both conditions (they share them), and
    each condition's pruned seeds independently (they are different SAEs); a pair enters
    with weight count_dense(i) * count_pruned(j), as in two_way_bootstrap_ci.
    matched=True: the pairs are (s, s) and pruned seed s goes with dense seed s, so the
    pair enters with weight count_dense(s) (the pruned seeds are not resampled apart).
    min / max of the result: the smallest and largest per-dense-seed difference
    (mean of A's pairs of dense seed s minus mean of B's), over seeds that both have.
    """
    _check_boot(n_boot, ci)
    n_d = _check_n(n_dense, 'n_dense')
    tables = []
    for name, values, pairs in (('a', a_values, a_pairs), ('b', b_values, b_pairs)):
        p = np.asarray(pairs)
        n_p = int(p[:, 1].max()) + 1 if p.ndim == 2 and p.shape[0] and p.shape[1] == 2 else 1
        sums, counts, _ = _pair_table(values, pairs, n_d, max(n_p, 1), f'seed_difference_ci {name}')
        if matched and np.any((counts > 0) & ~np.eye(n_d, counts.shape[1], dtype=bool)):
            raise InputError(
                f'seed_difference_ci {name}: matched=True with a pair (i, j), i != j; expected pairs (s, s)'
            )
        tables.append((sums, counts))
    (sa, ka), (sb, kb) = tables
    estimate = float(sa.sum() / ka.sum() - sb.sum() / kb.sum())
    rng = np.random.Generator(np.random.PCG64(seed))
    cd = _seed_counts(rng, n_d, int(n_boot))
    if matched:
        cpa, cpb = np.ones((int(n_boot), ka.shape[1])), np.ones((int(n_boot), kb.shape[1]))
    else:
        cpa = _seed_counts(rng, ka.shape[1], int(n_boot))
        cpb = _seed_counts(rng, kb.shape[1], int(n_boot))
    boots = _weighted_mean(sa, ka, cd, cpa) - _weighted_mean(sb, kb, cd, cpb)
    iv = _percentile_interval(estimate, boots, ci)
    both = (ka.sum(1) > 0) & (kb.sum(1) > 0)
    per_seed = sa.sum(1)[both] / ka.sum(1)[both] - sb.sum(1)[both] / kb.sum(1)[both]
    lo, hi = (float(per_seed.min()), float(per_seed.max())) if per_seed.size else (float('nan'), float('nan'))
    n_seeds = n_d if matched else min(n_d, ka.shape[1], kb.shape[1])
    return SeedInterval(*iv, lo, hi, n_seeds)


def rankdata(x) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata, 'average'),
    after checking that x is a finite 1-D array."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise InputError(f'x has shape {x.shape}; expected a 1-D array')
    check_finite(x, 'x', 'finite values to rank')
    return np.asarray(scipy.stats.rankdata(x, method='average'), dtype=np.float64)


def _paired(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise InputError(f'x shape {x.shape}, y shape {y.shape}; expected two 1-D arrays of equal length')
    check_finite(x, 'x', 'finite values to correlate')
    check_finite(y, 'y', 'finite values to correlate')
    return x, y


def pearson(x, y) -> float:
    """Pearson correlation; nan when either input is constant or has fewer than 2 values.

    Not scipy.stats.pearsonr: that one divides each centred input by its norm before the
    dot product, which differs from this sum in the last bits (and it warns on constant
    input and refuses fewer than 2 values)."""
    x, y = _paired(x, y)
    if x.shape[0] < 2:
        return float('nan')
    xc = x - x.mean()
    yc = y - y.mean()
    den = np.sqrt(np.sum(xc * xc) * np.sum(yc * yc))
    if den == 0.0:
        return float('nan')
    return float(np.clip(np.sum(xc * yc) / den, -1.0, 1.0))


def spearman(x, y) -> float:
    """Spearman rank correlation: `pearson` of the average ranks (ties handled as in
    scipy.stats.spearmanr, whose np.corrcoef differs from `pearson` in the last bits);
    nan when either input is constant."""
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
        raise InputError(f'ratings shape {r.shape}; expected [m raters, n items]')
    check_finite(r, 'ratings', 'finite scores to rank')
    m, n = r.shape
    if m < 1 or n < 2:
        return float('nan')
    ranks = np.stack([rankdata(row) for row in r])  # [m, n]
    totals = ranks.sum(axis=0)
    s = float(np.sum((totals - totals.mean()) ** 2))
    ties = 0.0
    for row in r:
        _, counts = np.unique(row, return_counts=True)
        ties += float(np.sum(counts.astype(np.float64) ** 3 - counts))
    den = m * m * (n**3 - n) - m * ties
    if den <= 0.0:
        return float('nan')
    return 12.0 * s / den
