"""SAE maths: config, init, encode/decode, losses and metrics for one SAE.

Every function here works on the params of ONE SAE (no seed axis); training
maps them over the leading seed axis S (one seed after another for TopK, vmap
otherwise). Names and shapes follow SAELens:
W_enc [d_in, n], b_enc [n], W_dec [n, d_in], b_dec [d_in], threshold [n].
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunesae_jax.errors import InputError

ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """Architecture of a sparse autoencoder (hashable: usable as a jit static arg)."""

    d_in: int
    n_latents: int
    architecture: str = "topk"
    k: int = 32  # active latents per token (topk) or per token on average (batchtopk)
    k_aux: int | None = None  # AuxK latents; None -> d_in // 2 (OpenAI)
    aux_coeff: float = 1.0 / 32.0
    # a latent is dead (AuxK) after this many training tokens without firing. None = auto, resolved by
    # train.resolve_dead_tokens from the run's length (a fixed 10M, the papers' value, exceeds what short
    # runs train on: no latent would ever count as dead and AuxK would never run)
    dead_tokens: int | None = None
    l1_coeff: float = 5.0  # relu: decoder-norm-weighted L1
    l0_coeff: float = 1.0  # jumprelu: L0 penalty
    jumprelu_bandwidth: float = 0.001
    jumprelu_init_threshold: float = 0.001
    # batchtopk inference threshold (dictionary_learning's BatchTopKTrainer): an EMA with this momentum of
    # each batch's smallest active pre-activation, updated only on steps after the start step (see
    # train.batchtopk_threshold_start for runs shorter than twice the start step)
    batchtopk_threshold_momentum: float = 0.999
    batchtopk_threshold_start_step: int = 1000
    apply_b_dec_to_input: bool = True  # Gemma Scope SAEs do not subtract b_dec
    unit_norm_decoder: bool = True

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"architecture={self.architecture!r}; accepted: {ARCHITECTURES}")
        if int(self.d_in) <= 0 or int(self.n_latents) <= 0:
            raise InputError(f"d_in={self.d_in}, n_latents={self.n_latents}; both must be positive integers")
        if self.architecture in ("topk", "batchtopk") and not 0 < int(self.k) <= int(self.n_latents):
            raise InputError(f"k={self.k}; accepted: 1 <= k <= n_latents={self.n_latents}")
        if self.k_aux is not None and not 0 < int(self.k_aux) <= int(self.n_latents):
            raise InputError(f"k_aux={self.k_aux}; accepted: 1 <= k_aux <= n_latents={self.n_latents}")
        if self.dead_tokens is not None and (isinstance(self.dead_tokens, bool) or int(self.dead_tokens) < 1):
            raise InputError(f"dead_tokens={self.dead_tokens!r}; accepted: a positive int, or None for auto")
        if not 0.0 <= float(self.batchtopk_threshold_momentum) < 1.0:
            raise InputError(f"batchtopk_threshold_momentum={self.batchtopk_threshold_momentum}; "
                             "accepted: 0 <= m < 1")
        if int(self.batchtopk_threshold_start_step) < 0:
            raise InputError(f"batchtopk_threshold_start_step={self.batchtopk_threshold_start_step}; "
                             "accepted: >= 0")

    @property
    def k_aux_eff(self) -> int:
        return int(min(self.k_aux if self.k_aux is not None else max(self.d_in // 2, 1), self.n_latents))

    @property
    def has_threshold(self) -> bool:
        return self.architecture in ("batchtopk", "jumprelu")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------- init


@functools.partial(jax.jit, static_argnames=("n_iter",))
def geometric_median(x, n_iter: int = 100, eps: float = 1e-8):
    """Weiszfeld's algorithm: the point minimising the summed L2 distance to the rows of x [N, d]."""
    x = jnp.asarray(x, jnp.float32)

    def body(_, m):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - m, axis=-1), eps)  # [N]
        return (w[:, None] * x).sum(0) / w.sum()

    return jax.lax.fori_loop(0, n_iter, body, x.mean(0))


def _init_decoder_one(key, cfg: SAEConfig):
    w_dec = jax.random.normal(key, (cfg.n_latents, cfg.d_in), jnp.float32)
    return w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)  # unit-norm rows


