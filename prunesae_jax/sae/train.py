"""Train S seeds of an SAE at once: one jitted step vmapped over the seed axis.

    result = train(SAEConfig(d_in=640, n_latents=5120, k=32), TrainConfig(n_seeds=4, n_steps=400),
                   ActivationStore(path), workdir='/tmp/run')

By default every seed sees the same batch and differs only in its init (seed stability is then
a property of the optimisation alone); per_seed_data=True gives seed s its own data order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from prunesae_jax.errors import InputError, NonFiniteError
from prunesae_jax.sae import core
from prunesae_jax.sae.store import ArrayStore, _atomic_write_json


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train (see the SAE contract in spec/INTERFACES.md)."""

    n_steps: int = 1000
    n_seeds: int = 1
    seed: int = 0  # SAE s is initialised from jax.random.key(seed + s)
    data_seed: int = 0
    batch_size: int = 4096
    lr: float | None = None  # None -> 2e-4 / sqrt(n_latents / 2**14)
    warmup_steps: int = 100
    decay_frac: float = 0.2  # linear decay to 0 over the last 20% of steps
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    per_seed_data: bool = False
    normalize: bool = True  # scale inputs so E||x|| = sqrt(d_in)
    geometric_median_tokens: int = 4096
    checkpoint_every: int = 0  # 0 = no checkpoints
    log_every: int = 50
    eval_tokens: int = 16384
    progress: bool = True
    # TopK: how many seeds one pass of the step computes together (vmapped); the passes run one after
    # another (lax.map). 0 = auto: all seeds on GPU / TPU, one at a time on CPU, where batching seeds
    # saves nothing (S GEMMs batched run at the FLOP rate of S GEMMs in a row) and holds S [B, n]
    # pre-activation arrays at once. Results agree to float rounding either way.
    seeds_per_pass: int = 0

    def __post_init__(self):
        if self.n_steps <= 0 or self.n_seeds <= 0 or self.batch_size <= 0:
            raise InputError(f"n_steps={self.n_steps}, n_seeds={self.n_seeds}, batch_size={self.batch_size}; "
                             "all must be positive")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise InputError(f"decay_frac={self.decay_frac}; accepted: 0..1")
        if self.seeds_per_pass < 0:
            raise InputError(f"seeds_per_pass={self.seeds_per_pass}; accepted: 0 (auto) or a positive int")


# fields that change the numbers: a checkpoint from a run that differs in these cannot be resumed
_RESUME_IGNORED = ("progress", "log_every", "checkpoint_every", "eval_tokens", "seeds_per_pass")


@dataclasses.dataclass
class TrainResult:
    params: dict  # seed axis first, for RAW activations (normalisation folded back)
    params_normalized: dict  # as trained, for activations * scale
    scale: float
    metrics: list  # logged dicts (per-seed lists)
    final: dict  # core.evaluate per seed on a sample of the data (raw units)


def learning_rate_schedule(sae_cfg: core.SAEConfig, tcfg: TrainConfig):
    lr = tcfg.lr if tcfg.lr is not None else core.lr_default(sae_cfg.n_latents)
    warm = max(min(tcfg.warmup_steps, tcfg.n_steps - 1), 0)
    decay = int(tcfg.n_steps * tcfg.decay_frac)
    flat = max(tcfg.n_steps - warm - decay, 0)
    parts = [optax.linear_schedule(lr * 1e-3 if warm else lr, lr, max(warm, 1)),
             optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, max(decay, 1))]
    return optax.join_schedules(parts, [warm, warm + flat])


def make_optimizer(sae_cfg, tcfg):
    """optax Adam with the run's schedule: the reference the fused update in the train step follows."""
    return optax.adam(learning_rate_schedule(sae_cfg, tcfg), b1=tcfg.adam_b1, b2=tcfg.adam_b2)


