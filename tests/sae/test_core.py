import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sae_reference import topk_loss

from prunesae_jax import sae
from prunesae_jax.sae import arch, core, kernels
from prunesae_jax.sae.config import SAEConfig

TOPK = arch.get('topk')


def _one(cfg, seed=0):
    return jax.tree.map(lambda a: a[0], core.init(jax.random.split(jax.random.key(seed), 1), cfg))


def test_fvu_mean_predictor_is_one_and_perfect_is_zero():
    x = np.random.default_rng(0).normal(3.0, 2.0, (500, 16)).astype(np.float32)
    assert float(sae.fvu(x, np.broadcast_to(x.mean(0), x.shape))) == pytest.approx(1.0, abs=1e-6)
    assert float(sae.fvu(x, x)) == 0.0
    # around the mean, not around zero: predicting zeros is far worse than 1 for off-centre data
    assert float(sae.fvu(x, np.zeros_like(x))) > 2.0


def test_init_conventions():
    cfg = SAEConfig(32, 128, k=8)
    sample = np.random.default_rng(0).normal(5.0, 1.0, (400, 32)).astype(np.float32)
    p = core.init(jax.random.split(jax.random.key(0), 3), cfg, sample)
    assert p['W_enc'].shape == (3, 32, 128) and p['W_dec'].shape == (3, 128, 32)
    assert p['b_enc'].shape == (3, 128) and p['b_dec'].shape == (3, 32) and 'threshold' not in p
    np.testing.assert_array_equal(p['W_enc'], np.swapaxes(p['W_dec'], 1, 2))  # tied
    np.testing.assert_allclose(np.linalg.norm(p['W_dec'], axis=-1), 1.0, atol=1e-6)
    assert not np.allclose(p['W_dec'][0], p['W_dec'][1])  # seeds differ
    gm = np.asarray(p['b_dec'][0])
    # the geometric median minimises the summed distance: better than the mean
    dist = lambda m: np.linalg.norm(sample - m, axis=1).sum()
    assert dist(gm) <= dist(sample.mean(0)) + 1e-3
    np.testing.assert_array_equal(p['b_dec'][0], p['b_dec'][2])
    pj = core.init(jax.random.split(jax.random.key(0), 1), SAEConfig(32, 128, architecture='jumprelu'))
    np.testing.assert_allclose(pj['threshold'], 0.001)


def test_topk_sparse_gradients_equal_dense_reference():
    cfg = SAEConfig(24, 96, k=5)
    p = _one(cfg)
    r = np.random.default_rng(1)
    p = dict(
        p, b_enc=jnp.asarray(r.normal(0, 0.1, 96), jnp.float32), b_dec=jnp.asarray(r.normal(0, 0.1, 24), jnp.float32)
    )
    x = jnp.asarray(r.normal(size=(64, 24)), jnp.float32)

    def dense(p):
        pre = (x - p['b_dec']) @ p['W_enc'] + p['b_enc']
        v, i = jax.lax.top_k(pre, cfg.k)
        z = jnp.zeros_like(pre).at[jnp.arange(64)[:, None], i].set(jax.nn.relu(v))
        return ((z @ p['W_dec'] + p['b_dec'] - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()  # FVU

    dead = jnp.zeros(96, bool)
    l_s, _, g_s = jax.jit(lambda p: TOPK.loss_and_grads(cfg, p, x, dead, use_aux=False))(p)
    l_d, g_d = jax.jit(jax.value_and_grad(dense))(p)
    assert float(l_s) == pytest.approx(float(l_d), rel=1e-5)
    for k in g_d:
        np.testing.assert_allclose(g_s[k], g_d[k], atol=2e-5, rtol=1e-4)
    # the inference path gives the same reconstruction
    np.testing.assert_allclose(core.reconstruct(cfg, p, x), sae.decode(cfg, p, core.encode(cfg, p, x)), atol=1e-5)


def test_auxk_only_trains_dead_latents_and_not_b_dec():
    cfg = SAEConfig(16, 64, k=4, k_aux=8)
    p = _one(cfg)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(32, 16)), jnp.float32)
    dead = jnp.zeros(64, bool).at[:10].set(True)
    with_aux = jax.jit(lambda p: TOPK.loss_and_grads(cfg, p, x, dead, True))(p)[2]
    without = jax.jit(lambda p: TOPK.loss_and_grads(cfg, p, x, dead, False))(p)[2]
    rows = np.abs(np.asarray(with_aux['W_dec']) - np.asarray(without['W_dec'])).sum(-1)
    assert rows[:10].sum() > 0 and rows[10:].sum() == 0  # only dead latents decode the residual
    no_dead = jax.jit(lambda p: core.train_loss(cfg, p, x, jnp.zeros(64, bool), True)[1]['aux_loss'])(p)
    assert float(no_dead) == 0.0