def _init_one(key, cfg: SAEConfig, b_dec):
    w_dec = _init_decoder_one(key, cfg)
    p = {
        "W_enc": w_dec.T,  # tied init
        "b_enc": jnp.zeros((cfg.n_latents,), jnp.float32),
        "W_dec": w_dec,
        "b_dec": b_dec,
    }
    if cfg.architecture == "jumprelu":
        p["threshold"] = jnp.full((cfg.n_latents,), cfg.jumprelu_init_threshold, jnp.float32)
    elif cfg.architecture == "batchtopk":
        # < 0 = unset (dictionary_learning): the first update sets it; until then every positive
        # pre-activation passes the inference rule relu(pre) * (pre > threshold)
        p["threshold"] = jnp.full((cfg.n_latents,), -1.0, jnp.float32)
    return p


def init(keys, cfg: SAEConfig, sample=None):
    """Params with a leading seed axis S from keys [S] (typed keys or uint32 [S, 2]).

    Tied init, unit-norm decoder rows; b_dec = geometric median of `sample` [N, d_in]
    (the same for every seed, so seeds differ only in their random directions).
    """
    if sample is not None:
        sample = jnp.asarray(sample, jnp.float32)
        if sample.ndim != 2 or sample.shape[1] != cfg.d_in:
            raise InputError(f"sample shape {tuple(sample.shape)}; expected [N, d_in={cfg.d_in}]")
        b_dec = geometric_median(sample)
    else:
        b_dec = jnp.zeros((cfg.d_in,), jnp.float32)
    return _init_fn(cfg)(keys, b_dec)


@functools.lru_cache(maxsize=16)
def _init_fn(cfg):
    return jax.jit(jax.vmap(lambda k, b: _init_one(k, cfg, b), in_axes=(0, None)))


def init_decoder(keys, cfg: SAEConfig):
    """The unit-norm decoder rows [S, n, d_in] that init(keys, cfg) starts from (without the rest)."""
    return _init_decoder_fn(cfg)(keys)


@functools.lru_cache(maxsize=16)
def _init_decoder_fn(cfg):
    return jax.jit(jax.vmap(lambda k: _init_decoder_one(k, cfg)))


# ----------------------------------------------------------------------------- forward


def pre_acts(cfg: SAEConfig, params, x):
    """Encoder pre-activations [B, n]."""
    if cfg.apply_b_dec_to_input:
        x = x - params["b_dec"]
    return x @ params["W_enc"] + params["b_enc"]


def encode(cfg: SAEConfig, params, x):
    """Latent activations z [B, n] (dense array; inference rules, not the training ones)."""
    x = jnp.asarray(x, jnp.float32)
    _check_d_in(cfg, x)
    pre = pre_acts(cfg, params, x)
    if cfg.architecture == "topk":
        vals, idx = jax.lax.top_k(pre, cfg.k)
        z = jnp.zeros_like(pre)
        return z.at[jnp.arange(pre.shape[0])[:, None], idx].set(jax.nn.relu(vals))
    if cfg.architecture == "batchtopk":
        return jax.nn.relu(pre) * (pre > params["threshold"])
    if cfg.architecture == "jumprelu":
        return pre * (pre > params["threshold"])
    return jax.nn.relu(pre)


def encode_topk(cfg: SAEConfig, params, x):
    """TopK codes as (vals [B, k], idx [B, k]) without the dense [B, n] latent array."""
    if cfg.architecture != "topk":
        raise InputError(f"encode_topk needs architecture='topk', got {cfg.architecture!r}")
    vals, idx = jax.lax.top_k(pre_acts(cfg, params, x), cfg.k)
    return jax.nn.relu(vals), idx


def decode(cfg: SAEConfig, params, z):
    """x_hat [B, d_in] from dense latents z [B, n]."""
    return z @ params["W_dec"] + params["b_dec"]


def reconstruct(cfg: SAEConfig, params, x):
    """x_hat [B, d_in] with the inference encoder."""
    x = jnp.asarray(x, jnp.float32)
    if cfg.architecture == "topk":
        vals, idx = encode_topk(cfg, params, x)
        return sparse_decode(vals, idx, params["W_dec"]) + params["b_dec"]
    return decode(cfg, params, encode(cfg, params, x))


