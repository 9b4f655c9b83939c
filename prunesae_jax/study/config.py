"""The study's config: one schema (`base_config`) and a fail-fast `validate`.

Every `configs/*.py` starts from `base_config()` and overrides fields, so the
schema lives in one place and `validate` can reject a misspelt field. Each stage's
dataclass checks its own fields (prunesae_jax.pruning.PruneArgs, prunesae_jax.sae.SAEConfig
and TrainConfig); `validate` builds them from the config (`prune_args`, `train_config`,
`sae_config`), so their checks run up front and their errors name the config field, and adds
the checks that span fields or belong to the study. The fields (all required; types are
enforced by ConfigDict on override):

  name                 str   label used in the report title
  model                str   a zoo name ('gemma-3-270m', 'smollm2-135m'), a local HF folder, a .gguf
                             file, a hub id 'org/name', or 'tiny:<family>' (a random tiny model from
                             prunesae_jax.testing.tiny_config; family llama | gemma2 | gemma3_text)
  dtype                str   float32 | bfloat16 | float16: the weights and forward pass
  layer                int   the resid_post layer the SAEs read (0-based block output); -1 = middle,
                             i.e. num_layers // 2. Range-checked once the model is loaded.
  seed                 int   the study's base seed (data order, tiny model init)
  data.{train,calibration,eval}   where each stage's text comes from (prunesae_jax.data.CorpusSpec):
                       source     'builtin' (the offline corpus), a preset ('fineweb-edu', 'wikitext-2'),
                                  'hf:<hub name>' (any HF datasets dataset), or a local path: a .txt /
                                  .jsonl / .parquet file or a folder of them / a saved HF dataset
                       split      train | calibration | evaluation (disjoint by document hash; the
                                  wikitext-2 preset maps them to its own train / validation / test) | all
                       text_field the column holding the text
                       hf_config  HF config name ('' = the preset's or none), e.g. 'sample-10BT'
                       hf_split   HF split to read ('' = the preset's, else 'train')
  calibration          n_samples x seq_len tokens of calibration data for Wanda / SparseGPT
  ppl                  window, stride, max_tokens (cap on evaluated tokens; 0 = the whole split),
                       batch_size: the windowed perplexity protocol (BOS prepended to every window)
  pruning.methods      tuple of str   magnitude | wanda | sparsegpt (prunesae_jax.pruning.METHODS)
  pruning.sparsities   tuple of float in [0, 1), no duplicates; 0.0 is the dense condition
  pruning.group        ConfigDict method -> group: magnitude per_row | per_matrix | global; wanda
                       per_row | per_matrix; sparsegpt '' (its own 128-input blocks); any method
                       'N:M' (e.g. '2:4', which fixes the sparsity at N/M)
  pruning.block_sequential bool  calibrate block by block on the pruned model's own activations
  sae                  architecture (topk | batchtopk | relu | jumprelu), expansion (latents = expansion x
                       hidden size), k, n_tokens (activation tokens per condition), seq_len (context of
                       the captured sequences), batch_size, lr (0.0 = lr scaling rule
                       2e-4 / sqrt(n_latents / 2^14)), n_seeds (>= 2, trained in one vmapped run), seed,
                       aux_k_coef, dead_tokens (tokens without firing before a latent counts as dead;
                       0 = min(10M, training tokens / 10); a window longer than the run is refused),
                       capture_batch (sequences per forward pass when capturing activations),
                       epochs (passes over the captured tokens), store_dtype (float32 | float16 |
                       bfloat16 on disk), checkpoint_every (steps between Orbax checkpoints, 0 = none),
                       snapshots (fractions of the training steps at which every seed's decoder is
                       kept, to measure the seed agreement during training: convergence)
  analysis             tau (MNN cosine threshold), taus (robustness thresholds), n_bootstrap, ci
                       (confidence level), n_quintiles, seed, transfer_tokens (tokens for FVU / L0 /
                       Jaccard / CE recovered), causal_features (dense features ablated exactly),
                       causal_tokens (tokens of each ablation), causal_measure ('exact': correlate
                       survival with the exactly ablated features' effects; 'attribution': with the
                       gradient x activation estimate of every feature), pairing ('distinct': every
                       condition's SAEs start from their own inits, survival over all (dense seed,
                       pruned seed) pairs; 'shared': seed s starts from the same init and data order in
                       every condition, survival over the pairs (s, s), with the init-only null),
                       min_seed_floor (a dense seed floor below it makes survival and fragility "not
                       readable"), min_firings (training firings a latent needs to enter the fragility
                       quintiles). Minimum sizes (MIN_TOKENS): ppl.max_tokens, transfer_tokens and
                       causal_tokens below them give intervals too wide to separate conditions
  transfer             the fixed dictionary for RQ3: source 'dense' (the dense condition's SAE, seed 0)
                       or 'pretrained'; repo (HF repo id, e.g. 'google/gemma-scope-2b-pt-res'), path
                       (file or folder inside it, or a local path when repo is ''); the format
                       (Gemma Scope v1 / v2, SAELens, sparsify) is detected from the files
  mesh                 seed, data: the SAE trainer's device mesh (seeds x data-parallel; -1 = all
                       remaining devices). model, model_sharding: the decoder forward's mesh (data x
                       model over all devices, data = devices / model) and its params' layout:
                       'none' (replicated; batch split over data), 'fsdp' (weights split over data),
                       'tp' (MLP / heads / vocab split over model, needs model >= 2); see
                       prunesae_jax/sharding.py. Ignored on one device.
  distributed          enabled (jax.distributed.initialize() in launch/run_study.py before any JAX
                       use; one process per host), coordinator_address ('' = $JAX_COORDINATOR_ADDRESS
                       or auto-detected), num_processes (0 = $JAX_NUM_PROCESSES or auto),
                       process_id (-1 = $JAX_PROCESS_ID or auto); on TPU pods leave them unset
  progress             bool  tqdm progress bars
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections

from prunesae_jax import pruning
from prunesae_jax.data import PRESETS as DATA_PRESETS
from prunesae_jax.data import SPLITS
from prunesae_jax.data.corpus import FILE_EXTENSIONS
from prunesae_jax.errors import InputError
from prunesae_jax.models.config import DTYPES, FAMILIES
from prunesae_jax.models.zoo import ZOO_NAMES
from prunesae_jax.sae import SAEConfig, TrainConfig
from prunesae_jax.sae.store import DTYPES as STORE_DTYPES
from prunesae_jax.sharding import STRATEGIES

__all__ = [
    'ConfigError',
    'analysis_settings',
    'condition_seed',
    'conditions_of',
    'ConfigPathError',
    'base_config',
    'paper_base_config',
    'validate',
    'validate_layer',
    'validate_nm_widths',
    'resolve_layer',
    'n_sequences',
    'sae_budget',
    'prune_args',
    'train_config',
    'sae_config',
    'MIN_TOKENS',
    'PAIRINGS',
]

PAIRINGS = ('distinct', 'shared')
# The fewest tokens each measure is computed on (below them the CIs do not separate conditions).
MIN_TOKENS = {'ppl.max_tokens': 4096, 'analysis.transfer_tokens': 2048, 'analysis.causal_tokens': 1024}
TRANSFER_SOURCES = ('dense', 'pretrained')
_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')


class ConfigError(InputError):
    """A config value the study cannot run with (an InputError: the launcher exits with status 2)."""


class ConfigPathError(ConfigError, FileNotFoundError):
    """A local path named in the config does not exist."""


def data_source(
    source: str = 'builtin', split: str = 'train', text_field: str = 'text', hf_config: str = '', hf_split: str = ''
) -> ml_collections.ConfigDict:
    """One text source of the study (the fields of prunesae_jax.data.CorpusSpec; '' = default)."""
    return ml_collections.ConfigDict(
        {'source': source, 'split': split, 'text_field': text_field, 'hf_config': hf_config, 'hf_split': hf_split}
    )


def base_config() -> ml_collections.ConfigDict:
    """Every field the study reads, with the default run's values (see the module docstring)."""
    c = ml_collections.ConfigDict()
    c.name = 'default'
    c.model = 'gemma-3-270m'
    c.dtype = 'float32'
    c.layer = -1
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.train = data_source('builtin', 'train')
    c.data.calibration = data_source('builtin', 'calibration')
    c.data.eval = data_source('builtin', 'evaluation')

    c.calibration = ml_collections.ConfigDict({'n_samples': 32, 'seq_len': 128})
    c.ppl = ml_collections.ConfigDict({'window': 256, 'stride': 128, 'max_tokens': 8192, 'batch_size': 8})

    c.pruning = ml_collections.ConfigDict()
    c.pruning.methods = ('magnitude', 'wanda')
    c.pruning.sparsities = (0.0, 0.3, 0.5)
    # The paper's revision: one global magnitude threshold; Wanda compared per output row as in the
    # Wanda reference (set 'per_matrix' for the revision's variant).
    c.pruning.group = ml_collections.ConfigDict({'magnitude': 'global', 'wanda': 'per_row', 'sparsegpt': ''})
    c.pruning.block_sequential = True

    c.sae = ml_collections.ConfigDict(
        {
            'architecture': 'topk',
            'expansion': 8,
            'k': 32,
            'n_tokens': 65536,
            'seq_len': 128,
            'batch_size': 1024,
            'lr': 0.0,
            'n_seeds': 3,
            'seed': 0,
            'aux_k_coef': 1.0 / 32,
            'dead_tokens': 0,
            'capture_batch': 16,
            'epochs': 1,
            'store_dtype': 'float32',
            'checkpoint_every': 0,
            'snapshots': (0.25, 0.5, 1.0),
        }
    )

    c.analysis = ml_collections.ConfigDict(
        {
            'tau': 0.7,
            'taus': (0.6, 0.7, 0.8),
            'n_bootstrap': 1000,
            'ci': 0.95,
            'n_quintiles': 5,
            'seed': 0,
            'transfer_tokens': 4096,
            'causal_features': 64,
            'causal_tokens': 2048,
            'causal_measure': 'attribution',
            'pairing': 'distinct',
            'min_seed_floor': 0.2,
            'min_firings': 10,
        }
    )

    c.transfer = ml_collections.ConfigDict({'source': 'dense', 'repo': '', 'path': ''})

    c.mesh = ml_collections.ConfigDict({'seed': 1, 'data': -1, 'model': 1, 'model_sharding': 'none'})
    c.distributed = ml_collections.ConfigDict(
        {'enabled': False, 'coordinator_address': '', 'num_processes': 0, 'process_id': -1}
    )
    c.progress = True
    return c