def test_fold_scale_is_exact_reparametrisation():
    for name in ('topk', 'jumprelu', 'relu'):
        cfg = SAEConfig(16, 64, architecture=name, k=4, jumprelu_init_threshold=0.1)
        p = _one(cfg)
        p = dict(p, b_dec=jnp.full((16,), 0.3, jnp.float32))
        x = jnp.asarray(np.random.default_rng(3).normal(size=(20, 16)), jnp.float32)
        c = 2.5
        raw = core.fold_scale(p, c)
        np.testing.assert_allclose(core.reconstruct(cfg, raw, x), core.reconstruct(cfg, p, x * c) / c, atol=1e-5)


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match='k=200'):
        SAEConfig(16, 64, k=200)
    with pytest.raises(ValueError, match='k=0'):
        SAEConfig(16, 64, k=0)
    with pytest.raises(ValueError, match="architecture='gated'"):
        SAEConfig(16, 64, architecture='gated')
    cfg = SAEConfig(16, 64, k=4)
    with pytest.raises(ValueError, match='d_in=8'):
        core.encode(cfg, _one(cfg), np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match='sample shape'):
        core.init(jax.random.split(jax.random.key(0), 1), cfg, np.zeros((5, 8)))


def test_lr_default():
    assert core.lr_default(2**14) == pytest.approx(2e-4)
    assert core.lr_default(5120) == pytest.approx(2e-4 / np.sqrt(5120 / 16384))


def test_train_step_one_seed_at_a_time_equals_vmapped_seeds():
    # seeds_per_pass=1 runs the TopK seeds one after another (lax.map), 3 vmaps them: the same numbers
    from prunesae_jax.sae.train import TrainConfig, init_state, make_train_step

    cfg = SAEConfig(16, 64, k=4, k_aux=6, dead_tokens=40)
    x = np.random.default_rng(5).normal(size=(256, 16)).astype(np.float32)
    out = []
    for spp in (1, 3):
        t = TrainConfig(n_seeds=3, n_steps=6, batch_size=32, seeds_per_pass=spp, progress=False)
        state = init_state(cfg, t, x)
        step = make_train_step(cfg, t)
        for i in range(6):  # latents go dead after 40 tokens: AuxK runs from step 2 on
            state, m = step(state, x[i * 32 : (i + 1) * 32])
        out.append((state, m))
    assert float(np.asarray(out[0][1]['aux_loss']).max()) > 0
    for k in out[0][0]['params']:
        np.testing.assert_allclose(out[0][0]['params'][k], out[1][0]['params'][k], atol=1e-5, err_msg=k)
    np.testing.assert_allclose(out[0][1]['loss'], out[1][1]['loss'], rtol=1e-5)


