"""Mask pytrees over decoder params: the prunable set, applying masks inside jit, reports, files.

A mask pytree has the SAME structure as the params pytree (``{'embed', 'final_norm', ['lm_head'],
'layers': [ {...}, ... ]}``) with a bool array at every prunable leaf (True = keep) and ``None``
everywhere else. Only the linear layers inside decoder blocks are prunable; embeddings, norms and
the unembedding are never zeroed.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from prunesae_jax.errors import InputError
from prunesae_jax.models.config import PRUNABLE

ATTENTION = ('q_proj', 'k_proj', 'v_proj', 'o_proj')
MLP = ('gate_proj', 'up_proj', 'down_proj')
KINDS = {'attention': ATTENTION, 'mlp': MLP}

Params = dict[str, Any]
Masks = dict[str, Any]


def kind_of(name: str) -> str:
    """'attention' or 'mlp' for a prunable leaf name."""
    if name in ATTENTION:
        return 'attention'
    if name in MLP:
        return 'mlp'
    raise InputError(f'not a prunable matrix name: {name!r}; expected one of {PRUNABLE}')


def prunable_items(tree: Params) -> Iterator[tuple[int, str, Any]]:
    """Yields (layer index, name, leaf) for every prunable leaf, in layer order then PRUNABLE order.

    This order is the canonical one: global selection breaks ties by it and files store it.
    """
    layers = tree.get('layers') if isinstance(tree, dict) else None
    if not isinstance(layers, (list, tuple)):
        raise InputError(f"params/masks must be a dict with a 'layers' list, got {type(tree).__name__}")
    for i, lp in enumerate(layers):
        for name in PRUNABLE:
            if name in lp and lp[name] is not None:
                yield i, name, lp[name]


def matrix_key(i: int, name: str) -> str:
    """Flat name of a prunable matrix, e.g. 'layers.3.q_proj' (used in reports and files)."""
    return f'layers.{i}.{name}'


def _map_structure(params: Params, leaf_fn) -> Masks:
    """Same structure as params: leaf_fn(i, name, W) at prunable leaves, None elsewhere."""
    out = {}
    for key, val in params.items():
        if key == 'layers':
            out['layers'] = []
            for i, lp in enumerate(val):
                # leaf_fn is called in canonical (PRUNABLE) order, whatever the dict's key order
                got = {n: leaf_fn(i, n, lp[n]) for n in PRUNABLE if n in lp}
                out['layers'].append({n: got.get(n) for n in lp})
        else:
            out[key] = None
    return out


def make_masks(params: Params, fill: bool = True) -> Masks:
    """An all-keep (fill=True) or all-prune mask pytree shaped like params."""
    return _map_structure(params, lambda i, n, w: jnp.full(w.shape, fill, dtype=jnp.bool_))


def masks_from_list(params: Params, leaves: list) -> Masks:
    """Mask pytree from a list of bool arrays given in prunable_items order."""
    it = iter(leaves)
    masks = _map_structure(params, lambda i, n, w: jnp.asarray(next(it), dtype=jnp.bool_))
    validate_masks(params, masks)
    return masks


def masks_from_params(params: Params) -> Masks:
    """The mask implied by exact zeros in the prunable matrices (keep = nonzero)."""
    return _map_structure(params, lambda i, n, w: jnp.asarray(w) != 0)


def validate_masks(params: Params, masks: Masks) -> None:
    """Raises ValueError unless masks has params' structure with bool prunable leaves of equal shape."""
    if not isinstance(masks, dict) or set(masks) != set(params):
        got = sorted(masks) if isinstance(masks, dict) else type(masks).__name__
        raise InputError(f'masks top-level keys {got} do not match params keys {sorted(params)}')
    for key in params:
        if key != 'layers' and masks[key] is not None:
            raise InputError(f'masks[{key!r}] must be None (not prunable), got {type(masks[key]).__name__}')
    if len(masks['layers']) != len(params['layers']):
        raise InputError(f'masks have {len(masks["layers"])} layers, params have {len(params["layers"])}')
    for i, (ml, pl) in enumerate(zip(masks['layers'], params['layers'])):
        if set(ml) != set(pl):
            raise InputError(f'masks layer {i} keys {sorted(ml)} do not match params keys {sorted(pl)}')
        for name, m in ml.items():
            if name not in PRUNABLE:
                if m is not None:
                    raise InputError(f'masks layer {i} {name!r} must be None (not prunable)')
                continue
            if m is None:
                continue  # a prunable leaf left unmasked keeps every weight
            if tuple(m.shape) != tuple(pl[name].shape) or m.dtype != np.bool_:
                raise InputError(
                    f'mask {matrix_key(i, name)} has shape {tuple(m.shape)} dtype {m.dtype}; '
                    f'expected bool {tuple(pl[name].shape)}'
                )


def apply_masks(params: Params, masks: Masks) -> Params:
    """Zeroes the pruned weights; jit-compatible, keeps dtypes, non-prunable leaves pass through."""

    def one(m, p):
        if m is None:
            return p
        return jnp.where(m, p, jnp.zeros((), p.dtype))

    return jax.tree.map(one, masks, params, is_leaf=lambda x: x is None)


