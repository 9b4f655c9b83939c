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
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from prunesae_jax import io as pio
from prunesae_jax import sharding
from prunesae_jax.errors import InputError, NonFiniteError
from prunesae_jax.sae import arch, common, core, kernels
from prunesae_jax.sae.config import SAEConfig, TrainConfig
from prunesae_jax.sae.store import ArrayStore

# fields that change the numbers: a checkpoint from a run that differs in these cannot be resumed
_RESUME_IGNORED = ('progress', 'log_every', 'checkpoint_every', 'eval_tokens', 'seeds_per_pass')


@dataclasses.dataclass
class TrainResult:
    params: dict  # seed axis first, for RAW activations (normalisation folded back)
    params_normalized: dict  # as trained, for activations * scale
    scale: float
    metrics: list  # logged dicts (per-seed lists)
    # core.evaluate per seed on a sample of the data (raw units), plus per seed [S]: train_firing_rate
    # [S, n], train_dead_frac, aux_steps (steps on which AuxK ran), dead_tokens (resolved) and init_cos
    # (mean over latents of the cosine between the final and the initial decoder row)
    final: dict
    # step -> W_dec [S, n, d_in] as trained (normalised units; cosines are scale invariant), at
    # TrainConfig.snapshot_steps reached by this run
    snapshots: dict = dataclasses.field(default_factory=dict)


AUTO_DEAD_TOKENS_CAP = 10_000_000  # OpenAI's / sparsify's dead window, for runs long enough to reach it


