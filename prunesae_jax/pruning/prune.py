"""prune(): magnitude, Wanda or SparseGPT over a decoder's params, with its arguments validated.

    args = PruneArgs('wanda', 0.5)                       # per_row, sequential: the Wanda reference
    result = prune_with(cfg, params, args, calib_tokens=tokens)
    result = prune(cfg, params, 'wanda', 0.5, calib_tokens=tokens)   # the same, in one call

`PruneArgs` is the one place that knows which methods, groups and N:M patterns exist and which
combinations are valid; the study's config (prunesae_jax/study/config.py) builds it from its
fields, so a bad value is refused here, up front, in one line.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunesae_jax.errors import InputError
from prunesae_jax.models.config import PRUNABLE, DecoderConfig
from prunesae_jax.pruning import calibrate as calibrate_lib
from prunesae_jax.pruning.masks import (
    apply_masks,
    format_report,
    masks_from_list,
    prunable_items,
    sparsity_report,
)
from prunesae_jax.pruning.scores import magnitude_scores, wanda_scores
from prunesae_jax.pruning.select import (
    GROUPS,
    LazyScores,
    check_nm,
    check_sparsity,
    global_masks,
    group_mask,
    lowest_k,
    nm_mask,
)
from prunesae_jax.pruning.sparsegpt import sparsegpt_prune

METHODS = ('magnitude', 'wanda', 'sparsegpt')
# The selection groups of each method (any method also takes an N:M pattern). SparseGPT has none:
# it selects inside its own blocks of 128 inputs.
METHOD_GROUPS = {'magnitude': GROUPS, 'wanda': ('per_row', 'per_matrix'), 'sparsegpt': ()}
# The group of group=None: the Wanda reference's choices (its magnitude baseline is per matrix).
DEFAULT_GROUP = {'magnitude': 'per_matrix', 'wanda': 'per_row', 'sparsegpt': None}
# The calibration statistics each calibrated method reads (prunesae_jax/pruning/calibrate.py).
STATS_KIND = {'wanda': calibrate_lib.INPUT_SQ_NORMS, 'sparsegpt': calibrate_lib.INPUT_GRAM}
_N_M = re.compile(r'^(\d+):(\d+)$')
_NO_GROUP = "None or '' (sparsegpt selects per block of 128 inputs), or an N:M pattern"


def parse_group(group: str | None) -> tuple[str | None, tuple[int, int] | None]:
    """(group, nm) of a group written as text, as configs write it: 'N:M' is an N:M pattern.

    '' and None mean the method's default (SparseGPT: its own blocks); any other text is a group
    name, checked by PruneArgs.
    """
    if group is None or group == '':
        return None, None
    if not isinstance(group, str):
        raise InputError(f"group={group!r} is not valid; accepted: a group name or an N:M pattern like '2:4'")
    nm = _N_M.match(group)
    if not nm:
        return group, None
    n, m = int(nm.group(1)), int(nm.group(2))
    if not 1 <= n < m:
        raise InputError(f"group={group!r} is not valid; accepted: an N:M pattern with 1 <= N < M, e.g. '2:4'")
    return None, (n, m)


@dataclasses.dataclass(frozen=True)
class PruneArgs:
    """How to prune: validated and resolved on construction (InputError naming the bad field).

    Attributes:
      method: 'magnitude' | 'wanda' | 'sparsegpt' (METHODS).
      sparsity: the fraction of weights pruned, in [0, 1); None with nm, which fixes it at N / M.
        After construction it is always the float that is pruned.
      group: where the exact count is taken (METHOD_GROUPS): magnitude 'per_matrix' (the default,
        the Wanda reference's baseline), 'global' (one threshold over every prunable matrix),
        'per_row'; wanda 'per_row' (the default, the reference) or 'per_matrix'; sparsegpt None
        (per block of 128 inputs). None (or '') = the method's default; None with nm.
      nm: (N, M) prunes N of every M consecutive inputs of each output (e.g. (2, 4)), or None.
      sequential: Wanda / SparseGPT calibrate block i on the pruned blocks' outputs (the
        references); False = one-shot statistics of the dense model.
      batch_size: calibration sequences per forward pass.
      block_size, damp: SparseGPT's block of inputs and Hessian dampening.
    """

    method: str
    sparsity: float | None = None
    group: str | None = None
    nm: tuple[int, int] | None = None
    sequential: bool = True
    batch_size: int = 8
    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f'method={self.method!r} is not valid; accepted: {" | ".join(METHODS)}')
        if not isinstance(self.sequential, bool):
            raise InputError(f'sequential={self.sequential!r} is not valid; accepted: True | False')
        bs = self.batch_size
        if isinstance(bs, bool) or not isinstance(bs, (int, np.integer)) or bs < 1:
            raise InputError(f'batch_size={bs!r} is not valid; accepted: an int >= 1')
        object.__setattr__(self, 'batch_size', int(bs))
        group = None if self.group == '' else self.group
        if self.nm is not None:
            n, m = check_nm(self.nm)
            if group is not None:
                raise InputError(
                    f'group={group!r} is not valid with nm={self.nm!r}; accepted: None '
                    '(N:M fixes the group: M inputs per output)'
                )
            if self.sparsity is not None and abs(float(self.sparsity) - n / m) > 1e-9:
                raise InputError(f'sparsity={self.sparsity!r} contradicts nm={n}:{m}; accepted: None or {n / m}')
            self._resolve(n / m, None, (n, m))
            return
        if self.sparsity is None:
            raise InputError(
                'sparsity=None is not valid without nm; accepted: a number in [0, 1), or an nm=(N, M) pattern'
            )
        s = check_sparsity(self.sparsity)
        if self.method == 'sparsegpt':
            if group is not None:
                raise InputError(f'group={group!r} is not valid for sparsegpt; accepted: {_NO_GROUP}')
            self._resolve(s, None, None)
            return
        group = DEFAULT_GROUP[self.method] if group is None else group
        if group not in METHOD_GROUPS[self.method]:
            raise InputError(
                f'group={group!r} is not valid for {self.method}; accepted: '
                f'{" | ".join(METHOD_GROUPS[self.method])}, or an N:M pattern'
            )
        self._resolve(s, group, None)

    def _resolve(self, sparsity: float, group: str | None, nm: tuple[int, int] | None) -> None:
        object.__setattr__(self, 'sparsity', sparsity)
        object.__setattr__(self, 'group', group)
        object.__setattr__(self, 'nm', nm)


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """masks: bool pytree (True = keep); params: the pruned params; report: sparsity and settings."""

    masks: Any
    params: Any
    report: dict


def prune(
    cfg: DecoderConfig,
    params: dict,
    method: str,
    sparsity=None,
    *,
    group: str | None = None,
    calib_tokens=None,
    nm=None,
    sequential: bool = True,
    progress: bool = True,
    batch_size: int = 8,
    block_size: int = 128,
    damp: float = 0.01,
) -> PruneResult:
    """Prunes the decoder's linear layers; returns PruneResult(masks, params, report).

    The arguments are PruneArgs's fields (see there). calib_tokens: [n_samples, seq_len] int32
    (Wanda / SparseGPT), pushed through the model in micro-batches of batch_size sequences.
    """
    args = PruneArgs(method, sparsity, group, nm, sequential, batch_size, block_size, damp)
    return prune_with(cfg, params, args, calib_tokens=calib_tokens, progress=progress)


def prune_with(
    cfg: DecoderConfig, params: dict, args: PruneArgs, *, calib_tokens=None, progress: bool = True
) -> PruneResult:
    """Prunes the decoder's linear layers as `args` says; returns PruneResult(masks, params, report)."""
    t0 = time.perf_counter()
    if len(params.get('layers', ())) != cfg.num_layers:
        raise InputError(
            f'params has {len(params.get("layers", ()))} layers; expected '
            f'num_layers={cfg.num_layers} as the config says'
        )
    n_calib = 0
    if args.method == 'magnitude':
        masks, new_params = _prune_magnitude(params, args)
    else:
        tokens = calibrate_lib.check_calib_tokens(calib_tokens)
        n_calib = int(tokens.size)
        masks, new_params = _prune_calibrated(cfg, params, args, tokens, progress)
    report = sparsity_report(masks)
    report.update(
        method=args.method,
        group=args.group,
        sparsity=args.sparsity,
        nm=args.nm,
        sequential=args.sequential if args.method != 'magnitude' else None,
        n_calib_tokens=n_calib,
        seconds=time.perf_counter() - t0,
    )
    if progress:
        nm = '%d:%d' % args.nm if args.nm else ''
        print(
            f'[prune] {args.method} {args.group or ""} {nm}: {format_report(report)} in {report["seconds"]:.1f}s',
            file=sys.stderr,
            flush=True,
        )
    return PruneResult(masks, new_params, report)