def schedule_args(sae_cfg: core.SAEConfig, tcfg: TrainConfig) -> np.ndarray:
    """[lr, lr at step 0, warm-up steps, last warm-up-or-flat step, decay steps] for _lr_at.

    The schedule travels as a (tiny) array argument of the jitted step, so runs that differ only in
    n_steps / lr / warm-up share one compiled step.
    """
    lr = tcfg.lr if tcfg.lr is not None else core.lr_default(sae_cfg.n_latents)
    warm = max(min(tcfg.warmup_steps, tcfg.n_steps - 1), 0)
    decay = int(tcfg.n_steps * tcfg.decay_frac)
    flat = max(tcfg.n_steps - warm - decay, 0)
    return np.asarray([lr, lr * 1e-3 if warm else lr, max(warm, 1), warm, warm + flat, max(decay, 1)], np.float32)


def _lr_at(step, sched):
    """learning_rate_schedule(step) from schedule_args, inside the jitted step (same formula as optax)."""
    lr, lr0, warm_len, warm, flat_end, decay_len = (sched[i] for i in range(6))
    t = step.astype(jnp.float32)
    up = (lr0 - lr) * (1 - jnp.clip(t, 0, warm_len) / warm_len) + lr
    down = lr * (1 - jnp.clip(t - flat_end, 0, decay_len) / decay_len)
    return jnp.where(t < warm, up, jnp.where(t < flat_end, lr, down))


def init_state(sae_cfg: core.SAEConfig, tcfg: TrainConfig, sample=None) -> dict:
    """The full train state pytree (seed axis S first on every per-seed leaf)."""
    keys = jnp.stack([jax.random.key_data(jax.random.key(tcfg.seed + s)) for s in range(tcfg.n_seeds)])
    params = core.init(keys, sae_cfg, sample)
    s, n = tcfg.n_seeds, sae_cfg.n_latents
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return {
        "params": params,
        "opt_state": {"mu": zeros(), "nu": zeros()},  # Adam moments; the step count is state["step"]
        "since_fired": jnp.zeros((s, n), jnp.int32),  # tokens since each latent last fired
        "fire_count": jnp.zeros((s, n), jnp.int32),  # tokens that fired it, whole run
        "bad_step": jnp.full((s,), -1, jnp.int32),  # first step whose loss was not finite
        "step": jnp.zeros((), jnp.int32),
    }


def make_train_step(sae_cfg: core.SAEConfig, tcfg: TrainConfig, mesh=None):
    """step(state, batch) -> (state, metrics); batch [B, d_in] or [S, B, d_in] (per_seed_data).

    The state is donated. Every per-seed metric has shape [S]. The compiled step depends on the SAE
    config, Adam's betas, per_seed_data and the mesh only (the schedule is an argument), so every
    train() call with those reuses it.
    """
    f = _make_train_step(sae_cfg, float(tcfg.adam_b1), float(tcfg.adam_b2), bool(tcfg.per_seed_data), mesh,
                         _seeds_per_pass(tcfg))
    sched = schedule_args(sae_cfg, tcfg)
    return lambda state, batch, scale=1.0: f(state, batch, sched, np.float32(scale))


def _seeds_per_pass(tcfg: TrainConfig) -> int:
    """TrainConfig.seeds_per_pass with 0 resolved for the default backend."""
    if tcfg.seeds_per_pass:
        return min(tcfg.seeds_per_pass, tcfg.n_seeds)
    return 1 if jax.default_backend() == "cpu" else tcfg.n_seeds


def _adam_apply(p, g, mu, nu, ok, lr, b1, b2, t, unit_rows: bool, eps: float = 1e-8):
    """One fused elementwise pass of Adam for one param [S, ...] (optax.adam's formula).

    unit_rows: W_dec, whose rows stay on the unit sphere: the gradient component along each row is
    dropped before Adam and the updated rows are renormalised (the rows are unit norm on entry, so the
    projection uses them directly). ok [S]: seeds whose loss was not finite keep p, mu, nu unchanged.
    """
    if unit_rows:
        g = g - (g * p).sum(-1, keepdims=True) * p
    mu_n = b1 * mu + (1 - b1) * g
    nu_n = b2 * nu + (1 - b2) * (g * g)
    new = p - (lr / (1 - b1 ** t)) * mu_n / (jnp.sqrt(nu_n / (1 - b2 ** t)) + eps)
    if unit_rows:
        new = core.normalize_decoder(new)
    okb = ok.reshape((-1,) + (1,) * (p.ndim - 1))
    return jnp.where(okb, new, p), jnp.where(okb, mu_n, mu), jnp.where(okb, nu_n, nu)


