"""Perplexity of a text stream with a percentile CI, from its windows' summed NLL and token counts.

pruning/perplexity.py scores the stream in strided windows (each window scores a disjoint stretch
of the text); the interval resamples those windows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from prunesae_jax.analysis.stats import bootstrap_ci

__all__ = ['perplexity_record']


def perplexity_record(
    nll: np.ndarray, count: np.ndarray, n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """{nll, n_tokens, n_windows, ppl, ppl_ci} of windows with summed NLL nll [W] over count [W] tokens.

    ppl = exp(sum nll / sum count); ppl_ci: the percentile bootstrap interval over windows.
    """
    # The windows score disjoint stretches of the text: the interval resamples them.
    iv = bootstrap_ci(
        np.stack([nll, count], 1), lambda a: math.exp(a[:, 0].sum() / a[:, 1].sum()), n_boot=n_boot, ci=ci, seed=seed
    )
    return {
        'nll': float(nll.sum()),
        'n_tokens': int(count.sum()),
        'n_windows': int(nll.size),
        'ppl': math.exp(nll.sum() / count.sum()),
        'ppl_ci': [iv.low, iv.high],
    }