_apply_masks_jit = jax.jit(apply_masks)


def _prune_magnitude(params, args: PruneArgs):
    weights = [w for _, _, w in prunable_items(params)]
    if args.nm is not None:
        leaves = [nm_mask(magnitude_scores(w), args.nm) for w in weights]
    elif args.group == 'global':
        leaves = global_masks(LazyScores(weights, magnitude_scores), args.sparsity)
    else:
        leaves = [group_mask(magnitude_scores(w), args.sparsity, args.group) for w in weights]
    masks = masks_from_list(params, leaves)
    return masks, _apply_masks_jit(params, masks)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _wanda_matrix(W, input_sq_norms, s, group, nm):
    # one dispatch per matrix: scores, exact selection, zeroing
    sc = wanda_scores(W, input_sq_norms)
    if nm is not None:
        keep = nm_mask(sc, nm)
    elif group == 'per_row':
        keep = ~lowest_k(sc, int(W.shape[0] * s), axis=0)
    else:
        keep = ~lowest_k(sc, int(W.size * s))
    return jnp.where(keep, W, jnp.zeros((), W.dtype)), keep


def _prune_calibrated(cfg, params, args: PruneArgs, tokens, progress):
    """Wanda / SparseGPT block by block: statistics of block i's inputs, then its matrices.

    Under jax.distributed each process runs its contiguous share of the calibration sequences
    through the blocks and the statistics are summed over processes (sharding.process_sum, an
    all-reduce in jit) before each block is pruned, so every process prunes with the same sums.
    """
    from prunesae_jax import sharding  # pylint: disable=g-import-not-at-top
    from prunesae_jax.models.decoder import embed  # pylint: disable=g-import-not-at-top

    kind, bs = STATS_KIND[args.method], args.batch_size
    tokens = tokens[sharding.process_share(tokens.shape[0])]
    hs = [embed(cfg, params, jnp.asarray(tokens[a : a + bs])) for a in range(0, tokens.shape[0], bs)]
    new_layers, leaves = [], []
    for i, lp in enumerate(params['layers']):
        t = time.perf_counter()
        stats = calibrate_lib.init_stats(cfg, kind)
        outs = []
        for h in hs:
            out, stats = calibrate_lib.accumulate_block_stats(
                cfg, lp, i, h, stats, kind, with_output=not args.sequential
            )
            outs.append(out)
        stats = sharding.process_sum(stats)
        if not all(bool(jnp.all(jnp.isfinite(v))) for v in stats.values()):
            calibrate_lib.check_stats(stats, i, step=calibrate_lib.first_nonfinite_batch(cfg, lp, i, hs, kind))
        new_lp = dict(lp)
        for name in PRUNABLE:
            W, st = lp[name], stats[calibrate_lib.SITE_OF[name]]
            if args.method == 'wanda':
                new_lp[name], keep = _wanda_matrix(W, st, args.sparsity, args.group, args.nm)
            else:
                new_lp[name], keep = sparsegpt_prune(
                    W, st, None if args.nm else args.sparsity, nm=args.nm, block_size=args.block_size, damp=args.damp
                )
            leaves.append(keep)
        if args.sequential:  # the next block sees this block's pruned outputs, as the references do
            outs = [calibrate_lib.block_out(cfg, new_lp, i, h) for h in hs]
        hs = outs
        new_layers.append(new_lp)
        if progress:
            print(
                f'[prune] {args.method} layer {i + 1}/{cfg.num_layers} {time.perf_counter() - t:.1f}s',
                file=sys.stderr,
                flush=True,
            )
    masks = masks_from_list(params, leaves)
    return masks, {**params, 'layers': new_layers}
