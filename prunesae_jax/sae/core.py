"""SAE maths: config, init, encode/decode, losses and metrics for one SAE.

Every function here works on the params of ONE SAE (no seed axis); training
vmaps them over the leading seed axis S. Names and shapes follow SAELens:
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
  dead_tokens: int = 1_000_000  # a latent is dead after this many tokens without firing
  l1_coeff: float = 5.0  # relu: decoder-norm-weighted L1
  l0_coeff: float = 1.0  # jumprelu: L0 penalty
  jumprelu_bandwidth: float = 0.001
  jumprelu_init_threshold: float = 0.001
  batchtopk_threshold_momentum: float = 0.99
  apply_b_dec_to_input: bool = True  # Gemma Scope SAEs do not subtract b_dec
  unit_norm_decoder: bool = True

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"architecture={self.architecture!r}; accepted: {ARCHITECTURES}")
    if int(self.d_in) <= 0 or int(self.n_latents) <= 0:
      raise ValueError(f"d_in={self.d_in}, n_latents={self.n_latents}; both must be positive integers")
    if self.architecture in ("topk", "batchtopk") and not 0 < int(self.k) <= int(self.n_latents):
      raise ValueError(f"k={self.k}; accepted: 1 <= k <= n_latents={self.n_latents}")
    if self.k_aux is not None and not 0 < int(self.k_aux) <= int(self.n_latents):
      raise ValueError(f"k_aux={self.k_aux}; accepted: 1 <= k_aux <= n_latents={self.n_latents}")

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


def _init_one(key, cfg: SAEConfig, b_dec):
  w_dec = jax.random.normal(key, (cfg.n_latents, cfg.d_in), jnp.float32)
  w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)  # unit-norm rows
  p = {
      "W_enc": w_dec.T,  # tied init
      "b_enc": jnp.zeros((cfg.n_latents,), jnp.float32),
      "W_dec": w_dec,
      "b_dec": b_dec,
  }
  if cfg.architecture == "jumprelu":
    p["threshold"] = jnp.full((cfg.n_latents,), cfg.jumprelu_init_threshold, jnp.float32)
  elif cfg.architecture == "batchtopk":
    p["threshold"] = jnp.zeros((cfg.n_latents,), jnp.float32)
  return p


def init(keys, cfg: SAEConfig, sample=None):
  """Params with a leading seed axis S from keys [S] (typed keys or uint32 [S, 2]).

  Tied init, unit-norm decoder rows; b_dec = geometric median of `sample` [N, d_in]
  (the same for every seed, so seeds differ only in their random directions).
  """
  if sample is not None:
    sample = jnp.asarray(sample, jnp.float32)
    if sample.ndim != 2 or sample.shape[1] != cfg.d_in:
      raise ValueError(f"sample shape {tuple(sample.shape)}; expected [N, d_in={cfg.d_in}]")
    b_dec = geometric_median(sample)
  else:
    b_dec = jnp.zeros((cfg.d_in,), jnp.float32)
  return _init_fn(cfg)(keys, b_dec)


@functools.lru_cache(maxsize=16)
def _init_fn(cfg):
  return jax.jit(jax.vmap(lambda k, b: _init_one(k, cfg, b), in_axes=(0, None)))


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
    raise ValueError(f"encode_topk needs architecture='topk', got {cfg.architecture!r}")
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
    raise ValueError(f"activations have d_in={x.shape[-1]}; this SAE expects d_in={cfg.d_in}")


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
  return (pre > threshold).astype(pre.dtype)


def _jump_fwd(pre, threshold, bandwidth):
  return _jump(pre, threshold, bandwidth), (pre, threshold, bandwidth)


def _jump_bwd(res, g):
  # straight-through with a rectangle kernel: d/dtheta H(pre - theta) ~ -K((pre - theta)/eps)/eps
  pre, threshold, bandwidth = res
  rect = (jnp.abs(pre - threshold) < bandwidth / 2).astype(pre.dtype) / bandwidth
  return jnp.zeros_like(pre), (-g * rect).sum(0).reshape(threshold.shape), None


_jump.defvjp(_jump_fwd, _jump_bwd)


def _jumprelu_act(pre, threshold, bandwidth):
  # gradient reaches pre through the identity factor only where the unit is open (as in Gemma Scope)
  return jax.lax.stop_gradient(pre) * _jump(pre, threshold, bandwidth) + (
      pre - jax.lax.stop_gradient(pre)) * (pre > threshold)


def _chunked(a, c):
  return a.reshape((a.shape[0] // c, c) + a.shape[1:])


def _chunk_size(b: int, k: int) -> int:
  # a chunk gathers [c, k, d] rows: keep it cache-sized (c*k ~ 1024); c must divide the batch
  c = max(1, min(b, 1024 // max(k, 1)))
  while b % c:
    c -= 1
  return c


@jax.custom_vjp
def gather_dot(xc, idx, w):
  """out[b, j] = xc[b] . w[idx[b, j]]  ([B, d], [B, k], [n, d] -> [B, k]).

  Chunked gather + multiply-reduce; the backward is a scatter-add into the k selected rows.
  """
  c = _chunk_size(*idx.shape)

  def f(_, a):
    xx, i = a
    return None, (xx[:, None, :] * jnp.take(w, i, axis=0, mode="clip")).sum(-1)

  return jax.lax.scan(f, None, (_chunked(xc, c), _chunked(idx, c)))[1].reshape(idx.shape)


def _gather_dot_fwd(xc, idx, w):
  return gather_dot(xc, idx, w), (xc, idx, w)


def _gather_dot_bwd(res, g):
  xc, idx, w = res
  c = _chunk_size(*idx.shape)

  def f(dw, a):
    xx, i, gg = a
    dx = (gg[:, :, None] * jnp.take(w, i, axis=0, mode="clip")).sum(1)
    upd = (gg[:, :, None] * xx[:, None, :]).reshape(-1, w.shape[1])
    return dw.at[i.reshape(-1)].add(upd, mode="promise_in_bounds"), dx

  dw, dx = jax.lax.scan(f, jnp.zeros_like(w), (_chunked(xc, c), _chunked(idx, c), _chunked(g, c)))
  return dx.reshape(xc.shape), None, dw


gather_dot.defvjp(_gather_dot_fwd, _gather_dot_bwd)


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


def _topk_layer(xc, idx, params, n_rows=None):
  """relu pre-activations of the selected latents and their decode (no b_dec)."""
  w_enc_t, b_enc, w_dec = params["W_enc"].T, params["b_enc"], params["W_dec"]
  if n_rows is not None:  # an all-zero extra row n for padded AuxK picks
    w_enc_t = jnp.concatenate([w_enc_t, jnp.zeros((1, w_enc_t.shape[1]), w_enc_t.dtype)])
    w_dec = jnp.concatenate([w_dec, jnp.zeros((1, w_dec.shape[1]), w_dec.dtype)])
    b_enc = jnp.concatenate([b_enc, jnp.zeros((1,), b_enc.dtype)])
  vals = jax.nn.relu(gather_dot(xc, idx, w_enc_t) + jnp.take(b_enc, idx, mode="clip"))
  return vals, sparse_decode(vals, idx, w_dec)


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

  Same numbers as vmap(train_loss), but the sparse gathers / scatter-adds run on the seed-flattened
  weights ([S*n, d] rows, indices offset by s*n): a vmapped gather has batching dims and is several
  times slower on CPU. Returns (loss [S], aux with leading S); the gradient of loss.sum() is the
  per-seed gradient (the seeds' params are disjoint).
  """
  n, d = cfg.n_latents, cfg.d_in
  w_enc, b_enc, w_dec, b_dec = params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"]
  s_ = w_enc.shape[0]
  x = jnp.broadcast_to(x, (s_,) + x.shape[-2:])
  b = x.shape[1]
  xc = x - b_dec[:, None, :] if cfg.apply_b_dec_to_input else x  # [S, B, d]
  pre = jax.lax.stop_gradient(jnp.einsum("sbd,sdn->sbn", xc, w_enc) + b_enc[:, None, :])  # [S, B, n]
  _, idx = jax.lax.top_k(pre, cfg.k)  # [S, B, k]
  off = (jnp.arange(s_, dtype=idx.dtype) * n)[:, None, None]

  def layer(ix, extra_row=False):
    we = jnp.swapaxes(w_enc, 1, 2)  # [S, n, d]
    be, wd = b_enc, w_dec
    nn_ = n
    if extra_row:  # an all-zero row n per seed for padded AuxK picks
      we = jnp.concatenate([we, jnp.zeros((s_, 1, d), we.dtype)], 1)
      wd = jnp.concatenate([wd, jnp.zeros((s_, 1, d), wd.dtype)], 1)
      be = jnp.concatenate([be, jnp.zeros((s_, 1), be.dtype)], 1)
      nn_ = n + 1
    o = (jnp.arange(s_, dtype=ix.dtype) * nn_)[:, None, None]
    flat_i = (ix + o).reshape(s_ * b, -1)
    pre_sel = gather_dot(xc.reshape(s_ * b, d), flat_i, we.reshape(s_ * nn_, d))
    vals = jax.nn.relu(pre_sel + jnp.take(be.reshape(-1), flat_i, mode="clip"))
    rec = sparse_decode(vals, flat_i, wd.reshape(s_ * nn_, d))
    return vals.reshape(s_, b, -1), rec.reshape(s_, b, d)

  vals, rec = layer(idx)
  x_hat = rec + b_dec[:, None, :]
  fire_count = jnp.zeros((s_ * n,), jnp.int32).at[(idx + off).reshape(-1)].add(
      (vals.reshape(-1) > 0).astype(jnp.int32)).reshape(s_, n)
  resid = x - x_hat
  mse_sum = (resid ** 2).sum(-1).mean(-1)  # [S]
  loss = mse_sum
  a_loss = jnp.zeros((s_,), jnp.float32)
  if use_aux:
    masked = jnp.where(dead[:, None, :], pre, -jnp.inf)
    a_top, a_idx = jax.lax.top_k(masked, cfg.k_aux_eff)
    a_idx = jnp.where(jnp.isfinite(a_top), a_idx, n)
    _, a_rec = layer(a_idx, extra_row=True)
    target = jax.lax.stop_gradient(resid)
    a_mse = ((target - a_rec) ** 2).sum(-1).mean(-1)
    a_loss = a_mse / jnp.maximum(((target - target.mean(1, keepdims=True)) ** 2).sum(-1).mean(-1), 1e-12)
    a_loss = jnp.where(dead.any(-1), a_loss, 0.0)
    loss = loss + cfg.aux_coeff * a_loss
  aux = dict(mse=mse_sum / d, l0=(vals > 0).sum(-1).mean(-1), fire_count=fire_count, x_hat=x_hat, aux_loss=a_loss)
  return loss, aux