def _check_d_in(cfg: SAEConfig, x):
    if x.shape[-1] != cfg.d_in:
        raise InputError(f"activations have d_in={x.shape[-1]}; this SAE expects d_in={cfg.d_in}")


# ----------------------------------------------------------------------------- metrics


def fvu(x, x_hat):
    """Fraction of variance unexplained, around the mean of x (not around zero)."""
    x = jnp.asarray(x, jnp.float32)
    resid = ((x - x_hat) ** 2).sum()
    total = ((x - x.mean(0)) ** 2).sum()
    return resid / jnp.maximum(total, 1e-30)


def evaluate(cfg: SAEConfig, params, x):
    """Per-SAE metrics on x [B, d_in]: mse, fvu, l0, dead_frac (never fired in x), firing_rate [n]."""
    x = jnp.asarray(x, jnp.float32)
    _check_d_in(cfg, x)
    z = encode(cfg, params, x)
    x_hat = decode(cfg, params, z)
    fired = z != 0
    rate = fired.mean(0)
    return {
        "mse": ((x - x_hat) ** 2).mean(),
        "fvu": fvu(x, x_hat),
        "l0": fired.sum(-1).mean(),
        "dead_frac": (rate == 0).mean(),
        "firing_rate": rate,
    }


# ----------------------------------------------------------------------------- training losses


@jax.custom_vjp
def _jump(pre, threshold, bandwidth):
    """Heaviside step H(pre - threshold) [B, n] with the rectangle-kernel pseudo-derivative (the L0 term)."""
    return (pre > threshold).astype(pre.dtype)


def _jump_fwd(pre, threshold, bandwidth):
    return _jump(pre, threshold, bandwidth), (pre, threshold, bandwidth)


def _jump_bwd(res, g):
    # Rajamanoharan et al. 2024 (Gemma Scope): d/dtheta H(pre - theta) ~ -K((pre - theta)/eps)/eps with the
    # rectangle kernel K(u) = 1{|u| < 1/2}; no gradient reaches pre through the step
    pre, threshold, bandwidth = res
    rect = (jnp.abs(pre - threshold) < bandwidth / 2).astype(pre.dtype) / bandwidth
    return jnp.zeros_like(pre), (-g * rect).sum(0).reshape(threshold.shape), None


_jump.defvjp(_jump_fwd, _jump_bwd)


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
        return None, (v[:, :, None] * jnp.take(w, i, axis=0, mode="clip")).sum(1)

    out = jax.lax.scan(f, None, (_chunked(vals, c), _chunked(idx, c)))[1]
    return out.reshape(vals.shape[0], w.shape[1])


def _sparse_decode_fwd(vals, idx, w):
    return sparse_decode(vals, idx, w), (vals, idx, w)


def _sparse_decode_bwd(res, g):
    vals, idx, w = res
    c = _chunk_size(*idx.shape)

    def f(dw, a):
        v, i, gg = a
        dv = (gg[:, None, :] * jnp.take(w, i, axis=0, mode="clip")).sum(-1)
        upd = (v[:, :, None] * gg[:, None, :]).reshape(-1, w.shape[1])
        return dw.at[i.reshape(-1)].add(upd, mode="promise_in_bounds"), dv

    dw, dv = jax.lax.scan(f, jnp.zeros_like(w), (_chunked(vals, c), _chunked(idx, c), _chunked(g, c)))
    return dv.reshape(vals.shape), None, dw


sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