def resolve_dead_tokens(dead_tokens: int | None, total_tokens: int) -> int:
    """SAEConfig.dead_tokens for a run that trains on total_tokens tokens (n_steps * batch_size).

    None (auto) -> min(10_000_000, max(1, total_tokens // 10)): a tenth of the run, so a latent that
    stopped firing is caught (and AuxK revives it) while most of the run is left; 10M once runs are long
    enough. An explicit value larger than total_tokens is refused: no latent could ever count as dead, and
    AuxK would silently never run.
    """
    total = int(total_tokens)
    if total < 1:
        raise InputError(f'total_tokens={total_tokens}; accepted: a positive int')
    if dead_tokens is None:
        return min(AUTO_DEAD_TOKENS_CAP, max(1, total // 10))
    if isinstance(dead_tokens, bool) or int(dead_tokens) != dead_tokens or int(dead_tokens) < 1:
        raise InputError(f'dead_tokens={dead_tokens!r}; accepted: a positive int, or None for auto')
    if int(dead_tokens) > total:
        raise InputError(
            f'dead_tokens={int(dead_tokens)} can never be reached: the run trains on {total} '
            f'tokens; accepted: <= {total}, or None for auto'
        )
    return int(dead_tokens)


def batchtopk_threshold_start(sae_cfg: SAEConfig, n_steps: int) -> int:
    """The step after which the BatchTopK inference threshold is updated: min(start_step, n_steps // 2).

    dictionary_learning (BatchTopKTrainer) updates on 0-based steps t > threshold_start_step (1000) with
    threshold_beta 0.999, the first update setting the threshold to the batch's minimum directly. A run
    shorter than that would end with no threshold, so the start is capped at half the run: the threshold
    then averages the second half's estimates (runs of 1 or 2 steps still end unset: threshold -1, every
    positive pre-activation passes).
    """
    return int(min(sae_cfg.batchtopk_threshold_start_step, n_steps // 2))


def initial_decoder(sae_cfg: SAEConfig, seed: int, n_seeds: int) -> np.ndarray:
    """The untrained unit-norm decoder rows [S, n, d_in] of seeds seed .. seed + n_seeds - 1, exactly as
    init_state starts them (TrainConfig.seed = seed): the init-only null of decoder similarity."""
    return np.asarray(core.init_decoder(_seed_keys(seed, n_seeds), sae_cfg))


def _seed_keys(seed: int, n_seeds: int):
    return jnp.stack([jax.random.key_data(jax.random.key(seed + s)) for s in range(n_seeds)])


def schedule_args(sae_cfg: SAEConfig, tcfg: TrainConfig) -> np.ndarray:
    """[lr, lr at step 0, warm-up steps, last warm-up-or-flat step, decay steps] for _lr_at: warm-up
    from lr * 1e-3, flat, then linear decay to 0 over the last decay_frac of the steps.

    The schedule travels as a (tiny) array argument of the jitted step, so runs that differ only in
    n_steps / lr / warm-up share one compiled step.
    """
    lr = tcfg.lr if tcfg.lr is not None else core.lr_default(sae_cfg.n_latents)
    warm = max(min(tcfg.warmup_steps, tcfg.n_steps - 1), 0)
    decay = int(tcfg.n_steps * tcfg.decay_frac)
    flat = max(tcfg.n_steps - warm - decay, 0)
    return np.asarray([lr, lr * 1e-3 if warm else lr, max(warm, 1), warm, warm + flat, max(decay, 1)], np.float32)


def _lr_at(step, sched):
    """The learning rate of `step` from schedule_args, inside the jitted step (optax's join of linear
    schedules, written out: tests/sae/reference.py holds the optax reference)."""
    lr, lr0, warm_len, warm, flat_end, decay_len = (sched[i] for i in range(6))
    t = step.astype(jnp.float32)
    up = (lr0 - lr) * (1 - jnp.clip(t, 0, warm_len) / warm_len) + lr
    down = lr * (1 - jnp.clip(t - flat_end, 0, decay_len) / decay_len)
    return jnp.where(t < warm, up, jnp.where(t < flat_end, lr, down))


def init_state(sae_cfg: SAEConfig, tcfg: TrainConfig, sample=None) -> dict:
    """The full train state pytree (seed axis S first on every per-seed leaf)."""
    params = core.init(_seed_keys(tcfg.seed, tcfg.n_seeds), sae_cfg, sample)
    s, n = tcfg.n_seeds, sae_cfg.n_latents
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return {
        'params': params,
        'opt_state': {'mu': zeros(), 'nu': zeros()},  # Adam moments; the step count is state["step"]
        'since_fired': jnp.zeros((s, n), jnp.int32),  # tokens since each latent last fired
        'fire_count': jnp.zeros((s, n), jnp.int32),  # tokens that fired it, whole run
        'bad_step': jnp.full((s,), -1, jnp.int32),  # first step whose loss was not finite
        'aux_steps': jnp.zeros((s,), jnp.int32),  # steps on which AuxK ran (some latent was dead)
        'step': jnp.zeros((), jnp.int32),
    }


def state_bytes(sae_cfg: SAEConfig, tcfg: TrainConfig) -> int:
    """Bytes of the S-seed train state (params, Adam moments, counters), exact for every
    architecture: float32 TopK holds 4 S [3 (2 n d + n + d) + 2 n + 2] + 4 bytes (BUILD.md)."""
    shapes = jax.eval_shape(lambda: init_state(sae_cfg, tcfg))
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def device_memory_bytes(device=None) -> int | None:
    """What one device can hold: the accelerator's bytes_limit, or the host's MemAvailable on CPU;
    None where neither is known."""
    device = device or jax.local_devices()[0]
    stats = getattr(device, 'memory_stats', lambda: None)()
    if stats and stats.get('bytes_limit'):
        return int(stats['bytes_limit'])
    try:
        with open('/proc/meminfo', encoding='ascii') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(sae_cfg: SAEConfig, tcfg: TrainConfig, mesh=None, available: int | None = None) -> None:
    """Refuses, in one line naming the numbers, a run whose train state and one batch alone exceed
    one device's memory (the state is split over the mesh's seed axis). The step's transient
    buffers come on top (about 8 n d + 3 B n floats per seed on CPU, BUILD.md), so passing this
    check is necessary, not sufficient."""
    available = device_memory_bytes() if available is None else available
    if available is None:
        return
    per_seed_data = tcfg.n_seeds > 1 and tcfg.per_seed_data
    batch = tcfg.batch_size * sae_cfg.d_in * 4 * (tcfg.n_seeds if per_seed_data else 1)
    need = state_bytes(sae_cfg, tcfg) // (mesh.shape['seed'] if mesh is not None else 1) + batch
    if need > available:
        raise InputError(
            f'n_seeds={tcfg.n_seeds} SAEs of {sae_cfg.n_latents} latents x d_in={sae_cfg.d_in} need '
            f'{need / 2**30:.2f} GiB per device for the train state and a batch of {tcfg.batch_size}, '
            f'{available / 2**30:.2f} GiB available; accepted: fewer seeds per run (or a mesh over more '
            'devices), fewer latents or a smaller batch'
        )


def make_train_step(sae_cfg: SAEConfig, tcfg: TrainConfig, mesh=None):
    """step(state, batch) -> (state, metrics); batch [B, d_in] or [S, B, d_in] (per_seed_data).

    The state is donated. Every per-seed metric has shape [S]. The compiled step depends on the SAE
    config, Adam's betas, per_seed_data and the mesh only: the schedule, the resolved dead window
    (resolve_dead_tokens) and the BatchTopK threshold start (batchtopk_threshold_start) are arguments,
    so every train() call with those reuses it.
    """
    key_cfg = dataclasses.replace(sae_cfg, dead_tokens=None, batchtopk_threshold_start_step=0)
    f = _make_train_step(
        key_cfg, float(tcfg.adam_b1), float(tcfg.adam_b2), bool(tcfg.per_seed_data), mesh, _seeds_per_pass(tcfg)
    )
    sched = schedule_args(sae_cfg, tcfg)
    ctl = step_controls(sae_cfg, tcfg)
    if mesh is None:
        return lambda state, batch, scale=1.0: f(state, batch, sched, np.float32(scale), ctl)
    # On a mesh the small arguments are placed once (replicated): under jax.distributed a jit
    # refuses host arrays for shardings that span processes.
    rep = NamedSharding(mesh, P())
    sched, ctl = jax.device_put(sched, rep), jax.device_put(ctl, rep)
    placed = functools.lru_cache(maxsize=1)(lambda scale: jax.device_put(np.float32(scale), rep))
    return lambda state, batch, scale=1.0: f(state, batch, sched, placed(float(scale)), ctl)


_SINCE_CAP = 2**30  # since_fired saturates here (int32)


def step_controls(sae_cfg: SAEConfig, tcfg: TrainConfig) -> np.ndarray:
    """int32 [dead window in tokens, BatchTopK threshold start step] for the jitted step."""
    dead = resolve_dead_tokens(sae_cfg.dead_tokens, tcfg.n_steps * tcfg.batch_size)
    return np.asarray([min(dead, _SINCE_CAP), batchtopk_threshold_start(sae_cfg, tcfg.n_steps)], np.int32)


def _seeds_per_pass(tcfg: TrainConfig) -> int:
    """TrainConfig.seeds_per_pass with 0 resolved for the default backend."""
    if tcfg.seeds_per_pass:
        return min(tcfg.seeds_per_pass, tcfg.n_seeds)
    return 1 if jax.default_backend() == 'cpu' else tcfg.n_seeds


@functools.lru_cache(maxsize=16)
def _make_train_step(sae_cfg: SAEConfig, b1: float, b2: float, per_seed_data: bool, mesh=None, seeds_per_pass: int = 1):
    cap = jnp.int32(_SINCE_CAP)
    spec = arch.get(sae_cfg.architecture)

    def update(params, opt_state, since, count, bad, aux_steps, step, x, sched, ctl):
        """All seeds at once: params / since / count / bad / aux_steps carry the seed axis S first."""
        dead_tokens, thr_start = ctl[0], ctl[1]
        dead = since >= dead_tokens  # [S, n]
        x_axis = 0 if x.ndim == 3 else None
        lr = _lr_at(step, sched)
        t = (step + 1).astype(jnp.float32)
        seed_loop = spec.loss_and_grads is not None and seeds_per_pass == 1 and mesh is None and dead.shape[0] > 1
        if seed_loop:  # several seeds on CPU: each seed's gradients and Adam in one loop iteration, in place
            loss, aux, new, opt = kernels.seed_loop_update(
                spec, sae_cfg, params, opt_state, x, dead, bad, lr, t, b1, b2, step, thr_start
            )
        elif spec.loss_and_grads is not None:
            # seeds_per_pass seeds vmapped per pass, the passes one after another (lax.map); gradients are
            # written out by hand
            def grads(use_aux):
                fn = lambda pp, xx, dd: spec.loss_and_grads(sae_cfg, pp, xx, dd, use_aux)
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
            if spec.uses_auxk and sae_cfg.aux_coeff:
                loss, aux, g = jax.lax.cond(dead.any(), lambda: grads(True), lambda: grads(False))
            else:  # AuxK weighs nothing: never pay for it
                loss, aux, g = grads(False)
        else:

            def loss_fn(p):
                loss, aux = jax.vmap(lambda pp, xx, dd: spec.loss(sae_cfg, pp, xx, dd, False), in_axes=(0, x_axis, 0))(
                    p, x, dead
                )
                return loss.sum(), (loss, aux)

            (_, (loss, aux)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        ok = jnp.isfinite(loss) & (bad < 0)  # [S]; a non-finite loss freezes that seed at its last good state
        if not seed_loop:
            new, opt = {}, {'mu': {}, 'nu': {}}
            for name in params:
                unit = name == 'W_dec' and sae_cfg.unit_norm_decoder
                new[name], opt['mu'][name], opt['nu'][name] = kernels.adam_apply(
                    params[name], g[name], opt_state['mu'][name], opt_state['nu'][name], ok, lr, b1, b2, t, unit
                )
            new = spec.after_update(sae_cfg, params, new, aux, ok, step, thr_start)  # thresholds
        fc = aux['fire_count']
        okc = ok[:, None]
        since = jnp.where(okc, jnp.where(fc > 0, 0, jnp.minimum(since + x.shape[-2], cap)), since)
        count = jnp.where(okc, count + fc, count)
        if spec.uses_auxk and sae_cfg.aux_coeff:
            aux_steps = jnp.where(ok & dead.any(-1), aux_steps + 1, aux_steps)
        bad = jnp.where((bad < 0) & ~jnp.isfinite(loss), step, bad)
        fvu = jax.vmap(common.fvu, in_axes=(x_axis, 0))(x, aux['x_hat'])
        metrics = {
            'loss': loss,
            'mse': aux['mse'],
            'fvu': fvu,
            'l0': aux['l0'],
            'aux_loss': aux.get('aux_loss', jnp.zeros_like(loss)),
            'dead_frac': (since >= dead_tokens).mean(-1),
        }
        return new, opt, since, count, bad, aux_steps, metrics

    def step_fn(state, batch, sched, scale, ctl):
        batch = batch * scale  # the normalisation, once for all seeds
        params, opt_state, since, count, bad, aux_steps, metrics = update(
            state['params'],
            state['opt_state'],
            state['since_fired'],
            state['fire_count'],
            state['bad_step'],
            state['aux_steps'],
            state['step'],
            batch,
            sched,
            ctl,
        )
        return {
            'params': params,
            'opt_state': opt_state,
            'since_fired': since,
            'fire_count': count,
            'bad_step': bad,
            'aux_steps': aux_steps,
            'step': state['step'] + 1,
        }, metrics

    if mesh is None:
        return jax.jit(step_fn, donate_argnums=0)
    batch_sh = batch_sharding(mesh, per_seed_data)
    metric_sh = NamedSharding(mesh, P('seed'))
    rep = NamedSharding(mesh, P())
    compiled = {}

    def sharded_step(st, b, sched, scale, ctl):
        if 'f' not in compiled:  # shardings follow the state's structure: build the jit once
            sh = jax.tree.map(lambda a: state_sharding(mesh, a), st)
            compiled['f'] = jax.jit(
                step_fn, donate_argnums=0, in_shardings=(sh, batch_sh, rep, rep, rep), out_shardings=(sh, metric_sh)
            )
        return compiled['f'](st, b, sched, scale, ctl)

    return sharded_step


def state_sharding(mesh, a):
    """Per-seed leaves split over the mesh's 'seed' axis; scalars replicated."""
    return NamedSharding(mesh, P('seed') if getattr(a, 'ndim', 0) >= 1 else P())


def _config_dict(sae_cfg, tcfg):
    t = {k: v for k, v in dataclasses.asdict(tcfg).items() if k not in _RESUME_IGNORED}
    return {'sae': sae_cfg.to_dict(), 'train': t}


def _input_scale(store, tcfg, d_in) -> float:
    if not tcfg.normalize:
        return 1.0
    x = store.sample(min(len(store), 16384), seed=tcfg.data_seed + 7919)
    return float(math.sqrt(d_in) / max(float(np.linalg.norm(x, axis=1).mean()), 1e-30))


def batch_sharding(mesh, per_seed_data: bool) -> NamedSharding:
    """A step's batch on the mesh: [B, d] split over 'data', or [S, B, d] (per_seed_data) over
    'seed' x 'data'."""
    return NamedSharding(mesh, P('seed', 'data') if per_seed_data else P('data'))


def _batch(store, tcfg, step, sh=None):
    """The raw batch of a step (the jitted step scales it): numpy, or with the batch's sharding sh a
    global array for which this process reads only the rows its devices hold."""

    def read(box=None):
        # part= only for a share: a source without it (batch(batch_size, seed, step)) trains unsharded
        get = lambda seed, part: store.batch(tcfg.batch_size, seed, step, **({} if part is None else {'part': part}))
        if tcfg.per_seed_data:
            seeds, part = (range(tcfg.n_seeds), None) if box is None else (range(tcfg.n_seeds)[box[0]], box[1])
            b = np.stack([get(tcfg.data_seed + s, part) for s in seeds])
        else:
            b = get(tcfg.data_seed, None if box is None else box[0])
        if not np.isfinite(b).all():
            raise InputError(f'non-finite activations in the batch of step {step}; activations must be finite')
        return b

    if sh is None:
        return read()
    shape = ((tcfg.n_seeds,) if tcfg.per_seed_data else ()) + (tcfg.batch_size, store.d_in)
    return sharding.global_array(shape, sh, read)


def _sha256_file(path: str) -> list:
    """[size, sha256] of a file."""
    import hashlib  # noqa: PLC0415

    h, size = hashlib.sha256(), 0
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return [size, h.hexdigest()]


def _file_sums(root: str) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = _sha256_file(p)
    return dict(sorted(out.items()))


def _file_sums_of(path: str) -> list[list]:
    """[[size, sha256]] of one file, or [] when it does not exist."""
    return [_sha256_file(path)] if os.path.exists(path) else []


def _first_line(e: BaseException) -> str:
    return f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:200]}'


class _Checkpointer:
    """Orbax checkpoints in workdir/checkpoints/<step>, with the size and sha256 of each file in
    workdir/checkpoint_sums/<step>.json: a damaged checkpoint is found before it is restored (and one
    orbax cannot read is caught when it is), dropped, and training resumes from the previous good one,
    or from the start (see restore_last_good)."""

    def __init__(self, workdir):
        import orbax.checkpoint as ocp  # noqa: PLC0415  (slow import, only when checkpointing)

        self.ocp = ocp
        self.dir = os.path.abspath(os.path.join(workdir, 'checkpoints'))
        self.sums = os.path.abspath(os.path.join(workdir, 'checkpoint_sums'))
        try:
            self.mgr = self._manager()
            self.mgr.all_steps()
        except Exception as e:  # noqa: BLE001  (a damaged checkpoint folder: start it afresh)
            logging.warning('SAE checkpoints in %s cannot be read (%s); removing them', self.dir, _first_line(e))
            import shutil  # noqa: PLC0415

            if sharding.is_main():
                shutil.rmtree(self.dir, ignore_errors=True)
                shutil.rmtree(self.sums, ignore_errors=True)
            sharding.barrier('checkpoints removed')
            self.mgr = self._manager()

    def _manager(self):
        return self.ocp.CheckpointManager(
            self.dir, options=self.ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
        )

    def latest(self):
        return self.mgr.latest_step()

    def _sums_path(self, step) -> str:
        return os.path.join(self.sums, f'{int(step)}.json')

    def save(self, step, state, extra, files=()):
        """Saves checkpoint `step`; `files`: other files a resume from it reads (the decoder snapshots
        up to it), summed with it."""
        self.mgr.save(
            step,
            args=self.ocp.args.Composite(state=self.ocp.args.StandardSave(state), extra=self.ocp.args.JsonSave(extra)),
        )
        self.mgr.wait_until_finished()
        sharding.barrier(f'checkpoint {step} saved')  # every process's part is on disk
        if not sharding.is_main():
            return
        pio.make_dirs(self.sums)
        sums = {'checkpoint': _file_sums(os.path.join(self.dir, str(int(step)))), 'files': {}}
        for path in files:  # relative to the workdir, which may move
            rel = os.path.relpath(os.path.abspath(path), os.path.dirname(self.dir))
            sums['files'].update({rel: v for v in _file_sums_of(path)})
        pio.atomic_write_text(self._sums_path(step), json.dumps(sums, indent=1, sort_keys=True))
        kept = {f'{int(t)}.json' for t in self.mgr.all_steps()}
        for name in os.listdir(self.sums):  # the sums of checkpoints orbax has rotated out
            if name.endswith('.json') and name not in kept:
                os.unlink(os.path.join(self.sums, name))

    def check(self, step) -> str | None:
        """Why checkpoint `step` is damaged, or None (also when it has no sums: then only restoring tells)."""
        try:
            with open(self._sums_path(step)) as f:
                want = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            return f'its sums file is unreadable ({_first_line(e)})'
        root = os.path.join(self.dir, str(int(step)))
        try:
            have = _file_sums(root)
            for rel in want.get('files', {}):
                have.update({rel: v for v in _file_sums_of(os.path.join(os.path.dirname(self.dir), rel))})
        except OSError as e:
            return f'it cannot be read ({_first_line(e)})'
        for name, (size, digest) in {**want.get('checkpoint', {}), **want.get('files', {})}.items():
            if name not in have:
                return f'{name} is missing'
            if have[name][0] != size:
                return f'{name} is corrupt (size {have[name][0]}, expected {size})'
            if have[name][1] != digest:
                return f'{name} is corrupt (sha256 differs)'
        return None

    def drop(self, step):
        import shutil  # noqa: PLC0415

        sharding.barrier(f'checkpoint {step} checked')  # every process has read it before it goes
        if sharding.is_main():
            shutil.rmtree(os.path.join(self.dir, str(int(step))), ignore_errors=True)
            if os.path.exists(self._sums_path(step)):
                os.unlink(self._sums_path(step))
        sharding.barrier(f'checkpoint {step} dropped')
        self.mgr.reload()

    def restore(self, step, like):
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like)
        r = self.mgr.restore(
            step,
            args=self.ocp.args.Composite(
                state=self.ocp.args.StandardRestore(abstract), extra=self.ocp.args.JsonRestore()
            ),
        )
        return r['state'], r['extra']

    def restore_last_good(self, like, snapshots_upto):
        """(state, extra, snapshots) of the newest checkpoint that is intact, restores and whose
        snapshots (snapshots_upto(step) -> dict, or raises) can be read; None when there is none.
        Every damaged checkpoint on the way is logged in one line and removed."""
        steps = sorted((int(t) for t in self.mgr.all_steps()), reverse=True)
        for i, step in enumerate(steps):
            problem = self.check(step)
            if problem is None:
                try:
                    state, extra = self.restore(step, like)
                    return state, extra, snapshots_upto(int(extra['step']))
                except Exception as e:  # noqa: BLE001  (orbax / tensorstore / numpy: many error types)
                    problem = _first_line(e)
            then = f'falling back to step {steps[i + 1]}' if i + 1 < len(steps) else 'restarting training'
            logging.warning('SAE checkpoint step %d in %s is unusable (%s); %s', step, self.dir, problem, then)
            self.drop(step)
        return None


def _append_jsonl(path, row):
    """Appends one JSON line and fsyncs it (an append, not an atomic replace: a kill can tear only the
    last line, which a resume drops)."""
    with pio.disk_full_errors(path), open(path, 'a') as f:
        f.write(json.dumps(row) + '\n')
        f.flush()
        os.fsync(f.fileno())


def _to_host(metrics):
    return {k: sharding.host_array(v).astype(float).tolist() for k, v in metrics.items()}


def train(
    sae_cfg: SAEConfig, tcfg: TrainConfig, source, workdir: str | None = None, mesh=None, stop_at: int | None = None
) -> TrainResult:
    """Train tcfg.n_seeds SAEs on `source` (ActivationStore / ArrayStore / array [N, d_in]).

    workdir (optional) receives config.json, metrics.jsonl, orbax checkpoints every
    tcfg.checkpoint_every steps and the decoder snapshots (snapshots/step_<N>.npy, tcfg.snapshot_fracs);
    a run in a workdir with checkpoints resumes from the last one (bit-identical on CPU) and reloads the
    snapshots taken up to it. stop_at ends the run after that step as if the process were killed
    (no final checkpoint). SAEConfig.dead_tokens is resolved against n_steps * batch_size
    (resolve_dead_tokens: None = auto; a window the run can never reach is refused). A non-finite loss
    freezes that seed in the step itself; the next host sync (a log, checkpoint or snapshot step, or the
    end) raises errors.NonFiniteError naming the first bad step and seed, before any checkpoint of the
    frozen state is written: the last checkpoint is the last good one.

    Under jax.distributed every process calls train() with the same arguments and a mesh from
    sharding.sae_mesh ('data' across the processes): each reads only its share of every batch
    (`source.batch(..., part=)`), each writes its own part of every Orbax checkpoint, process 0
    alone writes the workdir's other files, and every process returns the whole result.
    """
    dead_tokens = resolve_dead_tokens(sae_cfg.dead_tokens, tcfg.n_steps * tcfg.batch_size)
    store = source if hasattr(source, 'batch') else ArrayStore(source)
    if store.d_in != sae_cfg.d_in:
        raise InputError(f'activations have d_in={store.d_in}; SAEConfig.d_in={sae_cfg.d_in}')
    if tcfg.batch_size > len(store):
        raise InputError(f'batch_size={tcfg.batch_size} exceeds the {len(store)} stored tokens')
    if mesh is not None:
        ns, nd = mesh.shape['seed'], mesh.shape['data']
        if tcfg.n_seeds % ns or tcfg.batch_size % nd:
            raise InputError(
                f'mesh (seed={ns}, data={nd}) must divide n_seeds={tcfg.n_seeds} and batch_size={tcfg.batch_size}'
            )
    check_fits(sae_cfg, tcfg, mesh)
    # Under jax.distributed every process runs this with the same arguments: each reads its share of
    # every batch (sharding.sae_mesh), the state and metrics are global arrays, and only process 0
    # writes the workdir's files (orbax writes each process's part of a checkpoint).
    main = sharding.is_main()

    ckpt = None
    start = 0
    metrics_path = None
    snap_dir = None
    snap_steps = set(tcfg.snapshot_steps)
    snapshots = {}
    cfg_dict = _config_dict(sae_cfg, tcfg)
    if workdir is not None:
        pio.make_dirs(workdir)
        cfg_path = os.path.join(workdir, 'config.json')
        old = None
        if os.path.exists(cfg_path):
            try:
                with open(cfg_path) as f:
                    old = json.load(f)
                if not isinstance(old, dict):
                    raise ValueError(f'a JSON {type(old).__name__}, not an object')
            except (OSError, ValueError) as e:  # damaged: what the workdir holds cannot be trusted
                logging.warning('%s is unreadable (%s); restarting training in %s', cfg_path, _first_line(e), workdir)
                import shutil  # noqa: PLC0415

                for name in ('checkpoints', 'checkpoint_sums', 'snapshots') if main else ():
                    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
                for name in ('metrics.jsonl', 'config.json') if main else ():
                    if os.path.exists(os.path.join(workdir, name)):
                        os.unlink(os.path.join(workdir, name))
                old = None
        if old is not None:
            if old != json.loads(json.dumps(cfg_dict)):
                diff = sorted(
                    f'{g}.{k}'
                    for g in cfg_dict
                    for k in set(cfg_dict[g]) | set(old.get(g, {}))
                    if old.get(g, {}).get(k) != cfg_dict[g].get(k)
                )
                raise InputError(
                    f'workdir {workdir!r} holds a run with another config (differs in {diff}); use a new workdir'
                )
        elif main:
            pio.atomic_write_text(cfg_path, json.dumps(cfg_dict, indent=1, sort_keys=True))
        sharding.barrier('sae workdir checked')  # process 0 may have removed a damaged run's files
        metrics_path = os.path.join(workdir, 'metrics.jsonl')
        if snap_steps:
            snap_dir = os.path.join(workdir, 'snapshots')
            pio.make_dirs(snap_dir)
        if tcfg.checkpoint_every:
            ckpt = _Checkpointer(workdir)

    scale = _input_scale(store, tcfg, sae_cfg.d_in)
    sample = store.sample(tcfg.geometric_median_tokens, seed=tcfg.data_seed + 104729) * np.float32(scale)
    state = init_state(sae_cfg, tcfg, sample)
    if mesh is not None:
        if jax.process_count() > 1:  # the same host values on every process, placed as global arrays
            state = jax.tree.map(np.asarray, state)
        state = jax.device_put(state, jax.tree.map(lambda a: state_sharding(mesh, a), state))

    def snapshots_upto(step):  # the snapshots a resume from `step` keeps; later ones are taken again
        out = {}
        for t in sorted(snap_steps) if snap_dir is not None else ():
            if t <= step:
                try:
                    out[t] = np.load(_snapshot_path(snap_dir, t))
                except (OSError, ValueError, EOFError) as e:
                    raise ValueError(
                        f'its decoder snapshot {_snapshot_path(snap_dir, t)!r} is missing or corrupt ({_first_line(e)})'
                    ) from None
        return out

    if ckpt is not None:
        # The newest intact checkpoint (a damaged one falls back to the previous, or to step 0).
        restored = ckpt.restore_last_good(state, snapshots_upto)
        if restored is not None:
            state, extra, snapshots = restored
            start = int(extra['step'])
            scale = float(extra['scale'])
        if metrics_path and os.path.exists(metrics_path):  # drop log lines written after that checkpoint
            rows = []
            with open(metrics_path) as f:
                for r in f:
                    try:
                        if json.loads(r)['step'] <= start:
                            rows.append(r)
                    except (ValueError, KeyError, TypeError):  # a torn or garbled line
                        continue
            if main:
                pio.atomic_write_text(metrics_path, ''.join(rows))

    step_fn = make_train_step(sae_cfg, tcfg, mesh)
    logged = []
    bar = None
    if tcfg.progress and main:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=tcfg.n_steps, initial=start, desc=f'SAE x{tcfg.n_seeds}', unit='step')
    end = tcfg.n_steps if stop_at is None else min(tcfg.n_steps, int(stop_at))
    last_metrics = None

    def check_bad(at_step):
        bad = sharding.host_array(state['bad_step'])
        if (bad >= 0).any():
            first = int(bad[bad >= 0].min())
            seeds = [int(i) for i in np.flatnonzero(bad == first)]
            if bar is not None:
                bar.close()
            last = ckpt.latest() if ckpt is not None else None
            raise NonFiniteError(
                what='SAE loss',
                stage='sae',
                step=first,
                detail=(
                    f'seed {", ".join(map(str, seeds))}; last good checkpoint: '
                    f'{"none" if last is None else f"step {last}"}; stopped at step {at_step}'
                ),
            )

    batch_sh = None if mesh is None else batch_sharding(mesh, tcfg.per_seed_data)
    for step in range(start, end):
        batch = _batch(store, tcfg, step, batch_sh)
        state, last_metrics = step_fn(state, batch, scale)
        done = step + 1
        log_now = tcfg.log_every and (done % tcfg.log_every == 0 or done == tcfg.n_steps)
        save_now = ckpt is not None and (done % tcfg.checkpoint_every == 0 or done == tcfg.n_steps)
        snap_now = done in snap_steps
        if log_now or save_now or snap_now:
            check_bad(done)
        if snap_now:  # the only host copy of the params during the run
            snapshots[done] = sharding.host_array(state['params']['W_dec'])
            if snap_dir is not None and main:
                pio.atomic_write_npy(_snapshot_path(snap_dir, done), snapshots[done])
        if log_now:
            row = dict(step=done, tokens=done * tcfg.batch_size, **_to_host(last_metrics))
            logged.append(row)
            if metrics_path and main:
                _append_jsonl(metrics_path, row)
            if bar is not None:
                bar.set_postfix(
                    fvu=f'{np.mean(row["fvu"]):.3f}',
                    l0=f'{np.mean(row["l0"]):.1f}',
                    dead=f'{np.mean(row["dead_frac"]):.3f}',
                )
        if save_now:
            snaps = [_snapshot_path(snap_dir, t) for t in sorted(snap_steps) if t <= done] if snap_dir else []
            ckpt.save(
                done,
                state,
                {'step': done, 'scale': scale, 'data_seed': tcfg.data_seed, 'tokens': done * tcfg.batch_size},
                files=snaps,
            )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    check_bad(end)

    params_n = jax.tree.map(sharding.host_array, state['params'])
    params = core.fold_scale(params_n, scale)
    evx = store.sample(tcfg.eval_tokens, seed=tcfg.data_seed + 31337)
    final = evaluate_seeds(sae_cfg, params, evx)
    fc = sharding.host_array(state['fire_count'])
    final['train_firing_rate'] = fc / max(end * tcfg.batch_size, 1)
    final['train_dead_frac'] = (sharding.host_array(state['since_fired']) >= dead_tokens).mean(-1)
    final['aux_steps'] = sharding.host_array(state['aux_steps'])
    final['dead_tokens'] = np.full((tcfg.n_seeds,), dead_tokens, np.int64)
    final['init_cos'] = _init_cos(sae_cfg, tcfg, params_n['W_dec'])
    return TrainResult(
        params=jax.tree.map(np.asarray, params),
        params_normalized=jax.tree.map(np.asarray, params_n),
        scale=scale,
        metrics=logged,
        final=final,
        snapshots=dict(sorted(snapshots.items())),
    )


def _init_cos(sae_cfg, tcfg, w_dec) -> np.ndarray:
    """[S]: per seed, the mean over latents of cos(final decoder row, initial decoder row). The inits are
    recomputed one seed at a time (each is [n, d_in]: 170 MB at 18432 x 2304)."""
    out = []
    for s in range(tcfg.n_seeds):
        w0 = initial_decoder(sae_cfg, tcfg.seed + s, 1)[0]
        w = np.asarray(w_dec[s], np.float32)
        num = (w * w0).sum(-1)
        den = np.maximum(np.linalg.norm(w, axis=-1) * np.linalg.norm(w0, axis=-1), 1e-30)
        out.append(float((num / den).mean()))
    return np.asarray(out)


def _snapshot_path(snap_dir, step):
    return os.path.join(snap_dir, f'step_{int(step)}.npy')


def capture_and_train(
    model_cfg,
    model_params,
    token_batches,
    layer: int,
    sae_cfg: SAEConfig,
    tcfg: TrainConfig,
    masks=None,
    attention_masks=None,
    workdir: str | None = None,
    mesh=None,
    **capture_kw,
) -> TrainResult:
    """One pass for small runs: capture resid_post in memory, then train (no store on disk)."""
    from prunesae_jax.sae.store import capture_activations  # noqa: PLC0415

    acts = capture_activations(
        model_cfg, model_params, token_batches, layer, None, masks=masks, attention_masks=attention_masks, **capture_kw
    )
    return train(sae_cfg, tcfg, acts, workdir=workdir, mesh=mesh)


def stack_seeds(params_list: list[dict]) -> dict:
    """[params without seed axis] -> params with seed axis."""
    return jax.tree.map(lambda *a: np.stack(a), *params_list)


def unstack_seed(params: dict, i: int) -> dict:
    return jax.tree.map(lambda a: np.asarray(a[i]), params)


def evaluate_seeds(sae_cfg: SAEConfig, params: dict, x) -> dict[str, Any]:
    """core.evaluate for every seed of params [S, ...] on the same x [B, d_in]."""
    x = jnp.asarray(x, jnp.float32)
    if x.shape[-1] != sae_cfg.d_in:
        raise InputError(f'activations have d_in={x.shape[-1]}; this SAE expects d_in={sae_cfg.d_in}')
    # One seed at a time: all seeds at once hold S dense [B, n_latents] pre-activation, top-k and
    # code arrays (3 x 16384 x 5120 float32 = 1 GiB each in the default study, its peak memory).
    S = jax.tree.leaves(params)[0].shape[0]
    outs = [_evaluate_fn(sae_cfg)(jax.tree.map(lambda a: a[s : s + 1], params), x) for s in range(S)]
    return {k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in outs[0]}


@functools.lru_cache(maxsize=16)
def _evaluate_fn(sae_cfg):
    return jax.jit(jax.vmap(lambda p, xx: core.evaluate(sae_cfg, p, xx), in_axes=(0, None)))
