"""AuxK dead window and revival, the BatchTopK inference threshold, convergence snapshots and init_cos."""

import importlib
import os

import jax
import numpy as np
import pytest
from sae_synth import sparse_mixture

from prunesae_jax import sae
from prunesae_jax.errors import InputError

train_mod = importlib.import_module('prunesae_jax.sae.train')  # the module (sae.train is the function)

X, DIRS = sparse_mixture()


def _tcfg(**kw):
    base = dict(n_steps=150, n_seeds=1, batch_size=512, lr=3e-3, warmup_steps=10, progress=False, log_every=25)
    base.update(kw)
    return sae.TrainConfig(**base)


# ----------------------------------------------------------------------------- AuxK dead window


def test_resolve_dead_tokens():
    assert train_mod.resolve_dead_tokens(None, 150 * 512) == 7680  # a tenth of the run
    assert train_mod.resolve_dead_tokens(None, 10**9) == 10_000_000  # capped
    assert train_mod.resolve_dead_tokens(None, 5) == 1
    assert train_mod.resolve_dead_tokens(300, 3072) == 300
    assert train_mod.resolve_dead_tokens(3072, 3072) == 3072
    with pytest.raises(
        InputError,
        match=r'dead_tokens=3073 can never be reached: the run trains on 3072 tokens; '
        r'accepted: <= 3072, or None for auto',
    ):
        train_mod.resolve_dead_tokens(3073, 3072)
    with pytest.raises(InputError, match='dead_tokens=0'):
        sae.SAEConfig(16, 64, dead_tokens=0)
    assert sae.SAEConfig(16, 64).dead_tokens is None  # auto by default


def test_train_refuses_unreachable_dead_window():
    cfg = sae.SAEConfig(64, 128, k=4, dead_tokens=10_000_000)
    with pytest.raises(InputError, match=r'dead_tokens=10000000 can never be reached: the run trains on 5120 tokens'):
        train_mod.train(cfg, _tcfg(n_steps=10), X[:2048])


def test_auxk_revives_dead_latents(monkeypatch):
    """Half the latents start with a shrunken encoder column: they never win the top-k and die. There are
    as many latents as true directions, so the live half cannot explain the data and the residual holds
    what the dead half should learn. With AuxK (auto dead window) they revive; without, they stay dead."""
    n_dead = 128
    orig = train_mod.init_state

    def crippled(sae_cfg, tcfg, sample=None):
        st = orig(sae_cfg, tcfg, sample)
        st['params']['W_enc'] = st['params']['W_enc'].at[:, :, :n_dead].multiply(0.1)
        return st

    monkeypatch.setattr(train_mod, 'init_state', crippled)
    res = {}
    for ac in (0.0, 1.0 / 32):
        cfg = sae.SAEConfig(64, 256, k=4, aux_coeff=ac)  # dead_tokens=None: auto
        res[ac] = train_mod.train(cfg, _tcfg(), X)
    off, on = res[0.0], res[1.0 / 32]
    # measured: without AuxK 0.50 dead at every log; with it 0.035 at step 50 and 0.00 from step 125
    assert float(off.final['train_dead_frac'][0]) >= 0.45
    assert float(on.final['train_dead_frac'][0]) <= 0.1
    assert float(on.final['dead_frac'][0]) < float(off.final['dead_frac'][0]) - 0.3  # on held-out tokens too
    assert float(on.final['fvu'][0]) < float(off.final['fvu'][0])
    assert max(m['aux_loss'][0] for m in on.metrics) > 0  # AuxK ran ...
    assert int(on.final['aux_steps'][0]) > 0 and int(off.final['aux_steps'][0]) == 0  # ... and off did not
    assert int(on.final['dead_tokens'][0]) == 7680  # resolved: a tenth of 150 x 512 tokens


# ----------------------------------------------------------------------------- BatchTopK threshold


def _np_min_active(p, x, k):
    """The batch's smallest active pre-activation under BatchTopK (k * B largest positive ones); 0 if none."""
    pre = (x.astype(np.float64) - p['b_dec']) @ p['W_enc'].astype(np.float64) + p['b_enc']
    pos = np.sort(np.maximum(pre, 0).ravel())[::-1]
    cut = pos[k * len(x) - 1]
    active = pre[(pre >= cut) & (pre > 0)]
    return float(active.min()) if active.size else 0.0