# --------------------------------------------------------------------------- the stages' dataclasses


@contextlib.contextmanager
def _naming(section: str, keys: Mapping[str, str], none_as: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Re-raises a stage dataclass's InputError as a ConfigError that names the config field.

    The dataclasses' messages start with '<field>=<value>'; `keys` maps their fields to config
    fields ('k' -> 'sae.k'), and `none_as` gives the config's spelling of a field's None (lr 0.0).
    A message about no single field is prefixed with config.<section>.
    """
    try:
        yield
    except ConfigError:
        raise
    except InputError as e:
        msg = str(e)
        for name, key in keys.items():
            if msg.startswith(f'{name}='):
                msg = f'config.{key}{msg[len(name) :]}'
                if none_as and name in none_as:
                    msg += f' (config.{key}={none_as[name]!r} means None)'
                break
        else:
            msg = f'config.{section}: {msg}'
        raise ConfigError(msg) from None


def prune_args(config: Any, method: str, sparsity: float) -> pruning.PruneArgs:
    """The pruning arguments of the condition (method, sparsity) of config's grid.

    config.pruning.group[method] is a group name, '' (the method's own: SparseGPT's blocks) or
    'N:M', which fixes the sparsity (validate checks that sparsity is N / M).
    """
    group = config.pruning.group[method] if method in config.pruning.group else ''
    keys = {
        'method': 'pruning.methods',
        'sparsity': 'pruning.sparsities',
        'group': f'pruning.group.{method}',
        'sequential': 'pruning.block_sequential',
        'batch_size': 'calibration.n_samples',
    }
    with _naming('pruning', keys):
        group, nm = pruning.parse_group(group)
        return pruning.PruneArgs(
            method,
            None if nm else sparsity,
            group,
            nm,
            sequential=config.pruning.block_sequential,
            batch_size=max(1, min(8, config.calibration.n_samples)),
        )


def train_config(config: Any, n_tokens: int, seed: int | None = None) -> TrainConfig:
    """How config.sae trains on n_tokens stored activation tokens; seed: the condition's first
    seed (default config.sae.seed)."""
    sae = config.sae
    n_steps, batch = _steps(config, n_tokens)
    keys = {
        'n_seeds': 'sae.n_seeds',
        'seed': 'sae.seed',
        'batch_size': 'sae.batch_size',
        'lr': 'sae.lr',
        'checkpoint_every': 'sae.checkpoint_every',
        'snapshot_fracs': 'sae.snapshots',
        'progress': 'progress',
    }
    with _naming('sae', keys, none_as={'lr': 0.0}):
        return TrainConfig(
            n_seeds=sae.n_seeds,
            seed=sae.seed if seed is None else seed,
            batch_size=batch,
            n_steps=n_steps,
            lr=sae.lr or None,
            warmup_steps=max(1, min(100, n_steps // 10)),
            checkpoint_every=sae.checkpoint_every,
            snapshot_fracs=tuple(sae.snapshots),
            eval_tokens=min(16384, n_tokens),
            progress=config.progress,
        )


def sae_config(config: Any, d_model: int) -> SAEConfig:
    """The SAE of config.sae on a model of hidden size d_model (expansion x d_model latents)."""
    sae = config.sae
    keys = {'architecture': 'sae.architecture', 'k': 'sae.k', 'dead_tokens': 'sae.dead_tokens'}
    with _naming('sae', keys, none_as={'dead_tokens': 0}):
        return SAEConfig(
            d_in=d_model,
            n_latents=sae.expansion * d_model,
            architecture=sae.architecture,
            k=sae.k,
            aux_coeff=sae.aux_k_coef,
            dead_tokens=sae.dead_tokens or None,
        )


# --------------------------------------------------------------------------- validation


def _fail(field: str, value: Any, accepted: str) -> None:
    raise ConfigError(f'config.{field}={value!r} is not valid; accepted: {accepted}')


def _check_keys(cfg: Any, schema: Any, prefix: str = '') -> None:
    """Rejects fields the schema does not know (a typo would otherwise be silently ignored)."""
    for k in cfg.keys():
        if k not in schema:
            name = f'{prefix}{k}'
            raise ConfigError(f'unknown config field {name!r}; accepted: {", ".join(sorted(schema.keys()))}')
        if isinstance(schema[k], ml_collections.ConfigDict):
            if not isinstance(cfg[k], (ml_collections.ConfigDict, Mapping)):
                _fail(f'{prefix}{k}', cfg[k], 'a ConfigDict of ' + ', '.join(sorted(schema[k].keys())))
            if f'{prefix}{k}' == 'pruning.group':  # a map method -> group: any subset of the methods
                for m in cfg[k].keys():
                    _choice(m, f'pruning.group.{m}', pruning.METHODS)
                continue
            _check_keys(cfg[k], schema[k], f'{prefix}{k}.')
    for k in schema.keys():
        if k not in cfg:
            raise ConfigError(
                f'config field {prefix + k!r} is missing; start configs from prunesae_jax.study.config.base_config()'
            )


def _get(cfg: Any, field: str) -> Any:
    """cfg's value at a dotted field name ('sae.k')."""
    for part in field.split('.'):
        cfg = cfg[part]
    return cfg


def _int(cfg: Any, field: str, lo: int | None = None, hi: int | None = None) -> int:
    v = _get(cfg, field)
    ok = isinstance(v, int) and not isinstance(v, bool)
    if ok and lo is not None and v < lo:
        ok = False
    if ok and hi is not None and v > hi:
        ok = False
    if not ok:
        rng = f'an int >= {lo}' if hi is None else f'an int in [{lo}, {hi}]'
        _fail(field, v, rng)
    return v


def _float(cfg: Any, field: str, lo: float, hi: float, lo_open=False, hi_open=False) -> float:
    v = _get(cfg, field)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        _fail(field, v, f'a number in {"(" if lo_open else "["}{lo}, {hi}{")" if hi_open else "]"}')
    return float(v)


def _choice(value: Any, field: str, accepted: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in accepted:
        _fail(field, value, ' | '.join(accepted))
    return value


def _check_model(spec: Any) -> None:
    if not isinstance(spec, str) or not spec:
        _fail('model', spec, 'a non-empty string')
    if spec.startswith('tiny:'):
        _choice(spec, 'model', tuple(f'tiny:{f}' for f in FAMILIES))
        return
    if spec in ZOO_NAMES:
        return
    path = os.path.expanduser(spec)
    looks_local = spec.endswith('.gguf') or spec.startswith(('/', '.', '~')) or os.path.exists(path)
    if looks_local:
        if spec.endswith('.gguf') and os.path.isfile(path):
            return
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, 'config.json')):
            return
        raise ConfigPathError(
            f'config.model={spec!r}: no HF folder with config.json or .gguf file '
            'there; accepted: a zoo name, a local HF folder or .gguf, a hub id '
            "'org/name', or 'tiny:<family>'"
        )
    if _HUB_ID.match(spec):
        return
    _fail(
        'model',
        spec,
        f'a zoo name ({", ".join(ZOO_NAMES)}), a local HF folder or .gguf file, '
        f"a hub id 'org/name', or 'tiny:<family>' with family in {', '.join(FAMILIES)}",
    )


