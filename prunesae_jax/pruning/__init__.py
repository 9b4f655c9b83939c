"""Pruning: magnitude, Wanda and SparseGPT as mask pytrees over decoder params.

    result = prune(cfg, params, 'wanda', 0.5, calib_tokens=tokens)     # per_row, sequential
    result.masks     # bool pytree shaped like params (None at non-prunable leaves)
    result.params    # pruned params: an ordinary model for every later stage
    result.report    # achieved sparsity per matrix / kind / overall, plus the settings

Only the linear layers inside decoder blocks are pruned (PRUNABLE); embeddings, norms and the
unembedding never are. Counts are exact (see select.py). Wanda and SparseGPT calibrate block
by block: block i sees the outputs of the already pruned blocks 0..i-1 (the references'
sequential mode) unless sequential=False, where every block sees the dense model's activations.

Modules: prune.py (PruneArgs, prune), calibrate.py (the statistics), scores.py, select.py (exact
selection), sparsegpt.py, masks.py (mask pytrees and their files), perplexity.py.
"""

from prunesae_jax.pruning.masks import (
    apply_masks,
    format_report,
    load_masks,
    make_masks,
    masks_from_params,
    save_masks,
    sparsity_report,
    validate_masks,
)
from prunesae_jax.pruning.perplexity import delta_log_ppl, perplexity
from prunesae_jax.pruning.prune import (
    METHOD_GROUPS,
    METHODS,
    PruneArgs,
    PruneResult,
    parse_group,
    prune,
    prune_with,
)
from prunesae_jax.pruning.scores import magnitude_scores, wanda_scores
from prunesae_jax.pruning.select import GROUPS, check_sparsity, global_masks, group_mask, nm_mask
from prunesae_jax.pruning.sparsegpt import sparsegpt_prune

__all__ = [
    'METHODS',
    'METHOD_GROUPS',
    'GROUPS',
    'PruneArgs',
    'PruneResult',
    'check_sparsity',
    'parse_group',
    'prune',
    'prune_with',
    'apply_masks',
    'make_masks',
    'masks_from_params',
    'validate_masks',
    'sparsity_report',
    'format_report',
    'save_masks',
    'load_masks',
    'magnitude_scores',
    'wanda_scores',
    'global_masks',
    'group_mask',
    'nm_mask',
    'sparsegpt_prune',
    'perplexity',
    'delta_log_ppl',
]