def train_loss(cfg: SAEConfig, params, x, dead, use_aux: bool = True):
  """Loss and metrics for one SAE on a batch x [B, d_in]; dead [n] bool marks dead latents (AuxK).

  Returns (loss, aux) where aux holds mse, l0, fire_count [n] (tokens that fired it), x_hat and,
  for batchtopk, the batch's minimum active pre-activation (threshold estimate).
  use_aux=False skips AuxK (the caller knows no latent is dead).
  """
  arch = cfg.architecture
  xc = x - params["b_dec"] if cfg.apply_b_dec_to_input else x
  aux = {}
  if arch == "topk":
    # the dense encoder matmul (no gradient) is the only dense work: it picks the k latents,
    # then sparse_layer recomputes those pre-activations so every gradient touches k rows only
    pre = jax.lax.stop_gradient(xc @ params["W_enc"] + params["b_enc"])  # [B, n]
    _, idx = jax.lax.top_k(pre, cfg.k)  # [B, k]
    vals, rec = _topk_layer(xc, idx, params)
    x_hat = rec + params["b_dec"]
    fire_count = jnp.zeros((cfg.n_latents,), jnp.int32).at[idx.reshape(-1)].add(
        (vals.reshape(-1) > 0).astype(jnp.int32))
    l0 = (vals > 0).sum(-1).mean()
    resid = x - x_hat
    mse_sum = (resid ** 2).sum(-1).mean()
    loss = mse_sum
    aux["aux_loss"] = jnp.zeros((), jnp.float32)
    if use_aux:
      # AuxK: the k_aux largest DEAD latents model the detached residual; b_dec is not added again
      masked = jnp.where(dead, pre, -jnp.inf)
      a_top, a_idx = jax.lax.top_k(masked, cfg.k_aux_eff)
      # fewer dead latents than k_aux: point the extra picks at an all-zero row n (contributes 0)
      a_idx = jnp.where(jnp.isfinite(a_top), a_idx, cfg.n_latents)
      _, a_rec = _topk_layer(xc, a_idx, params, n_rows=cfg.n_latents + 1)
      target = jax.lax.stop_gradient(resid)
      a_mse = ((target - a_rec) ** 2).sum(-1).mean()
      # normalised by the residual's variance (OpenAI / sparsify); zero when nothing is dead
      a_loss = a_mse / jnp.maximum(((target - target.mean(0)) ** 2).sum(-1).mean(), 1e-12)
      a_loss = jnp.where(dead.any(), a_loss, 0.0)
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
      z = _jumprelu_act(pre, params["threshold"], cfg.jumprelu_bandwidth)
    x_hat = z @ params["W_dec"] + params["b_dec"]
    fire_count = (z != 0).sum(0).astype(jnp.int32)
    l0 = (z != 0).sum(-1).mean()
    mse_sum = ((x - x_hat) ** 2).sum(-1).mean()
    loss = mse_sum
    if arch == "relu":
      w_norm = jnp.linalg.norm(params["W_dec"], axis=-1)
      sparsity = (z * w_norm).sum(-1).mean()
      loss = loss + cfg.l1_coeff * sparsity
    elif arch == "jumprelu":
      l0_smooth = _jump(pre, params["threshold"], cfg.jumprelu_bandwidth).sum(-1).mean()
      loss = loss + cfg.l0_coeff * l0_smooth
  aux.update(mse=mse_sum / cfg.d_in, l0=l0, fire_count=fire_count, x_hat=x_hat)
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