_SNIFF_BYTES = 1 << 20


def _check_data_file(field: str, src: str) -> None:
    """A .parquet file needs pyarrow; a .txt / .jsonl file must be UTF-8 (its first MiB is checked
    here; the rest where it is read)."""
    import codecs  # pylint: disable=g-import-not-at-top
    import importlib.util  # pylint: disable=g-import-not-at-top

    path = os.path.expanduser(src)
    if src.lower().endswith('.parquet'):
        if importlib.util.find_spec('pyarrow') is None:
            raise ConfigError(
                f'config.{field}.source={src!r} is a .parquet file and pyarrow is not '
                'installed; accepted: a .txt / .jsonl file, or install the reader: pip '
                'install prunesae_jax[datasets]'
            )
        return
    try:
        with open(path, 'rb') as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        raise ConfigError(
            f'config.{field}.source={src!r} cannot be read ({e.strerror}); accepted: a '
            'readable .txt / .jsonl / .parquet file'
        ) from None
    try:  # incremental: a character cut at the end of the chunk is not an error
        codecs.getincrementaldecoder('utf-8')().decode(head, final=False)
    except UnicodeDecodeError as e:
        raise ConfigError(
            f'config.{field}.source={src!r} is not UTF-8 text ({e.reason}: byte '
            f'{head[e.start : e.start + 1]!r} at offset {e.start}); accepted: UTF-8 .txt / '
            '.jsonl files (convert with iconv)'
        ) from None