@functools.lru_cache(maxsize=16)
def _make_train_step(sae_cfg: core.SAEConfig, b1: float, b2: float, per_seed_data: bool, mesh=None,
                     seeds_per_pass: int = 1):
    cap = jnp.int32(2**30)

    def update(params, opt_state, since, count, bad, step, x, sched):
        """All seeds at once: params / since / count / bad carry the seed axis S first."""
        dead = since >= sae_cfg.dead_tokens  # [S, n]
        x_axis = 0 if x.ndim == 3 else None
        if sae_cfg.architecture == "topk":
            # seeds_per_pass seeds vmapped per pass, the passes one after another (lax.map); gradients are
            # written out by hand
            def grads(use_aux):
                fn = lambda pp, xx, dd: core.topk_loss_and_grads(sae_cfg, pp, xx, dd, use_aux)
                if dead.shape[0] == 1:  # one seed: no loop (its outputs would be copied into stacked buffers)
                    one = fn(jax.tree.map(lambda a: a[0], params), x if x_axis is None else x[0], dead[0])
                    return jax.tree.map(lambda a: a[None], one)
                if seeds_per_pass >= dead.shape[0]:
                    return jax.vmap(fn, in_axes=(0, x_axis, 0))(params, x, dead)
                chunk = None if seeds_per_pass == 1 else seeds_per_pass
                if x_axis is None:
                    return jax.lax.map(lambda a: fn(a[0], x, a[1]), (params, dead), batch_size=chunk)
                return jax.lax.map(lambda a: fn(*a), (params, x, dead), batch_size=chunk)

            # AuxK costs a second top-k and a k_aux-wide sparse pass: only when some latent of some seed is
            # dead. Only the gradients are under the cond: with the Adam update inside too, XLA copied the
            # whole state out of the cond's result every step
            loss, aux, g = jax.lax.cond(dead.any(), lambda: grads(True), lambda: grads(False))
        else:
            def loss_fn(p):
                loss, aux = jax.vmap(lambda pp, xx, dd: core.train_loss(sae_cfg, pp, xx, dd, False),
                                     in_axes=(0, x_axis, 0))(p, x, dead)
                return loss.sum(), (loss, aux)

            (_, (loss, aux)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        ok = jnp.isfinite(loss) & (bad < 0)  # [S]; a non-finite loss freezes that seed at its last good state
        lr = _lr_at(step, sched)
        t = (step + 1).astype(jnp.float32)
        new, mu, nu = {}, {}, {}
        for name in params:
            unit = name == "W_dec" and sae_cfg.unit_norm_decoder
            new[name], mu[name], nu[name] = _adam_apply(params[name], g[name], opt_state["mu"][name],
                                                        opt_state["nu"][name], ok, lr, b1, b2, t, unit)
        if sae_cfg.architecture == "batchtopk":
            # inference threshold: running mean of the smallest active pre-activation per batch
            m = sae_cfg.batchtopk_threshold_momentum
            old = params["threshold"][:, 0]
            est = jnp.where(jnp.isfinite(aux["min_active"]), aux["min_active"], old)
            thr0 = jnp.where(step == 0, est, old)
            thr = jnp.broadcast_to((m * thr0 + (1 - m) * est)[:, None], params["threshold"].shape)
            new["threshold"] = jnp.where(ok[:, None], thr, params["threshold"])
        elif sae_cfg.architecture == "jumprelu":
            new["threshold"] = jnp.maximum(new["threshold"], 1e-6)
        fc = aux["fire_count"]
        okc = ok[:, None]
        since = jnp.where(okc, jnp.where(fc > 0, 0, jnp.minimum(since + x.shape[-2], cap)), since)
        count = jnp.where(okc, count + fc, count)
        bad = jnp.where((bad < 0) & ~jnp.isfinite(loss), step, bad)
        fvu = jax.vmap(core.fvu, in_axes=(x_axis, 0))(x, aux["x_hat"])
        metrics = {"loss": loss, "mse": aux["mse"], "fvu": fvu, "l0": aux["l0"],
                   "aux_loss": aux.get("aux_loss", jnp.zeros_like(loss)),
                   "dead_frac": (since >= sae_cfg.dead_tokens).mean(-1)}
        return new, {"mu": mu, "nu": nu}, since, count, bad, metrics

    def step_fn(state, batch, sched, scale):
        batch = batch * scale  # the normalisation, once for all seeds
        params, opt_state, since, count, bad, metrics = update(
            state["params"], state["opt_state"], state["since_fired"], state["fire_count"], state["bad_step"],
            state["step"], batch, sched)
        return {"params": params, "opt_state": opt_state, "since_fired": since, "fire_count": count,
                "bad_step": bad, "step": state["step"] + 1}, metrics

    if mesh is None:
        return jax.jit(step_fn, donate_argnums=0)
    batch_sh = NamedSharding(mesh, P("seed", "data") if per_seed_data else P("data"))
    metric_sh = NamedSharding(mesh, P("seed"))
    rep = NamedSharding(mesh, P())
    compiled = {}

    def sharded_step(st, b, sched, scale):
        if "f" not in compiled:  # shardings follow the state's structure: build the jit once
            sh = jax.tree.map(lambda a: state_sharding(mesh, a), st)
            compiled["f"] = jax.jit(step_fn, donate_argnums=0, in_shardings=(sh, batch_sh, rep, rep),
                                    out_shardings=(sh, metric_sh))
        return compiled["f"](st, b, sched, scale)

    return sharded_step


def state_sharding(mesh, a):
    """Per-seed leaves split over the mesh's 'seed' axis; scalars replicated."""
    return NamedSharding(mesh, P("seed") if getattr(a, "ndim", 0) >= 1 else P())


def _config_dict(sae_cfg, tcfg):
    t = {k: v for k, v in dataclasses.asdict(tcfg).items() if k not in _RESUME_IGNORED}
    return {"sae": sae_cfg.to_dict(), "train": t}


def _input_scale(store, tcfg, d_in) -> float:
    if not tcfg.normalize:
        return 1.0
    x = store.sample(min(len(store), 16384), seed=tcfg.data_seed + 7919)
    return float(math.sqrt(d_in) / max(float(np.linalg.norm(x, axis=1).mean()), 1e-30))


def _batch(store, tcfg, step):
    """The raw batch of a step (the jitted step scales it)."""
    if tcfg.per_seed_data:
        b = np.stack([store.batch(tcfg.batch_size, tcfg.data_seed + s, step) for s in range(tcfg.n_seeds)])
    else:
        b = store.batch(tcfg.batch_size, tcfg.data_seed, step)
    if not np.isfinite(b).all():
        raise InputError(f"non-finite activations in the batch of step {step}; activations must be finite")
    return b


class _Checkpointer:
    def __init__(self, workdir):
        import orbax.checkpoint as ocp  # noqa: PLC0415  (slow import, only when checkpointing)
        self.ocp = ocp
        self.mgr = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False))

    def latest(self):
        return self.mgr.latest_step()

    def save(self, step, state, extra):
        self.mgr.save(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardSave(state), extra=self.ocp.args.JsonSave(extra)))
        self.mgr.wait_until_finished()

    def restore(self, step, like):
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like)
        r = self.mgr.restore(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardRestore(abstract), extra=self.ocp.args.JsonRestore()))
        return r["state"], r["extra"]