def _np_topk_reference(cfg, p, x, dead):
    """sparsify's TopK loss (sparse_coder.py) in NumPy: (loss, fvu, auxk_loss, mse)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = np.asarray(x, np.float64)
    pre = (x - p['b_dec']) @ p['W_enc'] + p['b_enc']
    z = np.zeros_like(pre)
    for t in range(len(x)):
        top = np.argsort(-pre[t])[: cfg.k]
        z[t, top] = np.maximum(pre[t, top], 0)
    x_hat = z @ p['W_dec'] + p['b_dec']
    e = x - x_hat
    tv = ((x - x.mean(0)) ** 2).sum()
    fvu = (e**2).sum() / tv
    num_dead = int(np.sum(dead))
    auxk = 0.0
    if num_dead:
        k_aux = min(cfg.k_aux_eff, num_dead)
        scale = min(num_dead / cfg.k_aux_eff, 1.0)
        za = np.zeros_like(pre)
        dead_idx = np.flatnonzero(dead)
        for t in range(len(x)):
            top = dead_idx[np.argsort(-pre[t, dead_idx])[:k_aux]]
            za[t, top] = np.maximum(pre[t, top], 0)
        e_hat = za @ p['W_dec']  # no b_dec
        auxk = scale * ((e_hat - e) ** 2).sum() / tv
    return fvu + cfg.aux_coeff * auxk, fvu, auxk, (e**2).mean()


@pytest.mark.parametrize('n_dead', [0, 3, 20])  # none, fewer than k_aux=8 (scale 3/8), more than k_aux
def test_topk_loss_matches_numpy_sparsify_formula(n_dead):
    cfg = SAEConfig(16, 64, k=4, k_aux=8, aux_coeff=0.5)
    p = _one(cfg, seed=3)
    r = np.random.default_rng(7)
    p = dict(
        p, b_enc=jnp.asarray(r.normal(0, 0.2, 64), jnp.float32), b_dec=jnp.asarray(r.normal(0, 0.3, 16), jnp.float32)
    )
    x = jnp.asarray(r.normal(1.0, 1.5, (40, 16)), jnp.float32)
    dead = np.zeros(64, bool)
    dead[r.choice(64, n_dead, replace=False)] = True
    loss_ref, fvu_ref, aux_ref, mse_ref = _np_topk_reference(cfg, p, x, dead)
    loss, aux = jax.jit(lambda p: core.train_loss(cfg, p, x, jnp.asarray(dead), True))(p)
    loss_r, aux_r = jax.jit(lambda p: topk_loss(cfg, p, x, jnp.asarray(dead), True))(p)
    assert float(loss) == pytest.approx(loss_ref, rel=2e-5)
    assert float(aux['aux_loss']) == pytest.approx(aux_ref, rel=2e-5, abs=1e-9)
    assert float(aux['mse']) == pytest.approx(mse_ref, rel=2e-5)  # per element, as before
    assert float(loss_r) == pytest.approx(loss_ref, rel=2e-5)  # the autodiff reference agrees too
    assert float(aux_r) == pytest.approx(aux_ref, rel=2e-5, abs=1e-9)
    if n_dead:
        assert aux_ref > 0.05 * fvu_ref  # the example does exercise AuxK at a comparable weight


@pytest.mark.parametrize(
    'k_aux,n_dead,subset', [(8, 5, 128), (8, 12, 128), (32, 5, 128), (32, 40, 128), (32, 20, 4), (8, 6, 4)]
)
def test_topk_hand_written_grads_equal_autodiff_with_auxk(k_aux, n_dead, subset, monkeypatch):
    # every AuxK path against plain autodiff (sae_reference.topk_loss): n_dead <= min(AUXK_SUBSET, k_aux): the dead
    # latents' columns only; otherwise k_aux 8 of 64 latents: the k_aux-row gather path, k_aux 32: the
    # dense masked path (auxk_is_dense) with all dead latents picked (n_dead <= k_aux) or the top k_aux
    monkeypatch.setattr(kernels, 'AUXK_SUBSET', subset)
    cfg = SAEConfig(16, 64, k=4, k_aux=k_aux, aux_coeff=0.5)
    assert kernels.auxk_is_dense(cfg) == (k_aux == 32)
    p = _one(cfg, seed=4)
    r = np.random.default_rng(8)
    p = dict(
        p, b_enc=jnp.asarray(r.normal(0, 0.2, 64), jnp.float32), b_dec=jnp.asarray(r.normal(0, 0.3, 16), jnp.float32)
    )
    x = jnp.asarray(r.normal(0.5, 1.0, (48, 16)), jnp.float32)
    dead = jnp.zeros(64, bool).at[5 : 5 + n_dead].set(True)
    l_a, g_a = jax.jit(jax.value_and_grad(lambda p: topk_loss(cfg, p, x, dead, True)[0]))(p)
    l_h, _, g_h = jax.jit(lambda p: TOPK.loss_and_grads(cfg, p, x, dead, True))(p)
    assert float(l_h) == pytest.approx(float(l_a), rel=1e-5)
    for k in g_h:
        np.testing.assert_allclose(g_h[k], g_a[k], atol=1e-6, rtol=1e-4, err_msg=k)


def test_jumprelu_threshold_gradient_uses_theta_over_eps():
    """d loss / d theta on a tiny JumpReLU SAE against the Gemma Scope pseudo-derivatives by hand:
    recon: -(theta/eps) K((z - theta)/eps) * dL/dz, L0: -(1/eps) K((z - theta)/eps), K = 1{|u| < 1/2}."""
    d, n, eps, l0c = 3, 4, 0.5, 0.7
    cfg = SAEConfig(d, n, architecture='jumprelu', jumprelu_bandwidth=eps, l0_coeff=l0c, apply_b_dec_to_input=False)
    w_enc = np.eye(d, n, dtype=np.float32)  # pre[:, i] = x[:, i] + b_enc[i] (latent 3 sees nothing)
    w_dec = np.asarray([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.6, 0.8, 0]], np.float32)
    p = {
        'W_enc': jnp.asarray(w_enc),
        'b_enc': jnp.zeros(n, jnp.float32),
        'W_dec': jnp.asarray(w_dec),
        'b_dec': jnp.asarray([0.1, -0.2, 0.05], jnp.float32),
        'threshold': jnp.asarray([1.0, 1.0, 2.0, 0.5], jnp.float32),
    }
    # pre values inside the window |z - theta| < eps/2, both sides, and outside; z differs from theta
    x = np.asarray([[1.2, 0.9, 2.1], [0.6, 1.24, 3.0], [1.3, 0.76, 1.8]], np.float32)
    theta = np.asarray(p['threshold'], np.float64)
    z = x.astype(np.float64) @ w_enc
    open_ = z > theta
    x_hat = (z * open_) @ w_dec + np.asarray(p['b_dec'], np.float64)
    dl_dz = (-2.0 * (x - x_hat) @ w_dec.T) / len(x)  # d mean_t ||x - x_hat||^2 / d z
    kern = (np.abs(z - theta) < eps / 2).astype(np.float64)
    g_rec = (-(theta / eps) * kern * dl_dz).sum(0)
    g_l0 = l0c * (-(1.0 / eps) * kern / len(x)).sum(0)
    assert kern.sum() >= 4 and not np.allclose(z[kern > 0], np.broadcast_to(theta, z.shape)[kern > 0])
    g = jax.grad(lambda p: core.train_loss(cfg, p, jnp.asarray(x), jnp.zeros(n, bool))[0])(p)
    np.testing.assert_allclose(g['threshold'], g_rec + g_l0, rtol=1e-5, atol=1e-6)
    # and the gradient w.r.t. pre is H(z - theta): through W_enc only where open
    g_wenc = x.T @ (dl_dz * open_)
    np.testing.assert_allclose(g['W_enc'], g_wenc, rtol=1e-5, atol=1e-6)
    # the reconstruction term alone, through the public function
    zf, gf = jnp.asarray(z, jnp.float32), jnp.asarray(dl_dz, jnp.float32)
    gj = jax.grad(lambda t: (kernels.jumprelu(zf, t, eps) * gf).sum())(jnp.asarray(theta, jnp.float32))
    np.testing.assert_allclose(gj, g_rec, rtol=1e-5, atol=1e-6)


def test_initial_decoder_is_init_decoder():
    from prunesae_jax.sae.train import TrainConfig, init_state, initial_decoder

    cfg = SAEConfig(16, 48, k=4)
    w0 = initial_decoder(cfg, 5, 3)
    st = init_state(cfg, TrainConfig(n_seeds=3, seed=5), np.ones((8, 16), np.float32))
    np.testing.assert_array_equal(w0, np.asarray(st['params']['W_dec']))
    np.testing.assert_array_equal(initial_decoder(cfg, 6, 1)[0], w0[1])  # seed by seed
    np.testing.assert_allclose(np.linalg.norm(w0, axis=-1), 1.0, atol=1e-6)