def _topk_pass(tgt, xc, pre_sel, idx, w_dec, coef):
    """Sparse decode of a TopK SAE and the gradient of its squared error, in ONE chunked pass.

    tgt [B, d] is what the decode must match (without b_dec), xc [B, d] the encoder input, pre_sel and
    idx [B, k] the selected pre-activations and their rows of w_dec [n, d];
    loss = coef * sum ||tgt - rec||^2 (coef: a float or a traced scalar, the term's weight in the loss).
    Each chunk of tokens gathers its k decoder rows once and uses them for the decode AND for
    d loss / d vals (which needs only the chunk's own residual), then scatter-adds both weight gradients. The encoder's rows are never gathered: pre_sel comes from the
    dense encoder matmul, and the b_dec gradient through the encoder is W_enc @ d b_enc (see
    topk_sq_err). XLA's CPU gather / scatter is slow unless the rows stay in cache, hence the chunks.
    Returns rec [B, d], gpre [B, k] (d loss / d pre_sel), d W_enc^T [n, d], d W_dec [n, d], g [B, d]
    (d loss / d rec).
    """
    b, k = idx.shape
    d = w_dec.shape[1]
    c = _chunk_size(b, k)

    def body(carry, a):
        dwe, dwd = carry
        tt, xx, pv, ii = a
        rows = w_dec.at[ii].get(mode="promise_in_bounds")  # [c, k, d]
        vals = jax.nn.relu(pv)
        rec = jnp.einsum("ck,ckd->cd", vals, rows)
        g = (-2.0 * coef) * (tt - rec)  # d loss / d x_hat
        gpre = jnp.einsum("cd,ckd->ck", g, rows) * (pv > 0)  # relu' = 1 only where pv > 0 (as jax.nn.relu)
        fi = ii.reshape(-1)
        dwd = dwd.at[fi].add((vals[:, :, None] * g[:, None, :]).reshape(-1, d), mode="promise_in_bounds")
        dwe = dwe.at[fi].add((gpre[:, :, None] * xx[:, None, :]).reshape(-1, d), mode="promise_in_bounds")
        return (dwe, dwd), (rec, gpre, g)

    zeros = jnp.zeros_like(w_dec)
    (dwe, dwd), (rec, gpre, g) = jax.lax.scan(
        body, (zeros, zeros), (_chunked(tgt, c), _chunked(xc, c), _chunked(pre_sel, c), _chunked(idx, c)))
    return rec.reshape(b, d), gpre.reshape(b, k), dwe, dwd, g.reshape(b, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def topk_sq_err(apply_b_dec: bool, add_b_dec: bool, w_enc, b_enc, w_dec, b_dec, x, target, idx, pre_sel):
    """Squared error of a TopK decode: (err, vals [B, k], x_hat [B, d]).

    err = mean over tokens of ||target - x_hat||^2 with x_hat = sum_j relu(pre_sel) * W_dec[idx]
    (+ b_dec when add_b_dec); x / target [B, d], idx / pre_sel [B, k]. pre_sel must be the
    pre-activations (x - b_dec if apply_b_dec) @ W_enc + b_enc at idx, which the caller already has
    from the dense encoder matmul: it is a cache of that function of (params, x), so it gets no
    gradient of its own and the gradient reaches W_enc, b_enc, b_dec and x through it. Picks with
    pre_sel <= 0 add nothing (padding may use any valid idx). vals and x_hat come back detached
    (metrics / AuxK target).

    err is a scalar, so the differentiated path computes its gradient already in the forward pass
    (_topk_pass: ONE gather of the k decoder rows per token) and the backward only scales it; plain
    autodiff gathers the rows of both matrices twice.
    """
    vals = jax.nn.relu(pre_sel)
    rec = sparse_decode(vals, idx, w_dec)
    x_hat = rec + b_dec if add_b_dec else rec
    return ((target - x_hat) ** 2).sum(-1).mean(), vals, x_hat


def _topk_sq_err_parts(apply_b_dec, add_b_dec, w_enc, b_enc, w_dec, b_dec, x, target, idx, pre_sel, coef):
    """The forward of topk_sq_err with the gradient of coef * (summed squared error) already in hand.

    Returns (sq, vals, x_hat), (grads, g, gpre): sq = sum over tokens of ||target - x_hat||^2 (NOT scaled
    by coef), grads = d (coef * sq) / d (W_enc, b_enc, W_dec, b_dec).
    """
    xc = x - b_dec if apply_b_dec else x
    tgt = target - b_dec if add_b_dec else target  # what the sparse decode must match
    rec, gpre, dwe, dwd, g = _topk_pass(tgt, xc, pre_sel, idx, w_dec, coef)
    d_b_enc = jnp.zeros_like(b_enc).at[idx.reshape(-1)].add(gpre.reshape(-1))
    d_b_dec = g.sum(0) if add_b_dec else jnp.zeros_like(b_dec)
    if apply_b_dec:  # pre = (x - b_dec) W_enc + b_enc: sum_t d pre_t / d b_dec = -W_enc @ d_b_enc
        d_b_dec = d_b_dec - w_enc @ d_b_enc
    grads = (dwe.T, d_b_enc, dwd, d_b_dec)
    x_hat = rec + b_dec if add_b_dec else rec
    return (((tgt - rec) ** 2).sum(), jax.nn.relu(pre_sel), x_hat), (grads, g, gpre)


def _topk_sq_err_fwd(apply_b_dec, add_b_dec, w_enc, b_enc, w_dec, b_dec, x, target, idx, pre_sel):
    inv_b = 1.0 / x.shape[0]
    (sq, vals, x_hat), (grads, g, gpre) = _topk_sq_err_parts(
        apply_b_dec, add_b_dec, w_enc, b_enc, w_dec, b_dec, x, target, idx, pre_sel, inv_b)
    return (sq * inv_b, vals, x_hat), (grads, g, gpre, idx, w_enc)


def _topk_sq_err_bwd(apply_b_dec, add_b_dec, res, cts):
    grads, g, gpre, idx, w_enc = res
    ct = cts[0]  # cotangent of err; vals and x_hat are detached
    # d err / d x through the encoder; XLA drops this gather when x is not differentiated (training)
    dx = sparse_decode(gpre, idx, w_enc.T)
    return (*(ct * a for a in grads), ct * dx, -ct * g, None, None)


topk_sq_err.defvjp(_topk_sq_err_fwd, _topk_sq_err_bwd)


def _kth_largest(a, kk: int, n_iter: int = 40):
    """Value t with about kk entries of a >= t (bisection on the value; a full top_k over
    B*n entries is a sort on CPU, counting is one cheap pass per iteration)."""

    def body(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        many = (a >= mid).sum() >= kk
        return jnp.where(many, mid, lo), jnp.where(many, hi, mid)

    lo, _ = jax.lax.fori_loop(0, n_iter, body, (jnp.zeros((), a.dtype), a.max() * (1 + 1e-6) + 1e-30))
    return lo


def topk_train_loss_seeds(cfg: SAEConfig, params, x, dead, use_aux: bool = True):
    """TopK loss for S seeds at once: params with seed axis, x [B, d] or [S, B, d], dead [S, n].

    The same numbers as vmap(train_loss), computed one seed after another (lax.map): a vmapped step
    holds S [B, n] pre-activation arrays at once and its gathers / scatter-adds get batching dims,
    which measured slower per seed than the single-seed step on CPU. Returns (loss [S], aux with
    leading S); the gradient of loss.sum() is the per-seed gradient (the seeds' params are disjoint).
    """
    if x.ndim == 3:
        return jax.lax.map(lambda a: train_loss(cfg, a[0], a[1], a[2], use_aux), (params, x, dead))
    return jax.lax.map(lambda a: train_loss(cfg, a[0], x, a[1], use_aux), (params, dead))


def total_variance(x):
    """Summed squared deviation of the batch x [B, d] from its mean: the denominator of the TopK losses."""
    return jnp.maximum(((x - x.mean(0)) ** 2).sum(), 1e-30)


def _auxk_scale(cfg: SAEConfig, dead):
    """min(num_dead / k_aux, 1): sparsify damps AuxK while fewer latents are dead than it could use."""
    return jnp.minimum(dead.sum().astype(jnp.float32) / cfg.k_aux_eff, 1.0)


def _auxk_picks(cfg: SAEConfig, pre, dead):
    """The k_aux largest pre-activations of DEAD latents and their indices [B, k_aux]. With fewer dead
    latents than k_aux the extra picks get pre-activation 0, i.e. add nothing (sparsify's
    k_aux = min(k_aux, num_dead))."""
    a_top, a_idx = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), cfg.k_aux_eff)
    return jnp.where(jnp.isfinite(a_top), a_top, 0.0), a_idx


