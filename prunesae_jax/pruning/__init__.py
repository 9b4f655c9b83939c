"""Pruning: magnitude, Wanda and SparseGPT as mask pytrees over decoder params.

    result = prune(cfg, params, 'wanda', 0.5, calib_tokens=tokens)     # per_row, sequential
    result.masks     # bool pytree shaped like params (None at non-prunable leaves)
    result.params    # pruned params: an ordinary model for every later stage
    result.report    # achieved sparsity per matrix / kind / overall, plus the settings

Only the linear layers inside decoder blocks are pruned (PRUNABLE); embeddings, norms and the
unembedding never are. Counts are exact (see select.py). Wanda and SparseGPT calibrate block
by block: block i sees the outputs of the already pruned blocks 0..i-1 (the references'
sequential mode) unless sequential=False, where every block sees the dense model's activations.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from prunesae_jax.models.config import PRUNABLE, DecoderConfig
from prunesae_jax.pruning import calibrate as _cal
from prunesae_jax.pruning.masks import (
    apply_masks,
    format_report,
    load_masks,
    make_masks,
    masks_from_list,
    masks_from_params,
    prunable_items,
    save_masks,
    sparsity_report,
    validate_masks,
)
from prunesae_jax.pruning.perplexity import delta_log_ppl, perplexity
from prunesae_jax.pruning.scores import magnitude_scores, wanda_scores
from prunesae_jax.pruning.select import (
    GROUPS,
    LazyScores,
    check_group,
    check_nm,
    check_sparsity,
    global_masks,
    group_mask,
    lowest_k,
    nm_mask,
)
from prunesae_jax.pruning.sparsegpt import sparsegpt_prune
from prunesae_jax.errors import InputError

METHODS = ('magnitude', 'wanda', 'sparsegpt')
METHOD_GROUPS = {'magnitude': GROUPS, 'wanda': ('per_row', 'per_matrix'), 'sparsegpt': ()}
DEFAULT_GROUP = {'magnitude': 'per_matrix', 'wanda': 'per_row', 'sparsegpt': None}


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """masks: bool pytree (True = keep); params: the pruned params; report: sparsity and settings."""
    masks: Any
    params: Any
    report: dict


def _check_args(method, sparsity, group, nm):
    if method not in METHODS:
        raise InputError(f'unknown pruning method {method!r}; expected one of {METHODS}')
    if nm is not None:
        n, m = check_nm(nm)
        if group is not None:
            raise InputError(f'group={group!r} cannot be combined with nm={nm!r}: N:M fixes the group (M inputs per output)')
        if sparsity is not None and abs(float(sparsity) - n / m) > 1e-9:
            raise InputError(f'sparsity={sparsity!r} contradicts nm={n}:{m}; pass sparsity=None or {n / m}')
        return n / m, None, (n, m)
    if sparsity is None:
        raise InputError('sparsity is None; expected a number in [0, 1) (or an nm=(N, M) pattern)')
    s = check_sparsity(sparsity)
    if method == 'sparsegpt':
        if group is not None:
            raise InputError(f'group={group!r} is not used by sparsegpt (it selects per block of 128 inputs); pass group=None')
        return s, None, None
    group = DEFAULT_GROUP[method] if group is None else check_group(group)
    if group not in METHOD_GROUPS[method]:
        raise InputError(f'group {group!r} is not available for {method}; expected one of {METHOD_GROUPS[method]}')
    return s, group, None


def prune(cfg: DecoderConfig, params: dict, method: str, sparsity=None, *, group: str | None = None,
          calib_tokens=None, nm=None, sequential: bool = True, progress: bool = True,
          batch_size: int = 8, block_size: int = 128, damp: float = 0.01) -> PruneResult:
    """Prunes the decoder's linear layers; returns PruneResult(masks, params, report).

    method: 'magnitude' (groups 'per_matrix' (default, the Wanda reference's baseline), 'global'
    (one threshold over every prunable matrix, the paper's revised code), 'per_row'); 'wanda'
    (groups 'per_row' (default, the reference) and 'per_matrix'); 'sparsegpt' (per 128-input block,
    weights are updated). sparsity in [0, 1), or nm=(N, M) for N:M (2:4, 4:8) along the inputs.
    calib_tokens: [n_samples, seq_len] int32 (Wanda / SparseGPT), pushed through the model in
    micro-batches of batch_size sequences. sequential: block i calibrates on the pruned blocks'
    outputs (reference); False = one-shot statistics of the dense model.
    """
    t0 = time.perf_counter()
    s, group, nm = _check_args(method, sparsity, group, nm)
    if len(params.get('layers', ())) != cfg.num_layers:
        raise InputError(f"params has {len(params.get('layers', ()))} layers; config says num_layers={cfg.num_layers}")
    n_calib = 0
    if method == 'magnitude':
        masks, new_params = _prune_magnitude(params, s, group, nm)
    else:
        tokens = _cal.check_calib_tokens(calib_tokens)
        n_calib = int(tokens.size)
        masks, new_params = _prune_calibrated(cfg, params, method, s, group, nm, tokens, sequential, progress,
                                              int(batch_size), block_size, damp)
    report = sparsity_report(masks)
    report.update(method=method, group=group, sparsity=s, nm=nm,
                  sequential=bool(sequential) if method != 'magnitude' else None,
                  n_calib_tokens=n_calib, seconds=time.perf_counter() - t0)
    if progress:
        print(f'[prune] {method} {group or ""} {"%d:%d" % nm if nm else ""}: {format_report(report)} '
              f'in {report["seconds"]:.1f}s', file=sys.stderr, flush=True)
    return PruneResult(masks, new_params, report)


_apply_masks_jit = jax.jit(apply_masks)


def _prune_magnitude(params, s, group, nm):
    weights = [w for _, _, w in prunable_items(params)]
    if nm is not None:
        leaves = [nm_mask(magnitude_scores(w), nm) for w in weights]
    elif group == 'global':
        leaves = global_masks(LazyScores(weights, magnitude_scores), s)
    else:
        leaves = [group_mask(magnitude_scores(w), s, group) for w in weights]
    masks = masks_from_list(params, leaves)
    return masks, _apply_masks_jit(params, masks)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _wanda_matrix(W, x_sq, s, group, nm):
    # one dispatch per matrix: scores, exact selection, zeroing
    sc = wanda_scores(W, x_sq)
    if nm is not None:
        keep = nm_mask(sc, nm)
    elif group == 'per_row':
        keep = ~lowest_k(sc, int(W.shape[0] * s), axis=0)
    else:
        keep = ~lowest_k(sc, int(W.size * s))
    return jnp.where(keep, W, jnp.zeros((), W.dtype)), keep


def _prune_calibrated(cfg, params, method, s, group, nm, tokens, sequential, progress, batch_size,
                      block_size, damp):
    from prunesae_jax.models.decoder import embed

    if batch_size < 1:
        raise InputError(f'batch_size must be >= 1, got {batch_size}')
    kind = 'sq' if method == 'wanda' else 'gram'
    hs = [embed(cfg, params, jnp.asarray(tokens[a:a + batch_size])) for a in range(0, tokens.shape[0], batch_size)]
    new_layers, leaves = [], []
    for i, lp in enumerate(params['layers']):
        t = time.perf_counter()
        stats = _cal.init_stats(cfg, kind)
        outs = []
        for h in hs:
            out, stats = _cal.accumulate_block_stats(cfg, lp, i, h, stats, kind, with_output=not sequential)
            outs.append(out)
        if not all(bool(jnp.all(jnp.isfinite(v))) for v in stats.values()):
            _cal.check_stats(stats, i, step=_cal.first_nonfinite_batch(cfg, lp, i, hs, kind))
        new_lp = dict(lp)
        for name in PRUNABLE:
            W, st = lp[name], stats[_cal.SITE_OF[name]]
            if method == 'wanda':
                new_lp[name], keep = _wanda_matrix(W, st, s, group, nm)
            else:
                new_lp[name], keep = sparsegpt_prune(W, st, None if nm else s, nm=nm, block_size=block_size, damp=damp)
            leaves.append(keep)
        if sequential:  # the next block sees this block's pruned outputs, as the references do
            outs = [_cal.block_out(cfg, new_lp, i, h) for h in hs]
        hs = outs
        new_layers.append(new_lp)
        if progress:
            print(f'[prune] {method} layer {i + 1}/{cfg.num_layers} {time.perf_counter() - t:.1f}s',
                  file=sys.stderr, flush=True)
    masks = masks_from_list(params, leaves)
    return masks, {**params, 'layers': new_layers}


__all__ = [
    'METHODS', 'PruneResult', 'prune', 'apply_masks', 'make_masks', 'masks_from_params', 'validate_masks',
    'sparsity_report', 'format_report', 'save_masks', 'load_masks', 'magnitude_scores', 'wanda_scores',
    'global_masks', 'group_mask', 'nm_mask', 'sparsegpt_prune', 'perplexity', 'delta_log_ppl',
]