def _check_data_source(cfg: Any, which: str) -> None:
    d = cfg.data[which]
    field = f'data.{which}'
    for k in ('source', 'text_field'):
        if not isinstance(d[k], str) or not d[k]:
            _fail(f'{field}.{k}', d[k], 'a non-empty string')
    for k in ('hf_config', 'hf_split'):
        if not isinstance(d[k], str):
            _fail(f'{field}.{k}', d[k], "a string ('' = the default)")
    _choice(d.split, f'{field}.split', SPLITS + ('all',))
    src = d.source
    if src == 'builtin' or src in DATA_PRESETS or (src.startswith('hf:') and len(src) > 3):
        return
    if os.path.isdir(os.path.expanduser(src)):
        return
    if os.path.isfile(os.path.expanduser(src)):
        if not src.lower().endswith(FILE_EXTENSIONS):
            _fail(f'{field}.source', src, 'a file ending in ' + ' / '.join(FILE_EXTENSIONS))
        if os.path.getsize(os.path.expanduser(src)) == 0:  # caught here, before any model is loaded
            raise ConfigError(
                f'config.{field}.source={src!r} is an empty file (zero tokens); accepted: a file with text'
            )
        _check_data_file(field, src)
        return
    if os.sep in src or src.startswith(('.', '~')) or os.path.splitext(src)[1]:
        raise ConfigPathError(
            f'config.{field}.source={src!r} does not exist; accepted: a local .txt/.jsonl/.parquet file or folder'
        )
    _fail(
        f'{field}.source',
        src,
        "'builtin', "
        + ', '.join(repr(p) for p in DATA_PRESETS)
        + ", 'hf:<hub name>', or a local .txt/.jsonl/.parquet file or folder",
    )