def auxk_is_dense(cfg: SAEConfig) -> bool:
    """Whether topk_loss_and_grads computes AuxK with dense masked matmuls instead of k_aux-row gathers.

    AuxK decodes k_aux = d_in / 2 latents per token: with a small dictionary (n_latents <= 4 * k_aux,
    i.e. up to 2x expansion) that is a large share of all latents, and three dense [B, n] x [n, d]
    matmuls cost less than gathering and scatter-adding k_aux decoder rows per token (on CPU 4x
    faster at 640 latents). The numbers are the same either way (tested).
    """
    return cfg.n_latents <= 4 * cfg.k_aux_eff


# With at most this many dead latents (and at most k_aux), AuxK runs on the dead latents' columns only.
AUXK_SUBSET = 128


def _auxk_few_dead(cfg: SAEConfig, params, xc, pre, dead, target, coef, m: int):
    """AuxK when at most m <= k_aux latents are dead: every dead latent is decoded (k_aux picks would
    take them all), as dense matmuls over their m gathered columns / rows. Returns (sq, grads) ordered
    (W_enc, b_enc, W_dec, b_dec) like _topk_sq_err_parts."""
    idx = jnp.nonzero(dead, size=m, fill_value=0)[0]  # [m]; padding entries are masked out below
    valid = jnp.arange(m) < dead.sum()
    p_sub = pre[:, idx]  # [B, m]
    on = valid & (p_sub > 0)
    z = jnp.where(on, p_sub, 0.0)
    w_rows = params["W_dec"][idx]  # [m, d]
    r = z @ w_rows - target
    g = (2.0 * coef) * r
    d_pre = jnp.where(on, g @ w_rows.T, 0.0)  # [B, m]
    d_b_sub = d_pre.sum(0)
    d_w_dec = jnp.zeros_like(params["W_dec"]).at[idx].add(z.T @ g)
    d_w_enc = jnp.zeros_like(params["W_enc"]).at[:, idx].add(xc.T @ d_pre)
    d_b_enc = jnp.zeros_like(params["b_enc"]).at[idx].add(d_b_sub)
    d_b_dec = (-(params["W_enc"][:, idx] @ d_b_sub) if cfg.apply_b_dec_to_input
               else jnp.zeros_like(params["b_dec"]))
    return (r ** 2).sum(), (d_w_enc, d_b_enc, d_w_dec, d_b_dec)