@pytest.mark.parametrize(
    'kw,n_steps,start',
    [
        ({}, 12, 6),  # the defaults: beta 0.999, start step 1000 -> capped at n_steps // 2
        (dict(batchtopk_threshold_momentum=0.5, batchtopk_threshold_start_step=3), 12, 3),
    ],
)
def test_batchtopk_threshold_follows_dictionary_learning(kw, n_steps, start):
    cfg = sae.SAEConfig(64, 256, architecture='batchtopk', k=4, **kw)
    t = _tcfg(n_steps=n_steps, batch_size=256)
    beta = cfg.batchtopk_threshold_momentum
    state = train_mod.init_state(cfg, t, X[:1024])
    step = train_mod.make_train_step(cfg, t)
    thr_ref = -1.0  # dictionary_learning: < 0 = unset
    for i in range(n_steps):
        xb = X[i * 256 : (i + 1) * 256]
        p = jax.tree.map(lambda a: np.asarray(a[0]), state['params'])
        if i > start:  # reference: `if step > threshold_start_step: update_threshold(f)` before the update
            est = _np_min_active(p, xb, cfg.k)
            thr_ref = est if thr_ref < 0 else beta * thr_ref + (1 - beta) * est
        state, _ = step(state, xb)
        thr = np.asarray(state['params']['threshold'][0])
        assert thr.min() == thr.max()
        assert float(thr[0]) == pytest.approx(thr_ref, rel=1e-5, abs=1e-7), i
    assert thr_ref > 0
    assert train_mod.batchtopk_threshold_start(cfg, n_steps) == start
    assert beta == (0.999 if not kw else 0.5)


def test_batchtopk_threshold_start_rule():
    cfg = sae.SAEConfig(16, 64, architecture='batchtopk', k=2)
    assert [train_mod.batchtopk_threshold_start(cfg, n) for n in (1, 3, 400, 2000, 5000)] == [0, 1, 200, 1000, 1000]


# ----------------------------------------------------------------------------- snapshots and init_cos


def test_snapshot_fracs_validation():
    assert _tcfg(n_steps=24, snapshot_fracs=(0.25, 0.5, 1.0)).snapshot_steps == (6, 12, 24)
    assert _tcfg(n_steps=3, snapshot_fracs=[0.01, 0.5, 1]).snapshot_steps == (1, 2, 3)
    for bad in ((0.0,), (1.5,), (float('nan'),), (-0.2, 0.5), 0.5, '0.5'):
        with pytest.raises(InputError, match='snapshot_fracs'):
            _tcfg(snapshot_fracs=bad)


def test_snapshots_survive_kill_and_resume(tmp_path):
    cfg = sae.SAEConfig(64, 256, k=4, dead_tokens=1024)
    t = _tcfg(n_steps=24, batch_size=256, checkpoint_every=8, log_every=4, snapshot_fracs=(0.25, 0.5, 1.0))
    full = train_mod.train(cfg, t, X[:4096], workdir=str(tmp_path / 'a'))
    assert sorted(full.snapshots) == [6, 12, 24]
    assert full.snapshots[6].shape == (1, 256, 64)
    np.testing.assert_array_equal(full.snapshots[24], full.params_normalized['W_dec'])
    assert not np.array_equal(full.snapshots[6], full.snapshots[12])
    assert sorted(os.listdir(tmp_path / 'a' / 'snapshots')) == ['step_12.npy', 'step_24.npy', 'step_6.npy']

    killed = train_mod.train(cfg, t, X[:4096], workdir=str(tmp_path / 'b'), stop_at=13)  # checkpoint at 8
    assert sorted(killed.snapshots) == [6, 12]
    # the run that resumes from step 8 cannot retake step 6: it must come back from disk
    resumed = train_mod.train(cfg, t, X[:4096], workdir=str(tmp_path / 'b'))
    assert sorted(resumed.snapshots) == [6, 12, 24]
    for s in full.snapshots:
        np.testing.assert_array_equal(resumed.snapshots[s], full.snapshots[s], err_msg=str(s))
    plain = train_mod.train(cfg, t, X[:4096])  # no workdir: in memory only
    for s in full.snapshots:
        np.testing.assert_array_equal(plain.snapshots[s], full.snapshots[s], err_msg=str(s))
    assert train_mod.train(cfg, _tcfg(n_steps=4, batch_size=256), X[:4096]).snapshots == {}


def test_init_cos_and_initial_decoder():
    cfg = sae.SAEConfig(64, 256, k=4)
    t = _tcfg(n_steps=40, n_seeds=2, seed=3, batch_size=256)
    r = train_mod.train(cfg, t, X[:4096])
    w0 = train_mod.initial_decoder(cfg, 3, 2)
    assert w0.shape == (2, 256, 64)
    w = r.params['W_dec']  # raw units: the cosine is scale invariant
    cos = (w * w0).sum(-1) / (np.linalg.norm(w, axis=-1) * np.linalg.norm(w0, axis=-1))
    np.testing.assert_allclose(r.final['init_cos'], cos.mean(-1), rtol=1e-5)
    ic = r.final['init_cos']
    assert ic.shape == (2,) and (0.0 < ic).all() and (ic < 0.999).all()  # trained away from, not across, the init
