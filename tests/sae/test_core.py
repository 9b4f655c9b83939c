import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunesae_jax.sae import core


def _one(cfg, seed=0):
    return jax.tree.map(lambda a: a[0], core.init(jax.random.split(jax.random.key(seed), 1), cfg))


def test_fvu_mean_predictor_is_one_and_perfect_is_zero():
    x = np.random.default_rng(0).normal(3.0, 2.0, (500, 16)).astype(np.float32)
    assert float(core.fvu(x, np.broadcast_to(x.mean(0), x.shape))) == pytest.approx(1.0, abs=1e-6)
    assert float(core.fvu(x, x)) == 0.0
    # around the mean, not around zero: predicting zeros is far worse than 1 for off-centre data
    assert float(core.fvu(x, np.zeros_like(x))) > 2.0


def test_init_conventions():
    cfg = core.SAEConfig(32, 128, k=8)
    sample = np.random.default_rng(0).normal(5.0, 1.0, (400, 32)).astype(np.float32)
    p = core.init(jax.random.split(jax.random.key(0), 3), cfg, sample)
    assert p["W_enc"].shape == (3, 32, 128) and p["W_dec"].shape == (3, 128, 32)
    assert p["b_enc"].shape == (3, 128) and p["b_dec"].shape == (3, 32) and "threshold" not in p
    np.testing.assert_array_equal(p["W_enc"], np.swapaxes(p["W_dec"], 1, 2))  # tied
    np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=-1), 1.0, atol=1e-6)
    assert not np.allclose(p["W_dec"][0], p["W_dec"][1])  # seeds differ
    gm = np.asarray(p["b_dec"][0])
    # the geometric median minimises the summed distance: better than the mean
    dist = lambda m: np.linalg.norm(sample - m, axis=1).sum()
    assert dist(gm) <= dist(sample.mean(0)) + 1e-3
    np.testing.assert_array_equal(p["b_dec"][0], p["b_dec"][2])
    pj = core.init(jax.random.split(jax.random.key(0), 1), core.SAEConfig(32, 128, architecture="jumprelu"))
    np.testing.assert_allclose(pj["threshold"], 0.001)


def test_topk_sparse_gradients_equal_dense_reference():
    cfg = core.SAEConfig(24, 96, k=5)
    p = _one(cfg)
    r = np.random.default_rng(1)
    p = dict(p, b_enc=jnp.asarray(r.normal(0, 0.1, 96), jnp.float32), b_dec=jnp.asarray(r.normal(0, 0.1, 24), jnp.float32))
    x = jnp.asarray(r.normal(size=(64, 24)), jnp.float32)

    def dense(p):
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        v, i = jax.lax.top_k(pre, cfg.k)
        z = jnp.zeros_like(pre).at[jnp.arange(64)[:, None], i].set(jax.nn.relu(v))
        return ((z @ p["W_dec"] + p["b_dec"] - x) ** 2).sum(-1).mean()

    dead = jnp.zeros(96, bool)
    l_s, g_s = jax.jit(jax.value_and_grad(lambda p: core.train_loss(cfg, p, x, dead, use_aux=False)[0]))(p)
    l_d, g_d = jax.jit(jax.value_and_grad(dense))(p)
    assert float(l_s) == pytest.approx(float(l_d), rel=1e-5)
    for k in g_d:
        np.testing.assert_allclose(g_s[k], g_d[k], atol=2e-5, rtol=1e-4)
    # the inference path gives the same reconstruction
    np.testing.assert_allclose(core.reconstruct(cfg, p, x), core.decode(cfg, p, core.encode(cfg, p, x)), atol=1e-5)


def test_auxk_only_trains_dead_latents_and_not_b_dec():
    cfg = core.SAEConfig(16, 64, k=4, k_aux=8)
    p = _one(cfg)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(32, 16)), jnp.float32)
    dead = jnp.zeros(64, bool).at[:10].set(True)
    g_aux = jax.jit(jax.grad(lambda p: core.train_loss(cfg, p, x, dead, True)[1]["aux_loss"]))(p)
    rows = np.abs(np.asarray(g_aux["W_dec"])).sum(-1)
    assert rows[:10].sum() > 0 and rows[10:].sum() == 0  # only dead latents decode the residual
    no_dead = jax.jit(lambda p: core.train_loss(cfg, p, x, jnp.zeros(64, bool), True)[1]["aux_loss"])(p)
    assert float(no_dead) == 0.0


def test_fold_scale_is_exact_reparametrisation():
    for arch in ("topk", "jumprelu", "relu"):
        cfg = core.SAEConfig(16, 64, architecture=arch, k=4, jumprelu_init_threshold=0.1)
        p = _one(cfg)
        p = dict(p, b_dec=jnp.full((16,), 0.3, jnp.float32))
        x = jnp.asarray(np.random.default_rng(3).normal(size=(20, 16)), jnp.float32)
        c = 2.5
        raw = core.fold_scale(p, c)
        np.testing.assert_allclose(core.reconstruct(cfg, raw, x), core.reconstruct(cfg, p, x * c) / c, atol=1e-5)


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="k=200"):
        core.SAEConfig(16, 64, k=200)
    with pytest.raises(ValueError, match="k=0"):
        core.SAEConfig(16, 64, k=0)
    with pytest.raises(ValueError, match="architecture='gated'"):
        core.SAEConfig(16, 64, architecture="gated")
    cfg = core.SAEConfig(16, 64, k=4)
    with pytest.raises(ValueError, match="d_in=8"):
        core.encode(cfg, _one(cfg), np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match="sample shape"):
        core.init(jax.random.split(jax.random.key(0), 1), cfg, np.zeros((5, 8)))


def test_lr_default():
    assert core.lr_default(2**14) == pytest.approx(2e-4)
    assert core.lr_default(5120) == pytest.approx(2e-4 / np.sqrt(5120 / 16384))


def test_seed_flattened_topk_loss_equals_vmapped_single_seed_loss():
    cfg = core.SAEConfig(16, 64, k=4, k_aux=6)
    p = core.init(jax.random.split(jax.random.key(5), 3), cfg)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(32, 16)), jnp.float32)
    dead = jnp.zeros((3, 64), bool).at[1, :9].set(True)

    def flat(p):
        loss, _ = core.topk_train_loss_seeds(cfg, p, x, dead, True)
        return loss.sum(), loss

    def vm(p):
        loss = jax.vmap(lambda pp, dd: core.train_loss(cfg, pp, x, dd, True)[0])(p, dead)
        return loss.sum(), loss

    (_, l1), g1 = jax.jit(jax.value_and_grad(flat, has_aux=True))(p)
    (_, l2), g2 = jax.jit(jax.value_and_grad(vm, has_aux=True))(p)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    assert float(l1[1]) > float(l1[0]) - 1e-3  # seed 1 pays an AuxK term
    for k in g1:
        np.testing.assert_allclose(g1[k], g2[k], atol=1e-5, err_msg=k)
