"""The CPU train step for several seeds (kernels.seed_loop_update: each seed's gradients and Adam in one
loop iteration, in place) against the stacked step (all seeds' gradients, then adam_apply over the
stacked arrays; reached with seeds_per_pass = S), and its dispatch."""

import jax
import numpy as np
import pytest

from prunesae_jax.sae import SAEConfig, TrainConfig, arch, kernels
from prunesae_jax.sae.arch.batchtopk import BatchTopK
from prunesae_jax.sae.train import _make_train_step, init_state, make_train_step

D, N, B, STEPS = 32, 128, 64, 20
_RNG = np.random.default_rng(0)
X = (_RNG.standard_normal((4096, D)) * _RNG.uniform(0.2, 2.0, D)).astype(np.float32)


def _batch(i, n_seeds, per_seed_data):
    if per_seed_data:
        return np.stack([X[((i * n_seeds + s) * B) % 4000 :][:B] for s in range(n_seeds)])
    return X[i * B : (i + 1) * B]


def _run(cfg, n_seeds, spp, per_seed_data=False, poison=None, steps=STEPS):
    """State and per-step metrics after `steps` steps; poison=(step, seed): that seed's batch of that
    step gets an entry of 1e30 (its squared error overflows to inf)."""
    t = TrainConfig(
        n_seeds=n_seeds,
        n_steps=steps,
        batch_size=B,
        lr=1e-2,
        warmup_steps=2,
        per_seed_data=per_seed_data,
        seeds_per_pass=spp,
        normalize=False,
        progress=False,
    )
    state, step = init_state(cfg, t, X), make_train_step(cfg, t)
    metrics, before = [], None
    for i in range(steps):
        x = _batch(i, n_seeds, per_seed_data).copy()
        if poison and poison[0] == i:
            x[poison[1], 3, 0] = 1e30
            before = jax.tree.map(np.array, state)
        state, m = step(state, x)
        metrics.append(jax.tree.map(np.asarray, m))
    return jax.tree.map(np.asarray, state), metrics, before


def _close(a, b, what):
    """Equal to a few float32 ulp of the array's scale (XLA fuses the two layouts' Adam differently)."""
    a, b = np.asarray(a), np.asarray(b)
    atol = 8 * np.finfo(np.float32).eps * float(np.abs(b).max())
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=atol, err_msg=what)


def _assert_states_close(got, want):
    for part in ('params',):
        for k in want[part]:
            _close(got[part][k], want[part][k], f'{part}/{k}')
    for m in ('mu', 'nu'):
        for k in want['opt_state'][m]:
            _close(got['opt_state'][m][k], want['opt_state'][m][k], f'{m}/{k}')
    for k in ('since_fired', 'fire_count', 'bad_step', 'aux_steps', 'step'):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize('per_seed_data', [False, True])
@pytest.mark.parametrize('n_seeds', [2, 3])
def test_topk_seed_loop_equals_stacked_step(n_seeds, per_seed_data):
    # latents go dead after 256 tokens: AuxK runs (for all seeds) on the steps where any seed has one
    cfg = SAEConfig(D, N, k=4, k_aux=8, dead_tokens=256)
    loop, m_loop, _ = _run(cfg, n_seeds, 1, per_seed_data)
    stacked, m_stacked, _ = _run(cfg, n_seeds, n_seeds, per_seed_data)
    assert max(float(m['aux_loss'].max()) for m in m_loop) > 0 and loop['aux_steps'].min() > 0
    _assert_states_close(loop, stacked)
    for a, b in zip(m_loop, m_stacked):
        for k in b:
            _close(a[k], b[k], f'metric {k}')


class _AutodiffBatchTopK(BatchTopK):
    """BatchTopK with loss_and_grads by autodiff: makes the seed loop take an architecture with an
    after_update (the inference threshold) and no AuxK."""

    def loss_and_grads(self, cfg, params, x, dead, use_aux=True):  # pylint: disable=invalid-overridden-method
        (loss, aux), g = jax.value_and_grad(lambda p: self.loss(cfg, p, x, dead, use_aux), has_aux=True)(params)
        return loss, aux, g


@pytest.fixture
def autodiff_batchtopk(monkeypatch):
    monkeypatch.setitem(arch._REGISTRY, 'batchtopk', _AutodiffBatchTopK())
    _make_train_step.cache_clear()
    yield
    _make_train_step.cache_clear()


@pytest.mark.parametrize('n_seeds', [2, 3])
def test_seed_loop_applies_after_update_per_seed(autodiff_batchtopk, n_seeds):
    cfg = SAEConfig(D, N, architecture='batchtopk', k=4, dead_tokens=600)
    loop, m_loop, _ = _run(cfg, n_seeds, 1, per_seed_data=True)
    stacked, m_stacked, _ = _run(cfg, n_seeds, n_seeds, per_seed_data=True)
    thr = loop['params']['threshold']
    assert (thr > 0).all() and not np.allclose(thr[0], thr[1])  # learned, per seed
    _assert_states_close(loop, stacked)
    for a, b in zip(m_loop, m_stacked):
        _close(a['loss'], b['loss'], 'loss')


def test_non_finite_seed_is_frozen_and_the_others_train_on():
    cfg = SAEConfig(D, N, k=4, k_aux=8, dead_tokens=STEPS * B)  # no latent is dead before the end: no AuxK
    clean, _, _ = _run(cfg, 3, 1, per_seed_data=True)
    got, metrics, before = _run(cfg, 3, 1, per_seed_data=True, poison=(6, 1))
    assert not np.isfinite(metrics[6]['loss'][1]) and np.isfinite(metrics[6]['loss'][[0, 2]]).all()
    np.testing.assert_array_equal(got['bad_step'], [-1, 6, -1])
    for part in ('params', 'opt_state'):  # seed 1: the state before the bad step, bit for bit
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[1], b[1]), got[part], before[part])
    for k in ('since_fired', 'fire_count'):
        np.testing.assert_array_equal(got[k][1], before[k][1], err_msg=k)
    for part in ('params', 'opt_state'):  # the others: as if nothing had happened (one seed per iteration)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[[0, 2]], b[[0, 2]]), got[part], clean[part])


def test_seed_loop_dispatch(monkeypatch):
    """The seed loop runs for S > 1 with seeds_per_pass 1 only; S = 1 and vmapped seeds keep the stacked
    step (S = 1 without any loop, as before the seed loop existed)."""
    calls = []
    real = kernels.seed_loop_update
    monkeypatch.setattr(kernels, 'seed_loop_update', lambda *a: calls.append(a[0].name) or real(*a))
    _make_train_step.cache_clear()
    cfg = SAEConfig(D, N, k=4)
    try:
        for n_seeds, spp, used in ((1, 1, False), (2, 2, False), (2, 1, True)):
            calls.clear()
            _run(cfg, n_seeds, spp, steps=1)
            assert bool(calls) == used, (n_seeds, spp)
        calls.clear()
        _run(SAEConfig(D, N, architecture='relu'), 2, 1, steps=1)  # no hand-written gradients
        assert not calls
    finally:
        _make_train_step.cache_clear()


def test_adam_block_rows():
    assert kernels.adam_block_rows(18432, 2304 * 4) == 96  # 113 rows fit in 1 MiB; 96 divides 18432
    assert kernels.adam_block_rows(100, 4) == 100
    assert kernels.adam_block_rows(1009, 2**18) == 4  # 4 rows fit; 1009 is prime: blocks of 4 and a tail