def _append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _to_host(metrics):
    return {k: np.asarray(v).astype(float).tolist() for k, v in metrics.items()}


def train(sae_cfg: core.SAEConfig, tcfg: TrainConfig, source, workdir: str | None = None, mesh=None,
          stop_at: int | None = None) -> TrainResult:
    """Train tcfg.n_seeds SAEs on `source` (ActivationStore / ArrayStore / array [N, d_in]).

    workdir (optional) receives config.json, metrics.jsonl and orbax checkpoints every
    tcfg.checkpoint_every steps; a run in a workdir with checkpoints resumes from the last one
    (bit-identical on CPU). stop_at ends the run after that step as if the process were killed
    (no final checkpoint). A non-finite loss freezes that seed in the step itself; the next host sync
    (a log or checkpoint step, or the end) raises errors.NonFiniteError naming the first bad step and
    seed, before any checkpoint of the frozen state is written: the last checkpoint is the last good one.
    """
    store = source if hasattr(source, "batch") else ArrayStore(source)
    if store.d_in != sae_cfg.d_in:
        raise InputError(f"activations have d_in={store.d_in}; SAEConfig.d_in={sae_cfg.d_in}")
    if tcfg.batch_size > len(store):
        raise InputError(f"batch_size={tcfg.batch_size} exceeds the {len(store)} stored tokens")
    if mesh is not None:
        ns, nd = mesh.shape["seed"], mesh.shape["data"]
        if tcfg.n_seeds % ns or tcfg.batch_size % nd:
            raise InputError(f"mesh (seed={ns}, data={nd}) must divide n_seeds={tcfg.n_seeds} and "
                             f"batch_size={tcfg.batch_size}")

    ckpt = None
    start = 0
    metrics_path = None
    cfg_dict = _config_dict(sae_cfg, tcfg)
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        cfg_path = os.path.join(workdir, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                old = json.load(f)
            if old != json.loads(json.dumps(cfg_dict)):
                diff = sorted(f"{g}.{k}" for g in cfg_dict for k in set(cfg_dict[g]) | set(old.get(g, {}))
                              if old.get(g, {}).get(k) != cfg_dict[g].get(k))
                raise InputError(f"workdir {workdir!r} holds a run with another config (differs in {diff}); "
                                 "use a new workdir")
        else:
            _atomic_write_json(cfg_path, cfg_dict)
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        if tcfg.checkpoint_every:
            ckpt = _Checkpointer(workdir)

    scale = _input_scale(store, tcfg, sae_cfg.d_in)
    sample = store.sample(tcfg.geometric_median_tokens, seed=tcfg.data_seed + 104729) * np.float32(scale)
    state = init_state(sae_cfg, tcfg, sample)
    if mesh is not None:
        state = jax.device_put(state, jax.tree.map(lambda a: state_sharding(mesh, a), state))
    if ckpt is not None and ckpt.latest() is not None:
        state, extra = ckpt.restore(ckpt.latest(), state)
        start = int(extra["step"])
        scale = float(extra["scale"])
        if metrics_path and os.path.exists(metrics_path):  # drop log lines written after that checkpoint
            with open(metrics_path) as f:
                rows = [r for r in f if json.loads(r)["step"] <= start]
            tmp = metrics_path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(rows)
            os.replace(tmp, metrics_path)

    step_fn = make_train_step(sae_cfg, tcfg, mesh)
    logged = []
    bar = None
    if tcfg.progress:
        from tqdm.auto import tqdm  # noqa: PLC0415
        bar = tqdm(total=tcfg.n_steps, initial=start, desc=f"SAE x{tcfg.n_seeds}", unit="step")
    end = tcfg.n_steps if stop_at is None else min(tcfg.n_steps, int(stop_at))
    last_metrics = None

    def check_bad(at_step):
        bad = np.asarray(state["bad_step"])
        if (bad >= 0).any():
            first = int(bad[bad >= 0].min())
            seeds = [int(i) for i in np.flatnonzero(bad == first)]
            if bar is not None:
                bar.close()
            last = ckpt.latest() if ckpt is not None else None
            raise NonFiniteError(
                what="SAE loss", stage="sae", step=first,
                detail=(f"seed {', '.join(map(str, seeds))}; last good checkpoint: "
                        f"{'none' if last is None else f'step {last}'}; stopped at step {at_step}"))

    for step in range(start, end):
        batch = _batch(store, tcfg, step)
        state, last_metrics = step_fn(state, batch, scale)
        done = step + 1
        log_now = tcfg.log_every and (done % tcfg.log_every == 0 or done == tcfg.n_steps)
        save_now = ckpt is not None and (done % tcfg.checkpoint_every == 0 or done == tcfg.n_steps)
        if log_now or save_now:
            check_bad(done)
        if log_now:
            row = dict(step=done, tokens=done * tcfg.batch_size, **_to_host(last_metrics))
            logged.append(row)
            if metrics_path:
                _append_jsonl(metrics_path, row)
            if bar is not None:
                bar.set_postfix(fvu=f"{np.mean(row['fvu']):.3f}", l0=f"{np.mean(row['l0']):.1f}",
                                dead=f"{np.mean(row['dead_frac']):.3f}")
        if save_now:
            ckpt.save(done, state, {"step": done, "scale": scale, "data_seed": tcfg.data_seed,
                                    "tokens": done * tcfg.batch_size})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    check_bad(end)

    params_n = jax.device_get(state["params"])
    params = core.fold_scale(params_n, scale)
    evx = store.sample(tcfg.eval_tokens, seed=tcfg.data_seed + 31337)
    final = evaluate_seeds(sae_cfg, params, evx)
    fc = np.asarray(state["fire_count"])
    final["train_firing_rate"] = fc / max(end * tcfg.batch_size, 1)
    final["train_dead_frac"] = (np.asarray(state["since_fired"]) >= sae_cfg.dead_tokens).mean(-1)
    return TrainResult(params=jax.tree.map(np.asarray, params), params_normalized=jax.tree.map(np.asarray, params_n),
                       scale=scale, metrics=logged, final=final)


def capture_and_train(model_cfg, model_params, token_batches, layer: int, sae_cfg: core.SAEConfig,
                      tcfg: TrainConfig, masks=None, attention_masks=None, workdir: str | None = None,
                      mesh=None, **capture_kw) -> TrainResult:
    """One pass for small runs: capture resid_post in memory, then train (no store on disk)."""
    from prunesae_jax.sae.store import capture_activations  # noqa: PLC0415
    acts = capture_activations(model_cfg, model_params, token_batches, layer, None, masks=masks,
                               attention_masks=attention_masks, **capture_kw)
    return train(sae_cfg, tcfg, acts, workdir=workdir, mesh=mesh)


def stack_seeds(params_list: list[dict]) -> dict:
    """[params without seed axis] -> params with seed axis."""
    return jax.tree.map(lambda *a: np.stack(a), *params_list)


def unstack_seed(params: dict, i: int) -> dict:
    return jax.tree.map(lambda a: np.asarray(a[i]), params)


def evaluate_seeds(sae_cfg: core.SAEConfig, params: dict, x) -> dict[str, Any]:
    """core.evaluate for every seed of params [S, ...] on the same x [B, d_in]."""
    x = jnp.asarray(x, jnp.float32)
    if x.shape[-1] != sae_cfg.d_in:
        raise InputError(f"activations have d_in={x.shape[-1]}; this SAE expects d_in={sae_cfg.d_in}")
    # One seed at a time: all seeds at once hold S dense [B, n_latents] pre-activation, top-k and
    # code arrays (3 x 16384 x 5120 float32 = 1 GiB each in the default study, its peak memory).
    S = jax.tree.leaves(params)[0].shape[0]
    outs = [_evaluate_fn(sae_cfg)(jax.tree.map(lambda a: a[s:s + 1], params), x) for s in range(S)]
    return {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in outs[0]}


@functools.lru_cache(maxsize=16)
def _evaluate_fn(sae_cfg):
    return jax.jit(jax.vmap(lambda p, xx: core.evaluate(sae_cfg, p, xx), in_axes=(0, None)))