def masked_params(params: Params, masks: Masks) -> Params:
    """apply_masks, with every leaf that has no mask kept as the same array (not a copy).

    Only the masked leaves go through the jit: a jit's pass-through outputs are fresh buffers, so
    each pruned model would otherwise hold its own copy of the embedding and norms (0.7 GB for
    Gemma 3 270M in float32).
    """
    none = lambda x: x is None
    masked_only = jax.tree.map(lambda m, p: None if m is None else p, masks, params, is_leaf=none)
    masked = jax.jit(apply_masks)(masked_only, masks)
    return jax.tree.map(lambda m, p, q: p if m is None else q, masks, params, masked, is_leaf=none)


def prunable_weights(params: Params) -> dict[str, np.ndarray]:
    """Every prunable matrix as a host array, named '<layer>.<name>' (e.g. '3.q_proj').

    For methods that also change the kept weights (SparseGPT): with_prunable_weights puts them back.
    """
    return {f'{i}.{n}': np.asarray(lp[n]) for i, lp in enumerate(params['layers']) for n in PRUNABLE}


def with_prunable_weights(params: Params, weights: dict[str, np.ndarray]) -> Params:
    """params with the matrices named in `weights` (as prunable_weights names them) replaced."""
    layers = []
    for i, lp in enumerate(params['layers']):
        lp = dict(lp)
        for name in list(lp):
            if f'{i}.{name}' in weights:
                lp[name] = jnp.asarray(weights[f'{i}.{name}'], lp[name].dtype)
        layers.append(lp)
    return {**params, 'layers': layers}


def _zero_fraction_leaf(leaf) -> tuple[int, int]:
    # masks: False = pruned; weights: exact zeros. Both are the non-"nonzero" entries.
    a = np.asarray(leaf)
    return int(a.size) - int(np.count_nonzero(a)), int(a.size)


def sparsity_report(params_or_masks: Params) -> dict:
    """Achieved sparsity per matrix, per kind (attention / MLP) and overall.

    Accepts a mask pytree (fraction of False) or a params pytree (fraction of exact zeros in the
    prunable matrices). Returns {'per_matrix': {'layers.i.name': f}, 'per_kind': {'attention': f,
    'mlp': f}, 'overall': f, 'n_pruned': int, 'n_total': int}.
    """
    per_matrix, kind_counts = {}, {k: [0, 0] for k in KINDS}
    for i, name, leaf in prunable_items(params_or_masks):
        z, n = _zero_fraction_leaf(leaf)
        per_matrix[matrix_key(i, name)] = z / n
        kind_counts[kind_of(name)][0] += z
        kind_counts[kind_of(name)][1] += n
    n_pruned = sum(c[0] for c in kind_counts.values())
    n_total = sum(c[1] for c in kind_counts.values())
    return {
        'per_matrix': per_matrix,
        'per_kind': {k: (c[0] / c[1] if c[1] else 0.0) for k, c in kind_counts.items()},
        'overall': n_pruned / n_total if n_total else 0.0,
        'n_pruned': n_pruned,
        'n_total': n_total,
    }


def format_report(report: dict) -> str:
    """One line: overall and per-kind sparsity."""
    pk = report['per_kind']
    return (
        f'sparsity overall {report["overall"]:.4f} (attention {pk["attention"]:.4f}, '
        f'mlp {pk["mlp"]:.4f}; {report["n_pruned"]}/{report["n_total"]} weights)'
    )


def save_masks(path: str | os.PathLike, masks: Masks) -> None:
    """Writes masks to an .npz (bit-packed, one entry per prunable matrix) atomically."""
    path = os.fspath(path)
    if not path.endswith('.npz'):
        raise InputError(f'mask file must end with .npz, got {path!r}')
    arrays = {}
    for i, name, m in prunable_items(masks):
        m = np.asarray(m)
        if m.dtype != np.bool_:
            raise InputError(f'mask {matrix_key(i, name)} has dtype {m.dtype}; expected bool')
        arrays[matrix_key(i, name)] = np.packbits(m.ravel())
        arrays[matrix_key(i, name) + '.shape'] = np.asarray(m.shape, np.int64)
    arrays['__num_layers__'] = np.asarray(len(masks['layers']), np.int64)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix='.masks-', suffix='.npz.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_masks(path: str | os.PathLike, params: Params) -> Masks:
    """Reads masks written by save_masks; params (or a shape pytree of them) gives the structure."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'mask file not found: {path!r}')
    with np.load(path) as z:
        n_layers = int(z['__num_layers__'])
        if n_layers != len(params['layers']):
            raise InputError(f'mask file {path!r} has {n_layers} layers, params have {len(params["layers"])}')

        def leaf(i, name, w):
            key = matrix_key(i, name)
            if key not in z:
                raise InputError(f'mask file {path!r} lacks {key!r}')
            shape = tuple(int(s) for s in z[key + '.shape'])
            if shape != tuple(w.shape):
                raise InputError(f'mask {key} in {path!r} has shape {shape}; params have {tuple(w.shape)}')
            bits = np.unpackbits(z[key], count=int(np.prod(shape))).astype(bool)
            return jnp.asarray(bits.reshape(shape))

        masks = _map_structure(params, leaf)
    validate_masks(params, masks)
    return masks