def _check_pruning(config: Any) -> None:
    """The grid's methods and sparsities, then each condition's PruneArgs (which checks the rest)."""
    methods = config.pruning.methods
    if not isinstance(methods, (tuple, list)) or not methods:
        _fail('pruning.methods', methods, 'a non-empty tuple of ' + ' | '.join(pruning.METHODS))
    for m in methods:
        _choice(m, 'pruning.methods', pruning.METHODS)
    if len(set(methods)) != len(methods):
        _fail('pruning.methods', tuple(methods), 'a tuple without duplicates')
    sparsities = config.pruning.sparsities
    if not isinstance(sparsities, (tuple, list)) or not sparsities:
        _fail('pruning.sparsities', sparsities, 'a non-empty tuple of numbers in [0, 1)')
    with _naming('pruning', {'sparsity': 'pruning.sparsities'}):
        for s in sparsities:
            pruning.check_sparsity(s)
    if len({round(float(s), 9) for s in sparsities}) != len(sparsities):
        _fail('pruning.sparsities', tuple(sparsities), 'a tuple without duplicates')
    for m in methods:
        if m not in config.pruning.group:
            _fail('pruning.group', dict(config.pruning.group), f'a group for every method, {m!r} included')
        with _naming('pruning', {'group': f'pruning.group.{m}'}):
            _, nm = pruning.parse_group(config.pruning.group[m])
        if nm:  # an N:M pattern prunes N / M: the grid's other sparsities cannot be run
            ratio = nm[0] / nm[1]
            bad = [s for s in sparsities if s != 0 and abs(s - ratio) > 1e-9]
            if bad:
                _fail(
                    'pruning.sparsities',
                    tuple(sparsities),
                    f'0.0 and {ratio} only, since pruning.group.{m}={config.pruning.group[m]!r} fixes the sparsity',
                )
        for s in sparsities:
            prune_args(config, m, s)