def _auxk_dense(cfg: SAEConfig, params, xc, pre, dead, target, coef):
    """AuxK's summed squared error and the gradients of coef * it, as dense masked matmuls.

    The latents decoded for a token are its k_aux largest pre-activations among the dead ones (all
    dead latents when there are at most k_aux), as _auxk_picks selects them; e_hat = relu(pre) on
    those latents @ W_dec (no b_dec), target = the detached residual. Returns (sq, grads) with grads
    ordered (W_enc, b_enc, W_dec, b_dec) like _topk_sq_err_parts.
    """
    n_dead = dead.sum()

    def kth_mask():
        kth = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), cfg.k_aux_eff)[0][:, -1:]
        return dead & (pre >= kth)

    mask = jax.lax.cond(n_dead <= cfg.k_aux_eff, lambda: jnp.broadcast_to(dead, pre.shape), kth_mask)
    on = mask & (pre > 0)
    z = jnp.where(on, pre, 0.0)  # [B, n]
    r = z @ params["W_dec"] - target  # [B, d]
    g = (2.0 * coef) * r
    d_w_dec = z.T @ g
    d_pre = jnp.where(on, g @ params["W_dec"].T, 0.0)  # [B, n]
    d_b_enc = d_pre.sum(0)
    d_w_enc = xc.T @ d_pre
    d_b_dec = -(params["W_enc"] @ d_b_enc) if cfg.apply_b_dec_to_input else jnp.zeros_like(params["b_dec"])
    return (r ** 2).sum(), (d_w_enc, d_b_enc, d_w_dec, d_b_dec)


