"""The hand-written gradients of SAE training and the fused Adam update.

Everything here replaces a piece of plain autodiff with code written out by hand, for speed or
because the function has no derivative of its own:

- `jump` / `jumprelu`: the JumpReLU step with the rectangle-kernel pseudo-derivative (custom vjp);
- `sparse_decode`: decodes k active latents per token by a chunked gather (custom vjp: scatter-add);
- `topk_pass` / `topk_sq_err_grads`: a TopK decode and the gradient of its squared error in ONE
    chunked pass (the only TopK gradient path in the library; arch/topk.py builds the loss on it);
- `auxk_few_dead` / `auxk_dense`: the AuxK term's error and gradients as dense matmuls;
- `kth_largest`: BatchTopK's batch-wide cut by bisection instead of a sort;
- `adam_apply`: one fused elementwise pass of Adam with the unit-norm decoder projection;
- `seed_loop_update`: S seeds' gradients and Adam one seed after another, in place in the stacked
    state (`seed_adam_inplace`, in row blocks): the CPU train step for several seeds.

tests/sae/reference.py holds the plain-autodiff references these are tested against.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from prunesae_jax.sae import common

# With at most this many dead latents (and at most k_aux), AuxK runs on the dead latents' columns only.
AUXK_SUBSET = 128


# ----------------------------------------------------------------------------- JumpReLU


@jax.custom_vjp
def jump(pre, threshold, bandwidth):
    """Heaviside step H(pre - threshold) [B, n] with the rectangle-kernel pseudo-derivative (the L0 term)."""
    return (pre > threshold).astype(pre.dtype)


def _jump_fwd(pre, threshold, bandwidth):
    return jump(pre, threshold, bandwidth), (pre, threshold, bandwidth)


def _jump_bwd(res, g):
    # Rajamanoharan et al. 2024 (Gemma Scope): d/dtheta H(pre - theta) ~ -K((pre - theta)/eps)/eps with the
    # rectangle kernel K(u) = 1{|u| < 1/2}; no gradient reaches pre through the step
    pre, threshold, bandwidth = res
    rect = (jnp.abs(pre - threshold) < bandwidth / 2).astype(pre.dtype) / bandwidth
    return jnp.zeros_like(pre), (-g * rect).sum(0).reshape(threshold.shape), None


jump.defvjp(_jump_fwd, _jump_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(pre, threshold, bandwidth: float):
    """JumpReLU(pre) = pre * H(pre - threshold) for pre [B, n], threshold [n].

    Pseudo-derivatives as in Gemma Scope / SAELens: d/dpre = H(pre - theta) (the identity where the unit
    is open) and d/dtheta = -(theta / eps) * K((pre - theta) / eps), K the rectangle kernel 1{|u| < 1/2}
    and eps the bandwidth. The kernel's weight is theta, not pre: the jump that moving theta opens or
    closes has height theta at the threshold itself.
    """
    return pre * (pre > threshold)


def _jumprelu_fwd(pre, threshold, bandwidth):
    return jumprelu(pre, threshold, bandwidth), (pre, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    pre, threshold = res
    rect = (jnp.abs(pre - threshold) < bandwidth / 2).astype(pre.dtype)
    d_thr = (-(threshold / bandwidth) * rect * g).sum(0).reshape(threshold.shape)
    return g * (pre > threshold), d_thr


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


# ----------------------------------------------------------------------------- TopK sparse decode


def _chunked(a, c):
    return a.reshape((a.shape[0] // c, c) + a.shape[1:])


def _chunk_size(b: int, k: int) -> int:
    # a chunk gathers [c, k, d] rows: keep them in L2 (c*k ~ 256 rows; measured at d=640, k=32 on 1 core:
    # c=8 157 ms, c=16 188 ms, c=32 369 ms, c=128 548 ms for the whole pass); c must divide the batch
    c = max(1, min(b, 256 // max(k, 1)))
    while b % c:
        c -= 1
    return c


@jax.custom_vjp
def sparse_decode(vals, idx, w):
    """out[b] = sum_j vals[b, j] * w[idx[b, j]]  ([B, k], [B, k], [n, d] -> [B, d]).

    Decodes only the k active latents; the backward is a scatter-add into those k rows.
    """
    c = _chunk_size(*idx.shape)

    def f(_, a):
        v, i = a
        return None, (v[:, :, None] * jnp.take(w, i, axis=0, mode='clip')).sum(1)

    out = jax.lax.scan(f, None, (_chunked(vals, c), _chunked(idx, c)))[1]
    return out.reshape(vals.shape[0], w.shape[1])


def _sparse_decode_fwd(vals, idx, w):
    return sparse_decode(vals, idx, w), (vals, idx, w)


def _sparse_decode_bwd(res, g):
    vals, idx, w = res
    c = _chunk_size(*idx.shape)

    def f(dw, a):
        v, i, gg = a
        dv = (gg[:, None, :] * jnp.take(w, i, axis=0, mode='clip')).sum(-1)
        upd = (v[:, :, None] * gg[:, None, :]).reshape(-1, w.shape[1])
        return dw.at[i.reshape(-1)].add(upd, mode='promise_in_bounds'), dv

    dw, dv = jax.lax.scan(f, jnp.zeros_like(w), (_chunked(vals, c), _chunked(idx, c), _chunked(g, c)))
    return dv.reshape(vals.shape), None, dw


sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


# ----------------------------------------------------------------------------- TopK squared error


def topk_pass(tgt, xc, pre_sel, idx, w_dec, coef):
    """Sparse decode of a TopK SAE and the gradient of its squared error, in ONE chunked pass.

    tgt [B, d] is what the decode must match (without b_dec), xc [B, d] the encoder input, pre_sel and
    idx [B, k] the selected pre-activations and their rows of w_dec [n, d];
    loss = coef * sum ||tgt - rec||^2 (coef: a float or a traced scalar, the term's weight in the loss).
    Each chunk of tokens gathers its k decoder rows once and uses them for the decode AND for
    d loss / d vals (which needs only the chunk's own residual), then scatter-adds both weight
    gradients. The encoder's rows are never gathered: pre_sel comes from the dense encoder matmul, and
    the b_dec gradient through the encoder is W_enc @ d b_enc (see topk_sq_err_grads). XLA's CPU gather
    / scatter is slow unless the rows stay in cache, hence the chunks.
    Returns rec [B, d], gpre [B, k] (d loss / d pre_sel), d W_enc^T [n, d], d W_dec [n, d], g [B, d]
    (d loss / d rec).
    """
    b, k = idx.shape
    d = w_dec.shape[1]
    c = _chunk_size(b, k)

    def body(carry, a):
        dwe, dwd = carry
        tt, xx, pv, ii = a
        rows = w_dec.at[ii].get(mode='promise_in_bounds')  # [c, k, d]
        vals = jax.nn.relu(pv)
        rec = jnp.einsum('ck,ckd->cd', vals, rows)
        g = (-2.0 * coef) * (tt - rec)  # d loss / d x_hat
        gpre = jnp.einsum('cd,ckd->ck', g, rows) * (pv > 0)  # relu' = 1 only where pv > 0 (as jax.nn.relu)
        fi = ii.reshape(-1)
        dwd = dwd.at[fi].add((vals[:, :, None] * g[:, None, :]).reshape(-1, d), mode='promise_in_bounds')
        dwe = dwe.at[fi].add((gpre[:, :, None] * xx[:, None, :]).reshape(-1, d), mode='promise_in_bounds')
        return (dwe, dwd), (rec, gpre, g)

    zeros = jnp.zeros_like(w_dec)
    (dwe, dwd), (rec, gpre, g) = jax.lax.scan(
        body, (zeros, zeros), (_chunked(tgt, c), _chunked(xc, c), _chunked(pre_sel, c), _chunked(idx, c))
    )
    return rec.reshape(b, d), gpre.reshape(b, k), dwe, dwd, g.reshape(b, d)


def topk_sq_err_grads(apply_b_dec, add_b_dec, w_enc, b_enc, w_dec, b_dec, x, target, idx, pre_sel, coef):
    """A TopK decode's squared error with the gradient of coef * (summed squared error) already in hand.

    x_hat = sum_j relu(pre_sel) * W_dec[idx] (+ b_dec when add_b_dec); x / target [B, d], idx / pre_sel
    [B, k]. pre_sel must be the pre-activations (x - b_dec if apply_b_dec) @ W_enc + b_enc at idx, which
    the caller already has from the dense encoder matmul: the gradient reaches W_enc, b_enc and b_dec
    through it. Picks with pre_sel <= 0 add nothing (padding may use any valid idx).
    Returns (sq, vals, x_hat), (grads, g, gpre): sq = sum over tokens of ||target - x_hat||^2 (NOT scaled
    by coef), grads = d (coef * sq) / d (W_enc, b_enc, W_dec, b_dec).
    """
    xc = x - b_dec if apply_b_dec else x
    tgt = target - b_dec if add_b_dec else target  # what the sparse decode must match
    rec, gpre, dwe, dwd, g = topk_pass(tgt, xc, pre_sel, idx, w_dec, coef)
    d_b_enc = jnp.zeros_like(b_enc).at[idx.reshape(-1)].add(gpre.reshape(-1))
    d_b_dec = g.sum(0) if add_b_dec else jnp.zeros_like(b_dec)
    if apply_b_dec:  # pre = (x - b_dec) W_enc + b_enc: sum_t d pre_t / d b_dec = -W_enc @ d_b_enc
        d_b_dec = d_b_dec - w_enc @ d_b_enc
    grads = (dwe.T, d_b_enc, dwd, d_b_dec)
    x_hat = rec + b_dec if add_b_dec else rec
    return (((tgt - rec) ** 2).sum(), jax.nn.relu(pre_sel), x_hat), (grads, g, gpre)


# ----------------------------------------------------------------------------- AuxK


def auxk_is_dense(cfg) -> bool:
    """Whether the TopK loss computes AuxK with dense masked matmuls instead of k_aux-row gathers.

    AuxK decodes k_aux = d_in / 2 latents per token: with a small dictionary (n_latents <= 4 * k_aux,
    i.e. up to 2x expansion) that is a large share of all latents, and three dense [B, n] x [n, d]
    matmuls cost less than gathering and scatter-adding k_aux decoder rows per token (on CPU 4x
    faster at 640 latents). The numbers are the same either way (tested).
    """
    return cfg.n_latents <= 4 * cfg.k_aux_eff


def auxk_few_dead(cfg, params, xc, pre, dead, target, coef, m: int):
    """AuxK when at most m <= k_aux latents are dead: every dead latent is decoded (k_aux picks would
    take them all), as dense matmuls over their m gathered columns / rows. Returns (sq, grads) ordered
    (W_enc, b_enc, W_dec, b_dec) like topk_sq_err_grads."""
    idx = jnp.nonzero(dead, size=m, fill_value=0)[0]  # [m]; padding entries are masked out below
    valid = jnp.arange(m) < dead.sum()
    p_sub = pre[:, idx]  # [B, m]
    on = valid & (p_sub > 0)
    z = jnp.where(on, p_sub, 0.0)
    w_rows = params['W_dec'][idx]  # [m, d]
    r = z @ w_rows - target
    g = (2.0 * coef) * r
    d_pre = jnp.where(on, g @ w_rows.T, 0.0)  # [B, m]
    d_b_sub = d_pre.sum(0)
    d_w_dec = jnp.zeros_like(params['W_dec']).at[idx].add(z.T @ g)
    d_w_enc = jnp.zeros_like(params['W_enc']).at[:, idx].add(xc.T @ d_pre)
    d_b_enc = jnp.zeros_like(params['b_enc']).at[idx].add(d_b_sub)
    d_b_dec = -(params['W_enc'][:, idx] @ d_b_sub) if cfg.apply_b_dec_to_input else jnp.zeros_like(params['b_dec'])
    return (r**2).sum(), (d_w_enc, d_b_enc, d_w_dec, d_b_dec)


def auxk_dense(cfg, params, xc, pre, dead, target, coef):
    """AuxK's summed squared error and the gradients of coef * it, as dense masked matmuls.

    The latents decoded for a token are its k_aux largest pre-activations among the dead ones (all
    dead latents when there are at most k_aux), as common.auxk_picks selects them; e_hat = relu(pre) on
    those latents @ W_dec (no b_dec), target = the detached residual. Returns (sq, grads) with grads
    ordered (W_enc, b_enc, W_dec, b_dec) like topk_sq_err_grads.
    """
    n_dead = dead.sum()

    def kth_mask():
        kth = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), cfg.k_aux_eff)[0][:, -1:]
        return dead & (pre >= kth)

    mask = jax.lax.cond(n_dead <= cfg.k_aux_eff, lambda: jnp.broadcast_to(dead, pre.shape), kth_mask)
    on = mask & (pre > 0)
    z = jnp.where(on, pre, 0.0)  # [B, n]
    r = z @ params['W_dec'] - target  # [B, d]
    g = (2.0 * coef) * r
    d_w_dec = z.T @ g
    d_pre = jnp.where(on, g @ params['W_dec'].T, 0.0)  # [B, n]
    d_b_enc = d_pre.sum(0)
    d_w_enc = xc.T @ d_pre
    d_b_dec = -(params['W_enc'] @ d_b_enc) if cfg.apply_b_dec_to_input else jnp.zeros_like(params['b_dec'])
    return (r**2).sum(), (d_w_enc, d_b_enc, d_w_dec, d_b_dec)


# ----------------------------------------------------------------------------- BatchTopK


def kth_largest(a, kk: int, n_iter: int = 40):
    """Value t with about kk entries of a >= t (bisection on the value; a full top_k over
    B*n entries is a sort on CPU, counting is one cheap pass per iteration)."""

    def body(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        many = (a >= mid).sum() >= kk
        return jnp.where(many, mid, lo), jnp.where(many, hi, mid)

    lo, _ = jax.lax.fori_loop(0, n_iter, body, (jnp.zeros((), a.dtype), a.max() * (1 + 1e-6) + 1e-30))
    return lo


# ----------------------------------------------------------------------------- optimiser


def adam_apply(p, g, mu, nu, ok, lr, b1, b2, t, unit_rows: bool, eps: float = 1e-8):
    """One fused elementwise pass of Adam for one param [S, ...] (optax.adam's formula).

    unit_rows: W_dec, whose rows stay on the unit sphere: the gradient component along each row is
    dropped before Adam and the updated rows are renormalised (the rows are unit norm on entry, so the
    projection uses them directly). ok [S]: seeds whose loss was not finite keep p, mu, nu unchanged.
    """
    return adam_apply_scaled(p, g, mu, nu, ok, lr / (1 - b1**t), 1 - b2**t, b1, b2, unit_rows, eps)


def adam_apply_scaled(p, g, mu, nu, ok, step_size, bias2, b1, b2, unit_rows: bool, eps: float = 1e-8):
    """adam_apply with its two scalars passed in: step_size = lr / (1 - b1^t), bias2 = 1 - b2^t.

    ok None: every element is updated (seed_adam_inplace decides for the whole seed outside).
    """
    if unit_rows:
        g = g - (g * p).sum(-1, keepdims=True) * p
    mu_n = b1 * mu + (1 - b1) * g
    nu_n = b2 * nu + (1 - b2) * (g * g)
    new = p - step_size * mu_n / (jnp.sqrt(nu_n / bias2) + eps)
    if unit_rows:
        new = common.normalize_decoder(new)
    if ok is None:
        return new, mu_n, nu_n
    okb = ok.reshape((-1,) + (1,) * (p.ndim - 1))
    return jnp.where(okb, new, p), jnp.where(okb, mu_n, mu), jnp.where(okb, nu_n, nu)


ADAM_BLOCK_BYTES = 1 << 20  # one Adam block is ~1 MiB per array: a block's 4 inputs stay in L2


def adam_block_rows(rows: int, row_bytes: int) -> int:
    """Rows per block of seed_adam_inplace: about ADAM_BLOCK_BYTES per array, a divisor of rows when
    one is at least half that size (then there is no tail block)."""
    most = max(1, min(rows, ADAM_BLOCK_BYTES // max(row_bytes, 1)))
    div = next(r for r in range(most, 0, -1) if rows % r == 0)
    return div if 2 * div >= most else most


def seed_adam_inplace(p_all, g, mu_all, nu_all, s, ok, step_size, bias2, b1, b2, unit_rows: bool):
    """adam_apply_scaled for seed s of the stacked p_all / mu_all / nu_all [S, ...] (g: that seed's gradient, no seed
    axis), written back in place with dynamic-update-slice, in blocks of rows. ok: a bool scalar.

    Each block's old p, mu, nu are sliced out (small copies that stay in cache), its new values computed
    in a lax.cond on ok (a seed whose loss was not finite keeps the old ones: the values of adam_apply's
    where), and written back. The cond is what keeps the reads before the writes: XLA cannot fuse across
    it, so the in-place updates of the donated buffers cannot clobber what a fusion still reads. Left to
    itself XLA fuses each output's dynamic-update-slice with its own recomputation of the new moments,
    all three reading the old moments, and then copies whole stacked moment arrays to keep them (each
    block, inside a loop). One pass over p, g, mu, nu and one write of p, mu, nu per step; per element
    (and per decoder row) the operations of adam_apply (XLA may round the last bit differently: other
    fusions). Returns the updated (p_all, mu_all, nu_all).
    """
    shape = g.shape

    def block(carry, r0, size):
        start = (s, r0) + (0,) * (len(shape) - 1)
        sizes = (1, size) + shape[1:]
        olds = tuple(jax.lax.dynamic_slice(a, start, sizes)[0] for a in carry)
        gb = jax.lax.dynamic_slice(g, start[1:], sizes[1:])
        new = jax.lax.cond(
            ok,
            lambda p, m, v, gg: adam_apply_scaled(p, gg, m, v, None, step_size, bias2, b1, b2, unit_rows),
            lambda p, m, v, gg: (p, m, v),
            *olds,
            gb,
        )
        return tuple(jax.lax.dynamic_update_slice(a, b[None], start) for a, b in zip(carry, new))

    carry = (p_all, mu_all, nu_all)
    if len(shape) == 1:  # a bias: one block
        return block(carry, 0, shape[0])
    rows = shape[0]
    size = adam_block_rows(rows, math.prod(shape[1:]) * g.dtype.itemsize)
    nb, tail = divmod(rows, size)
    if nb > 1:
        carry = jax.lax.fori_loop(0, nb, lambda i, c: block(c, i * size, size), carry)
    elif nb == 1:
        carry = block(carry, 0, size)
    if tail:
        carry = block(carry, nb * size, tail)
    return carry


def seed_loop_update(spec, cfg, params, opt_state, x, dead, bad, lr, t, b1, b2, step, threshold_start):
    """Gradients AND Adam of S stacked seeds, one seed after another, in place (the CPU default).

    For an architecture `spec` with hand-written loss_and_grads (arch.Architecture): one fori_loop
    iteration per seed computes that seed's loss and gradients, applies its Adam update
    (seed_adam_inplace, in row blocks into the donated stacked [S, ...] params and moments) and its
    after_update. The gradients and Adam's intermediates are one seed's buffers, reused by every
    iteration. The alternative, a lax.map of the gradients alone and then adam_apply over the stacked
    arrays, zero-fills stacked [S, n, d] gradient buffers, copies each seed's gradients into them and
    runs Adam over S-times larger temporaries: at d_in 2304, S = 4 its step cost 1.25x four S = 1 steps
    (BENCHMARKS.md, "SAE training"). Each seed runs the same operations as there; XLA fuses Adam's
    elementwise ops differently, so params may differ from it in the last bits, not otherwise.

    Semantics as prunesae_jax/sae/train.py's stacked step: AuxK (spec.uses_auxk with cfg.aux_coeff)
    runs for every seed when any latent of any seed is dead; a seed whose loss is not finite, or whose
    bad [S] step is set (>= 0), keeps its params and moments. x: [B, d] shared or [S, B, d] per seed;
    dead [S, n]; lr and t: the step's learning rate and 1-based Adam step (float32 scalars).
    Returns (loss [S], aux with the seed axis first, new params, {'mu': ..., 'nu': ...}).
    """
    n_seeds = dead.shape[0]
    step_size, bias2 = lr / (1 - b1**t), 1 - b2**t  # scalars, computed once (outside the conds)
    any_dead = dead.any()
    at = lambda a, s: jax.lax.dynamic_index_in_dim(a, s, keepdims=False)
    x_at = lambda s: x if x.ndim == 2 else at(x, s)

    def grads(ps, xx, dd):
        if spec.uses_auxk and cfg.aux_coeff:
            return jax.lax.cond(
                any_dead,
                lambda: spec.loss_and_grads(cfg, ps, xx, dd, True),
                lambda: spec.loss_and_grads(cfg, ps, xx, dd, False),
            )
        return spec.loss_and_grads(cfg, ps, xx, dd, False)

    one = jax.eval_shape(
        lambda pp, xx, dd: spec.loss_and_grads(cfg, pp, xx, dd, False)[:2],
        jax.tree.map(lambda a: a[0], params),
        x_at(0),
        dead[0],
    )
    outs = jax.tree.map(lambda a: jnp.zeros((n_seeds,) + a.shape, a.dtype), one)

    def body(s, carry):
        p, mu, nu, outs = carry
        ps = {k: at(v, s) for k, v in p.items()}
        loss, aux, g = grads(ps, x_at(s), at(dead, s))
        ok = jnp.isfinite(loss) & (at(bad, s) < 0)
        p, mu, nu = dict(p), dict(mu), dict(nu)
        for name in ps:
            unit = name == 'W_dec' and cfg.unit_norm_decoder
            p[name], mu[name], nu[name] = seed_adam_inplace(
                p[name], g[name], mu[name], nu[name], s, ok, step_size, bias2, b1, b2, unit
            )
        # after_update on this seed alone (a seed axis of 1); only the params it replaces are written back
        one_seed = lambda tree: jax.tree.map(lambda a: a[None], tree)
        new1 = {k: jax.lax.dynamic_slice_in_dim(v, s, 1) for k, v in p.items()}
        upd = spec.after_update(cfg, one_seed(ps), new1, one_seed(aux), ok[None], step, threshold_start)
        for k, v in upd.items():
            if v is not new1[k]:
                p[k] = jax.lax.dynamic_update_slice_in_dim(p[k], v, s, 0)
        outs = jax.tree.map(lambda o, v: jax.lax.dynamic_update_index_in_dim(o, v, s, 0), outs, (loss, aux))
        return p, mu, nu, outs

    new, mu, nu, (loss, aux) = jax.lax.fori_loop(0, n_seeds, body, (params, opt_state['mu'], opt_state['nu'], outs))
    return loss, aux, new, {'mu': mu, 'nu': nu}