def validate(config: Any) -> ml_collections.ConfigDict:
    """Checks every field before any work starts; returns the config unchanged.

    Raises ConfigError, a ValueError (ConfigPathError, also a FileNotFoundError, for missing local
    paths), with one line naming the offending value and what is accepted. The checks that need
    the model (the layer's upper bound, the SAE's size) are `validate_layer`'s.
    """
    if not isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        raise ConfigError(f'config must be an ml_collections.ConfigDict, got {type(config).__name__}')
    _check_keys(config, base_config())

    if not isinstance(config.name, str):
        _fail('name', config.name, 'a string')
    _check_model(config.model)
    _choice(config.dtype, 'dtype', DTYPES)
    layer = config.layer
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < -1:
        _fail('layer', layer, 'an int >= 0, or -1 for the middle layer')
    _int(config, 'seed', 0)

    for which in ('train', 'calibration', 'eval'):
        _check_data_source(config, which)

    _int(config, 'calibration.n_samples', 1)
    _int(config, 'calibration.seq_len', 2)
    window = _int(config, 'ppl.window', 2)
    _int(config, 'ppl.stride', 1, window)
    _int(config, 'ppl.max_tokens', 0)
    if 0 < config.ppl.max_tokens < MIN_TOKENS['ppl.max_tokens']:
        _fail(
            'ppl.max_tokens', config.ppl.max_tokens, f'0 (the whole split) or an int >= {MIN_TOKENS["ppl.max_tokens"]}'
        )
    _int(config, 'ppl.batch_size', 1)

    _check_pruning(config)

    # SAEConfig needs the model's width: validate_layer builds it. These fields are the study's
    # (how the SAE is sized and fed), or feed sae_budget, which divides by them.
    _int(config, 'sae.expansion', 1)
    _int(config, 'sae.n_tokens', 1)
    _int(config, 'sae.seq_len', 2)
    _int(config, 'sae.batch_size', 1)
    if config.sae.batch_size > config.sae.n_tokens:
        _fail('sae.batch_size', config.sae.batch_size, f'at most sae.n_tokens={config.sae.n_tokens}')
    _int(config, 'sae.n_seeds', 2)  # seed agreement needs two seeds
    _float(config, 'sae.aux_k_coef', 0.0, float('inf'))
    _int(config, 'sae.capture_batch', 1)
    _int(config, 'sae.epochs', 1)
    _choice(config.sae.store_dtype, 'sae.store_dtype', STORE_DTYPES)
    tokens, steps, batch = sae_budget(config)
    train_config(config, tokens)
    if config.sae.dead_tokens > steps * batch:
        _fail(
            'sae.dead_tokens',
            config.sae.dead_tokens,
            f'at most the {steps * batch} tokens the SAEs train on ({steps} steps of {batch}; a '
            'longer window is never reached, so AuxK never runs), or 0 for min(10M, tokens / 10)',
        )

    _float(config, 'analysis.tau', 0.0, 1.0, lo_open=True)
    taus = config.analysis.taus
    if (
        not isinstance(taus, (tuple, list))
        or not taus
        or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 < t <= 1.0 for t in taus)
    ):
        _fail('analysis.taus', taus, 'a non-empty tuple of numbers in (0, 1]')
    if len(set(taus)) != len(taus):
        _fail('analysis.taus', tuple(taus), 'a tuple without duplicates')
    _int(config, 'analysis.n_bootstrap', 0)
    _float(config, 'analysis.ci', 0.0, 1.0, lo_open=True, hi_open=True)
    _int(config, 'analysis.n_quintiles', 2)
    _int(config, 'analysis.seed', 0)
    _int(config, 'analysis.transfer_tokens', MIN_TOKENS['analysis.transfer_tokens'])
    _int(config, 'analysis.causal_features', 0)
    _int(config, 'analysis.causal_tokens', MIN_TOKENS['analysis.causal_tokens'])
    _choice(config.analysis.pairing, 'analysis.pairing', PAIRINGS)
    _float(config, 'analysis.min_seed_floor', 0.0, 1.0)
    _int(config, 'analysis.min_firings', 1)
    _choice(config.analysis.causal_measure, 'analysis.causal_measure', ('exact', 'attribution'))
    if config.analysis.causal_measure == 'exact' and config.analysis.causal_features < 3:
        _fail(
            'analysis.causal_features',
            config.analysis.causal_features,
            "an int >= 3 when analysis.causal_measure='exact'",
        )

    t = config.transfer
    _choice(t.source, 'transfer.source', TRANSFER_SOURCES)
    if not isinstance(t.repo, str) or not isinstance(t.path, str):
        _fail('transfer.repo', (t.repo, t.path), 'strings')
    if t.source == 'pretrained' and not t.path:
        _fail('transfer.path', t.path, "the dictionary's file or folder (inside transfer.repo, or local)")
    if t.source == 'pretrained' and not t.repo and not os.path.exists(os.path.expanduser(t.path)):
        raise ConfigPathError(
            f'config.transfer.path={t.path!r} does not exist and transfer.repo is '
            "''; accepted: a local dictionary path, or an HF repo id in transfer.repo"
        )

    for ax in ('seed', 'data'):
        v = config.mesh[ax]
        if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
            _fail(f'mesh.{ax}', v, 'an int >= 1, or -1 for all remaining devices')
    if config.mesh.seed == -1 and config.mesh.data == -1:
        _fail('mesh', dict(config.mesh), 'at most one axis set to -1')
    _int(config, 'mesh.model', 1)
    _choice(config.mesh.model_sharding, 'mesh.model_sharding', STRATEGIES)
    if config.mesh.model > 1 and config.mesh.model_sharding != 'tp':
        _fail(
            'mesh.model', config.mesh.model, f"1 unless mesh.model_sharding='tp' (it is {config.mesh.model_sharding!r})"
        )
    if config.mesh.model_sharding == 'tp' and config.mesh.model < 2:
        _fail(
            'mesh.model_sharding', 'tp', "'tp' with mesh.model >= 2 (the tensor-parallel axis size), or 'none' | 'fsdp'"
        )
    d = config.distributed
    if not isinstance(d.enabled, bool):
        _fail('distributed.enabled', d.enabled, 'True | False')
    if not isinstance(d.coordinator_address, str) or (
        d.coordinator_address and not re.match(r'^\S+:\d+$', d.coordinator_address)
    ):
        _fail(
            'distributed.coordinator_address',
            d.coordinator_address,
            "'' (auto / $JAX_COORDINATOR_ADDRESS) or 'host:port' of process 0",
        )
    _int(config, 'distributed.num_processes', 0)
    pid = d.process_id
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < -1 or (d.num_processes and pid >= d.num_processes):
        _fail(
            'distributed.process_id', pid, '-1 (auto / $JAX_PROCESS_ID) or an int in [0, distributed.num_processes - 1]'
        )
    if not isinstance(config.progress, bool):
        _fail('progress', config.progress, 'True | False')
    return config


