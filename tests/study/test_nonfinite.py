"""NaN / inf guards: a forward pass, calibration statistics, captured activations and the
pipeline's context (stage, condition, layer, step) on the message; the finished stages stay."""

from __future__ import annotations

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from prunesae_jax.errors import NonFiniteError
from prunesae_jax.models import init_params
from prunesae_jax.models.load import LoadedModel
from prunesae_jax.pruning import calibrate
from prunesae_jax.pruning.perplexity import strided_nll
from prunesae_jax.study import pipeline, stages
from prunesae_jax.study.config import base_config
from prunesae_jax.study.workdir import StageCache
from prunesae_jax.testing import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _with_nan(params, layer: int, name: str):
    layers = [dict(lp) for lp in params['layers']]
    layers[layer][name] = layers[layer][name].at[0, 0].set(jnp.nan)
    return {**params, 'layers': layers}


@pytest.fixture(scope='module')
def tiny():
    cfg = tiny_config('llama')
    return cfg, init_params(cfg, 0)


def test_nan_forward_stops_perplexity_at_its_batch(tiny):
    cfg, params = tiny
    stream = np.arange(5, 5 + 200, dtype=np.int32) % 120 + 3
    nll, count = strided_nll(cfg, params, stream, window=32, stride=16, batch_size=4)
    assert np.isfinite(nll) and count == 200
    with pytest.raises(NonFiniteError) as err:
        strided_nll(cfg, _with_nan(params, 2, 'q_proj'), stream, window=32, stride=16, batch_size=4)
    e = err.value
    assert (e.what, e.stage, e.step) == ('perplexity NLL', 'perplexity', 0)
    assert 'stage=perplexity' in str(e) and 'step=0' in str(e)


def test_nan_calibration_statistics_name_layer_and_step():
    stats = {'attn_in': jnp.ones((4,)), 'mlp_in': jnp.array([1.0, jnp.inf, 0.0, 2.0])}
    calibrate.check_stats({'attn_in': jnp.ones((4,))}, 3, step=1)  # finite: no error
    with pytest.raises(NonFiniteError) as err:
        calibrate.check_stats(stats, 3, step=1)
    e = err.value
    assert (e.stage, e.layer, e.step, e.condition) == ('calibration', 3, 1, None)
    assert "'mlp_in'" in e.what
    # with_context fills what a caller knows and keeps what the guard set
    e2 = e.with_context(condition='wanda@0.5', layer=9, detail='seed 0')
    assert (e2.condition, e2.layer) == ('wanda@0.5', 3)
    assert str(e2).startswith(
        "non-finite (NaN or inf) calibration statistics of input 'mlp_in'; "
        'stage=calibration, condition=wanda@0.5, layer=3, step=1'
    )


def test_first_nonfinite_calibration_batch(tiny):
    cfg, params = tiny
    from prunesae_jax.models import embed  # pylint: disable=import-outside-toplevel

    tokens = np.full((3, 2, 8), 7, np.int32)
    hs = [embed(cfg, params, jnp.asarray(t)) for t in tokens]
    hs[2] = hs[2].at[0, 3, 5].set(jnp.nan)  # only the third batch carries a NaN
    assert calibrate.first_nonfinite_batch(cfg, params['layers'][0], 0, hs, calibrate.INPUT_SQ_NORMS) == 2
    assert calibrate.first_nonfinite_batch(cfg, params['layers'][0], 0, hs[:2], calibrate.INPUT_SQ_NORMS) is None


def _study(config, cfg, params, cache, layer=1):
    """The pipeline's state for a tiny model at `layer` (no tokenizer, no transfer dictionary)."""
    model = LoadedModel('tiny:llama', cfg, params, None, 'modelkey')
    return stages.Study(config, model, layer, None, cache, stages.Timings())


def test_capture_stops_at_the_first_nan_batch_and_leaves_no_stage(tiny, tmp_path):
    cfg, params = tiny
    config = base_config()
    config.sae.capture_batch = 2
    config.progress = False
    rows = np.full((6, 8), 9, np.int32)
    rows[:, 0] = cfg.bos_token_id
    # token 50's embedding row is NaN: only sequence 4 (the third batch of two) holds it
    bad = {**params, 'embed': params['embed'].at[50].set(jnp.nan)}
    rows[4, 5] = 50
    cache = StageCache(tmp_path)
    with pytest.raises(NonFiniteError) as err:
        stages.acts_stage(_study(config, cfg, bad, cache), bad, 'prunekey', 'tokkey', {'train': rows}, 'dense')
    e = err.value
    assert (e.what, e.stage, e.layer, e.step) == ('resid_post activations', 'capture', 1, 2)
    # nothing half-written: the acts stage has no folder (its temp folder was removed)
    acts = tmp_path / 'stages' / 'acts'
    assert not acts.exists() or not any(acts.iterdir())
    # the same rows without the NaN token capture fine: 6 x 7 tokens (BOS excluded)
    key, store = stages.acts_stage(
        _study(config, cfg, params, cache),
        params,
        'prunekey',
        'tokkey',
        {'train': np.where(rows == 50, 9, rows)},
        'dense',
    )
    assert store.n_tokens == 6 * 7 and cache.done('acts', key)


def test_run_names_condition_and_layer_and_keeps_finished_stages(tmp_path, monkeypatch):
    """An SAE loss going NaN in train() reaches the user with the condition and layer added."""
    spec = importlib.util.spec_from_file_location('smoke', ROOT / 'configs' / 'smoke.py')
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    config = smoke.get_config()
    config.sae.n_tokens = 256
    config.sae.batch_size = 128
    config.analysis.transfer_tokens = 2048  # the minima (study.config.MIN_TOKENS)
    config.analysis.causal_tokens = 1024
    calls = []

    def fake_ppl(*args, **kwargs):
        return {'ppl': 10.0, 'nll': 1.0, 'n_tokens': 1}

    def fake_acts(st, params, prune_key, tokens_key, tokens, label):
        calls.append(label)
        return 'actskey', None

    def nan_sae(*args, **kwargs):
        raise NonFiniteError('SAE loss', stage='sae', step=7, detail='seed 1; last good checkpoint: step 5')

    monkeypatch.setattr(stages, 'ppl_stage', fake_ppl)
    monkeypatch.setattr(stages, 'acts_stage', fake_acts)
    monkeypatch.setattr(stages, 'sae_stage', nan_sae)
    with pytest.raises(NonFiniteError) as err:
        pipeline.run(config, tmp_path / 'work')
    assert str(err.value) == (
        'non-finite (NaN or inf) SAE loss; stage=sae, condition=dense, '
        'layer=1, step=7; seed 1; last good checkpoint: step 5'
    )
    assert calls == ['dense']
    work = tmp_path / 'work'
    assert not (work / 'results.json').exists()
    assert [p.parent.parent.name for p in work.glob('stages/*/*/DONE')] == ['tokens']