def topk_loss_and_grads(cfg: SAEConfig, params, x, dead, use_aux: bool = True):
    """TopK loss, metrics AND gradients of one SAE, written out by hand (no autodiff).

    The same numbers as jax.value_and_grad(train_loss) (up to float rounding): loss = FVU + aux_coeff *
    AuxK loss, as in train_loss. The gradient of each squared-error term, already scaled by its weight in
    the loss, is computed in its forward pass (_topk_pass, one gather of the k decoder rows per token), so
    there is no backward pass, no residuals stored across it and no rescaling afterwards. Returns
    (loss, aux, grads) with aux as in train_loss.
    """
    w = [params[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")]
    ab = cfg.apply_b_dec_to_input
    xc = x - params["b_dec"] if ab else x
    pre = xc @ params["W_enc"] + params["b_enc"]  # [B, n]: the only dense matmul
    pre_sel, idx = jax.lax.top_k(pre, cfg.k)
    inv_tv = 1.0 / total_variance(x)
    (sq, vals, x_hat), (grads, *_) = _topk_sq_err_parts(ab, True, *w, x, x, idx, pre_sel, inv_tv)
    fire_count = jnp.zeros((cfg.n_latents,), jnp.int32).at[idx.reshape(-1)].add(
        (vals.reshape(-1) > 0).astype(jnp.int32))
    aux = {"aux_loss": jnp.zeros((), jnp.float32)}
    loss = sq * inv_tv
    if use_aux:
        scale = _auxk_scale(cfg, dead)
        coef = cfg.aux_coeff * scale * inv_tv
        target = x - x_hat

        def general():
            if auxk_is_dense(cfg):
                return _auxk_dense(cfg, params, xc, pre, dead, target, coef)
            a_pre, a_idx = _auxk_picks(cfg, pre, dead)
            (sq, _, _), (gr, *_) = _topk_sq_err_parts(ab, False, *w, x, target, a_idx, a_pre, coef)
            return sq, gr

        # Usually only a few latents are dead: then AuxK decodes all of them, as small dense matmuls
        # over just their columns (the same numbers as the general paths, tested).
        m = min(AUXK_SUBSET, cfg.k_aux_eff)
        a_sq, a_grads = jax.lax.cond(dead.sum() <= m,
                                     lambda: _auxk_few_dead(cfg, params, xc, pre, dead, target, coef, m),
                                     general)
        a_loss = scale * a_sq * inv_tv
        loss = loss + cfg.aux_coeff * a_loss
        grads = tuple(g + a for g, a in zip(grads, a_grads))
        aux["aux_loss"] = a_loss
    aux.update(mse=sq / (x.shape[0] * cfg.d_in), l0=(vals > 0).sum(-1).mean(), fire_count=fire_count,
               x_hat=x_hat)
    return loss, aux, dict(zip(("W_enc", "b_enc", "W_dec", "b_dec"), grads))


def train_loss(cfg: SAEConfig, params, x, dead, use_aux: bool = True):
    """Loss and metrics for one SAE on a batch x [B, d_in]; dead [n] bool marks dead latents (AuxK).

    TopK follows EleutherAI sparsify (sparse_coder.py) with the batch's total variance
    tv = sum ||x - mean(x)||^2 as the common denominator:
        loss = FVU + aux_coeff * AuxK,   FVU = sum ||x - x_hat||^2 / tv,
        AuxK = min(num_dead / k_aux, 1) * sum ||e_hat - e||^2 / tv,
    e = x - x_hat the detached residual and e_hat the decode (without b_dec) of the k_aux largest
    pre-activations of dead latents. Both terms share tv, so AuxK weighs aux_coeff times the main term per
    unit of squared error (dividing only AuxK by the residual's variance would weigh it hundreds of times
    less, and dead latents would never revive).
    relu / jumprelu / batchtopk: per-token squared error summed over d_in and averaged over tokens, plus
    the sparsity penalty (Anthropic / Gemma Scope / dictionary_learning conventions).

    Returns (loss, aux) where aux holds mse (mean squared error per element), l0, fire_count [n] (tokens
    that fired it), x_hat, aux_loss (TopK) and, for batchtopk, the batch's minimum active pre-activation
    (threshold estimate). use_aux=False skips AuxK (the caller knows no latent is dead).
    """
    arch = cfg.architecture
    xc = x - params["b_dec"] if cfg.apply_b_dec_to_input else x
    aux = {}
    if arch == "topk":
        # the dense encoder matmul (no gradient) is the only dense work: it picks the k latents and
        # gives their pre-activations; topk_sq_err's gradients touch those k rows only
        pre = jax.lax.stop_gradient(xc @ params["W_enc"] + params["b_enc"])  # [B, n]
        pre_sel, idx = jax.lax.top_k(pre, cfg.k)  # [B, k]
        w = [params[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")]
        tv = total_variance(x)
        b = x.shape[0]
        err, vals, x_hat = topk_sq_err(cfg.apply_b_dec_to_input, True, *w, x, x, idx, pre_sel)
        sq = err * b  # topk_sq_err averages over tokens
        fire_count = jnp.zeros((cfg.n_latents,), jnp.int32).at[idx.reshape(-1)].add(
            (vals.reshape(-1) > 0).astype(jnp.int32))
        l0 = (vals > 0).sum(-1).mean()
        loss = sq / tv
        aux["aux_loss"] = jnp.zeros((), jnp.float32)
        if use_aux:
            a_pre, a_idx = _auxk_picks(cfg, pre, dead)
            target = jax.lax.stop_gradient(x - x_hat)  # x_hat comes back detached already
            a_sq = topk_sq_err(cfg.apply_b_dec_to_input, False, *w, x, target, a_idx, a_pre)[0] * b
            a_loss = _auxk_scale(cfg, dead) * a_sq / tv  # zero when nothing is dead
            loss = loss + cfg.aux_coeff * a_loss
            aux["aux_loss"] = a_loss
    if arch != "topk":
        pre = xc @ params["W_enc"] + params["b_enc"]  # [B, n]
        if arch == "batchtopk":
            cut = _kth_largest(jax.lax.stop_gradient(jax.nn.relu(pre)), cfg.k * pre.shape[0])
            mask = (pre >= cut) & (pre > 0)
            z = jax.nn.relu(pre) * mask
            aux["min_active"] = jnp.where(mask, pre, jnp.inf).min()
        elif arch == "relu":
            z = jax.nn.relu(pre)
        else:  # jumprelu
            z = jumprelu(pre, params["threshold"], cfg.jumprelu_bandwidth)
        x_hat = z @ params["W_dec"] + params["b_dec"]
        fire_count = (z != 0).sum(0).astype(jnp.int32)
        l0 = (z != 0).sum(-1).mean()
        sq = ((x - x_hat) ** 2).sum()
        loss = sq / x.shape[0]
        if arch == "relu":
            w_norm = jnp.linalg.norm(params["W_dec"], axis=-1)
            sparsity = (z * w_norm).sum(-1).mean()
            loss = loss + cfg.l1_coeff * sparsity
        elif arch == "jumprelu":
            l0_smooth = _jump(pre, params["threshold"], cfg.jumprelu_bandwidth).sum(-1).mean()
            loss = loss + cfg.l0_coeff * l0_smooth
    aux.update(mse=sq / (x.shape[0] * cfg.d_in), l0=l0, fire_count=fire_count, x_hat=x_hat)
    return loss, aux


def remove_parallel_grad(w_dec, g):
    """Drop the gradient component along each unit-norm decoder row (keeps rows on the sphere)."""
    w = w_dec / jnp.maximum(jnp.linalg.norm(w_dec, axis=-1, keepdims=True), 1e-12)
    return g - (g * w).sum(-1, keepdims=True) * w


def normalize_decoder(w_dec):
    return w_dec / jnp.maximum(jnp.linalg.norm(w_dec, axis=-1, keepdims=True), 1e-12)


def lr_default(n_latents: int) -> float:
    """2e-4 / sqrt(n_latents / 2^14) (OpenAI TopK scaling law)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def fold_scale(params, scale):
    """Params trained on x * scale -> params acting on raw x (exact reparametrisation).

    pre = (x*c - b_dec) W_enc + b_enc = (x - b_dec/c)(c W_enc) + b_enc ; x_hat = (z W_dec + b_dec) / c
    """
    out = dict(params)
    c = jnp.asarray(scale, jnp.float32)
    out["W_enc"] = params["W_enc"] * c
    out["W_dec"] = params["W_dec"] / c
    out["b_dec"] = params["b_dec"] / c
    return out


def to_numpy(tree):
    return jax.tree.map(np.asarray, tree)