def n_sequences(n_tokens: int, seq_len: int) -> int:
    """Rows of seq_len tokens that hold n_tokens SAE tokens (BOS is never an SAE token)."""
    return max(1, -(-int(n_tokens) // (int(seq_len) - 1)))


def _steps(config: Any, n_tokens: int) -> tuple[int, int]:
    """(training steps, batch size) of config.sae's epochs over n_tokens stored tokens."""
    batch = min(config.sae.batch_size, n_tokens)
    return max(1, (n_tokens * config.sae.epochs) // batch), batch


def sae_budget(config: Any) -> tuple[int, int, int]:
    """(activation tokens stored per condition, training steps, batch size) of config.sae."""
    sae = config.sae
    tokens = n_sequences(sae.n_tokens, sae.seq_len) * (sae.seq_len - 1)
    return (tokens, *_steps(config, tokens))


def resolve_layer(config: Any, num_layers: int) -> int:
    """The 0-based resid_post layer: config.layer, or num_layers // 2 when it is -1."""
    return num_layers // 2 if config.layer == -1 else int(config.layer)


def validate_layer(config: Any, num_layers: int, d_model: int | None = None) -> int:
    """Checks config.layer and, given the hidden size d_model, the SAE (its SAEConfig, sae.k
    against the dictionary size, the fragility bins) once the model is known."""
    layer = resolve_layer(config, num_layers)
    if not 0 <= layer < num_layers:
        _fail(
            'layer',
            config.layer,
            f'an int in [0, {num_layers - 1}] for {config.model} ({num_layers} layers), or -1 for the middle layer',
        )
    if d_model is not None and config.sae.k > config.sae.expansion * d_model:
        _fail('sae.k', config.sae.k, f'at most sae.expansion x hidden size = {config.sae.expansion * d_model}')
    if d_model is not None:
        sae_config(config, d_model)
    # The fragility quintiles (RQ4) take >= 10 latents each: more bins than n_latents / 10 can
    # never be filled, whatever the SAEs learn.
    n_latents = None if d_model is None else config.sae.expansion * d_model
    if n_latents is not None and 10 * config.analysis.n_quintiles > n_latents:
        _fail(
            'analysis.n_quintiles',
            config.analysis.n_quintiles,
            f'an int in [2, {max(2, n_latents // 10)}] for {config.model}: each bin needs >= 10 '
            f'latents and the SAEs have {n_latents} (sae.expansion={config.sae.expansion} x hidden '
            f'size {d_model})',
        )
    return layer


def validate_nm_widths(config: Any, widths: Mapping[str, int]) -> None:
    """Checks every 'N:M' pruning group against the model's prunable input widths.

    N:M keeps N of every M consecutive inputs of each output, so M must divide every width in
    `widths` (name -> input width of a prunable matrix, e.g. {'intermediate_size': 129}).
    """
    for method in config.pruning.methods:
        group = config.pruning.group[method] if method in config.pruning.group else ''
        _, nm = pruning.parse_group(group)
        if not nm:
            continue
        m = nm[1]
        if any(w % m for w in widths.values()):
            have = ', '.join(f'{k}={w}' for k, w in widths.items())
            _fail(
                f'pruning.group.{method}',
                group,
                f'an N:M pattern whose M divides every prunable input width of {config.model} ({have})',
            )


def paper_base_config() -> ml_collections.ConfigDict:
    """The paper's grid, shared by configs/paper_*.py; each sets model, layer and transfer.

    Magnitude and Wanda at 0 (dense) and six pruned levels 10-60 %; 8x TopK SAEs on ~1.5M
    FineWeb-Edu tokens (16 passes, so that they converge); tau = 0.7 (robustness at 0.6 / 0.8);
    calibration 128 x 2048 tokens
    (~262K, the Wanda reference's budget; the paper used ~300K FineWeb-Edu tokens); perplexity on
    WikiText-2 raw test, window 1024, stride 512, BOS prepended, bf16 weights.
    """
    c = base_config()
    c.dtype = 'bfloat16'
    # FineWeb-Edu sample-10BT, split into disjoint SAE-training and calibration documents by hash.
    c.data.train = data_source('fineweb-edu', 'train')
    c.data.calibration = data_source('fineweb-edu', 'calibration')
    # WikiText-2 raw: our 'evaluation' split is its test split.
    c.data.eval = data_source('wikitext-2', 'evaluation')
    c.calibration.update({'n_samples': 128, 'seq_len': 2048})
    c.ppl.update({'window': 1024, 'stride': 512, 'max_tokens': 0})
    c.pruning.sparsities = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    # 16 passes over the paper's 1.5M tokens (~5.9k steps of 4096): one pass (366 steps) leaves 8x
    # SAEs near their init, where survival reads the shared init rather than pruning (docs/method.md,
    # "Pairing protocols"). --config.sae.epochs=1 reproduces the paper's budget; the report's
    # convergence table and seed floor say whether a budget sufficed.
    c.sae.update(
        {'k': 64, 'n_tokens': 1_500_000, 'epochs': 16, 'seq_len': 1024, 'batch_size': 4096, 'capture_batch': 8}
    )
    c.analysis.update(
        {'transfer_tokens': 65536, 'causal_features': 256, 'causal_tokens': 16384, 'causal_measure': 'exact'}
    )
    return c  # everything else (methods, Wanda per row, 3 seeds, tau 0.7, ...) as in base_config()


# --------------------------------------------------------------------------- the grid


def conditions_of(config) -> list[tuple[str, float]]:
    """[('dense', 0.0), (method, sparsity), ...]: dense first, then methods x sorted sparsities > 0."""
    sparsities = sorted(float(s) for s in config.pruning.sparsities if float(s) > 0)
    return [('dense', 0.0)] + [(m, s) for m in config.pruning.methods for s in sparsities]


def condition_seed(config, method: str, sparsity: float) -> int:
    """The first SAE seed of a condition.

    analysis.pairing='distinct': sae.seed for dense, a stable offset for pruned ones, so every
    condition's SAEs start from inits no other condition uses and survival (dense vs pruned) is
    measured across different inits exactly like the seed floor (dense vs dense).
    analysis.pairing='shared': sae.seed for every condition: seed s starts from the same init (and
    sees the same data order) in every condition; survival pairs (s, s), and the init-only null
    says how much of it the shared init alone explains.
    """
    if method == 'dense' or config.analysis.pairing == 'shared':
        return config.sae.seed
    from prunesae_jax.io import stable_hash  # pylint: disable=g-import-not-at-top

    h = int(stable_hash({'method': method, 'sparsity': round(float(sparsity), 9)}, 6), 16)
    return config.sae.seed + config.sae.n_seeds * (1 + h % 100_000)


def analysis_settings(config):
    """The analysis section as the measures' plain Settings dataclass."""
    from prunesae_jax.analysis import measures  # pylint: disable=g-import-not-at-top

    ana = config.analysis
    return measures.Settings(
        tau=ana.tau,
        taus=tuple(float(t) for t in ana.taus),
        pairing=ana.pairing,
        n_bootstrap=ana.n_bootstrap,
        ci=ana.ci,
        seed=ana.seed,
        min_firings=ana.min_firings,
        n_quintiles=ana.n_quintiles,
        causal_measure=ana.causal_measure,
        batch_size=config.sae.capture_batch,
    )
