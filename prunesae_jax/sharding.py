"""Device meshes and sharding rules: SAE seeds x data, and the decoder's params over data x model.

Two meshes over the same devices:

- `make_mesh(n_seed, n_data)` -> Mesh(('seed', 'data')): the SAE trainer's (sae/train.py) — seeds
  split over 'seed', each batch split over 'data'.
- `make_model_mesh(n_data, n_model)` -> Mesh(('data', 'model')): the decoder forward. Its params
  are laid out by a strategy (`STRATEGIES`):
    'none'  every param replicated; only the batch is split over 'data' (pure data parallel).
    'fsdp'  every weight matrix split along one dimension over 'data' (the largest dimension the
            axis size divides; 1-D norms replicated); XLA all-gathers a weight where it is used and
            the activations stay split on batch over 'data' (ZeRO-3 / FSDP style).
    'tp'    tensor parallel over 'model' (Megatron layout): gate/up split on their output
            (intermediate) dim, down on its input dim, so the MLP needs one all-reduce; with the
            DecoderConfig given and num_kv_heads divisible by the axis, q/k/v are split on whole
            KV-head groups and o_proj on its input dim, so attention runs head-local too.
            embed / lm_head are split on the vocabulary. The batch is split over 'data'.
  A dimension the axis size does not divide is never split (that leaf stays replicated), so every
  strategy is correct for every model; only the memory and communication differ.

`forward` / `resid_post` here are the decoder's public functions run under one jit with the
params and batch placed on the mesh and the residual stream pinned to batch x 'data' between
blocks (jax.lax.with_sharding_constraint); outputs come back split on batch over 'data'.
They equal `prunesae_jax.models.forward` / `resid_post` on one device up to float rounding.

The study's placement: `sae_mesh` (the trainer's mesh over every local device, or None),
`place_params` (params on a ('data', 'model') mesh by strategy, unchanged on one device),
`placed_mesh` (the mesh params were placed on) and `layer_activations` (resid_post of one layer in
batches, on that mesh when params are placed, else on one device).

Multi-host (one process per host, `initialize_distributed` first): meshes span every process's
devices (jax.devices()); `shard_params` / `shard_batch` build global arrays from host data that
is identical on every process, and `host_array` reads a result back on every process.

How the study splits its work over P processes (JAX's multi-controller runtime; every process runs
the same program). The decoder runs per process, on that process's devices (`place_params` uses
the local devices), so a forward never waits on another host; the processes meet only where
their work has to be combined:
- `process_share(n)`: this process's contiguous share of n items (capture batches, calibration
  sequences), in process order, so the shares concatenated are the single-process order;
- `process_sum(tree)`: the element-wise sum of a pytree over processes, one all-reduce in jit
  (Wanda's and SparseGPT's calibration statistics);
- `sae_mesh`: the trainer's ('seed', 'data') mesh with 'data' spanning the processes, and
  `global_array`, which builds a global batch from the rows this process's devices hold (each
  process reads only its share of every batch);
- `barrier(name)`: every process waits here until all have arrived (the coordination service's
  barrier, with a long timeout: the others wait while process 0 computes what is computed once);
- `from_main(fn)`: fn() run on process 0 only, its int result broadcast to all.
With one process each of these is the identity (or a no-op), so single-process runs are unchanged.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from prunesae_jax.errors import InputError

__all__ = [
    'STRATEGIES',
    'make_mesh',
    'make_model_mesh',
    'param_specs',
    'param_shardings',
    'shard_params',
    'batch_sharding',
    'shard_batch',
    'forward',
    'resid_post',
    'host_array',
    'initialize_distributed',
    'is_main',
    'process_share',
    'process_sum',
    'barrier',
    'from_main',
    'global_array',
    'sae_mesh',
    'place_params',
    'placed_mesh',
    'layer_activations',
]

STRATEGIES = ('none', 'fsdp', 'tp')

# params['layers'][i] kernels by the dimension tensor parallelism splits (layout [d_in, d_out]).
_TP_OUT = ('gate_proj', 'up_proj')  # column parallel: split d_out
_TP_IN = ('down_proj',)  # row parallel: split d_in
_TP_ATTN_OUT = ('q_proj', 'k_proj', 'v_proj')
_TP_ATTN_IN = ('o_proj',)


def make_mesh(n_seed: int | None = None, n_data: int = 1, devices=None) -> Mesh:
    """Mesh(('seed', 'data')) over n_seed * n_data devices (n_seed=None: all devices / n_data)."""
    devices = list(jax.devices() if devices is None else devices)
    if n_seed is None:
        n_seed = len(devices) // n_data
    if n_seed < 1 or n_data < 1 or n_seed * n_data > len(devices):
        raise InputError(
            f'mesh seed={n_seed} x data={n_data} needs {n_seed * n_data} devices; {len(devices)} available'
        )
    return Mesh(np.array(devices[: n_seed * n_data]).reshape(n_seed, n_data), ('seed', 'data'))


def make_model_mesh(n_data: int | None = None, n_model: int = 1, devices=None) -> Mesh:
    """Mesh(('data', 'model')) over n_data * n_model devices (n_data=None: all devices / n_model).

    'model' is the fast (inner) axis: with jax.devices() ordered process by process, a 'model'
    group stays inside one host whenever n_model divides the local device count, so the
    tensor-parallel all-reduces use the fast intra-host links.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(n_model, int) or n_model < 1:
        raise InputError(f'n_model={n_model!r} is not valid; accepted: an int >= 1')
    if n_data is None:
        n_data = len(devices) // n_model
    if n_data < 1 or n_data * n_model > len(devices):
        raise InputError(
            f'mesh data={n_data} x model={n_model} needs {n_data * n_model} devices; {len(devices)} available'
        )
    return Mesh(np.array(devices[: n_data * n_model]).reshape(n_data, n_model), ('data', 'model'))


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise InputError(f'strategy={strategy!r} is not valid; accepted: {" | ".join(STRATEGIES)}')


def _axis(mesh: Mesh, name: str) -> int:
    return int(mesh.shape[name]) if name in mesh.shape else 1


def _split(shape, dim: int, axis: str, size: int) -> P:
    """P splitting `dim` over `axis` when size divides it, else replicated."""
    if size <= 1 or shape[dim] % size:
        return P()
    spec = [None] * len(shape)
    spec[dim] = axis
    return P(*spec)


def _fsdp_spec(shape, size: int) -> P:
    """The largest dimension `size` divides goes over 'data' (ties: the first); 1-D stays replicated."""
    if len(shape) < 2 or size <= 1:
        return P()
    dims = [d for d in range(len(shape)) if shape[d] % size == 0]
    if not dims:
        return P()
    return _split(shape, max(dims, key=lambda d: (shape[d], -d)), 'data', size)


def _tp_layer_specs(layer: dict, size: int, heads_ok: bool) -> dict:
    out = {}
    for name, w in layer.items():
        shape = np.shape(w)
        if name in _TP_OUT or (heads_ok and name in _TP_ATTN_OUT):
            out[name] = _split(shape, 1, 'model', size)
        elif name in _TP_IN or (heads_ok and name in _TP_ATTN_IN):
            out[name] = _split(shape, 0, 'model', size)
        else:
            out[name] = P()
    return out


def param_specs(params: dict, mesh: Mesh, strategy: str, cfg=None) -> dict:
    """PartitionSpec pytree (the structure of params) for a strategy in `STRATEGIES`.

    cfg (a DecoderConfig) is only read by 'tp': attention is split over 'model' when it is given
    and num_kv_heads is divisible by the 'model' axis (whole KV groups per device); otherwise
    only the MLP and the vocabulary are split.
    """
    _check_strategy(strategy)
    if strategy == 'none':
        return jax.tree.map(lambda _: P(), params)
    if strategy == 'fsdp':
        n = _axis(mesh, 'data')
        return jax.tree.map(lambda w: _fsdp_spec(np.shape(w), n), params)
    m = _axis(mesh, 'model')
    heads_ok = cfg is not None and m > 1 and cfg.num_kv_heads % m == 0
    specs = {k: P() for k in params if k != 'layers'}
    if 'embed' in params:
        specs['embed'] = _split(np.shape(params['embed']), 0, 'model', m)
    if 'lm_head' in params:
        specs['lm_head'] = _split(np.shape(params['lm_head']), 1, 'model', m)
    specs['layers'] = [_tp_layer_specs(lp, m, heads_ok) for lp in params['layers']]
    return specs


def param_shardings(params: dict, mesh: Mesh, strategy: str, cfg=None) -> dict:
    """NamedSharding pytree for params on mesh (see `param_specs`)."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), param_specs(params, mesh, strategy, cfg), is_leaf=lambda x: isinstance(x, P)
    )


def _place(x, sharding: NamedSharding):
    """x (host or device array, identical on every process) as a global array with `sharding`."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_params(params: dict, mesh: Mesh, strategy: str, cfg=None) -> dict:
    """params placed on mesh by `strategy` ('none' | 'fsdp' | 'tp'; see the module docstring)."""
    shardings = param_shardings(params, mesh, strategy, cfg)
    return jax.tree.map(_place, params, shardings)


def batch_sharding(mesh: Mesh, shape) -> NamedSharding:
    """Axis 0 over 'data' when the axis divides it, else replicated."""
    return NamedSharding(mesh, _split(tuple(shape), 0, 'data', _axis(mesh, 'data')))


def shard_batch(x, mesh: Mesh):
    """A [B, ...] batch (tokens, mask) split on B over 'data' (replicated when B % data != 0)."""
    if x is None:
        return None
    return _place(x, batch_sharding(mesh, np.shape(x)))


def _pin(h, mesh: Mesh):
    return jax.lax.with_sharding_constraint(h, batch_sharding(mesh, h.shape))


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def _run(cfg, mesh, params, tokens, attention_mask, stop_after):
    # The decoder's public pieces, so that the residual stream can be pinned between blocks.
    from prunesae_jax.models import decoder  # pylint: disable=g-import-not-at-top

    h = _pin(decoder.embed(cfg, params, tokens), mesh)
    out = {}
    last = cfg.num_layers - 1 if stop_after is None else max(stop_after)
    for i in range(last + 1):
        h = _pin(decoder.block(cfg, params['layers'][i], i, h, attention_mask), mesh)
        if stop_after is not None and i in stop_after:
            out[i] = h
    if stop_after is not None:
        return out
    return _pin(decoder.unembed(cfg, params, h), mesh)


def _check_placed(params, tokens, mesh: Mesh) -> None:
    leaf = jax.tree.leaves(params)[0]
    sh = getattr(leaf, 'sharding', None)
    if not isinstance(sh, NamedSharding) or sh.mesh != mesh:
        raise InputError('params are not placed on this mesh; accepted: shard_params(params, mesh, strategy) first')
    if getattr(tokens, 'ndim', None) != 2:
        raise InputError(f'tokens has shape {getattr(tokens, "shape", None)}; expected [B, T] int32')


def forward(cfg, params: dict, tokens, attention_mask=None, *, mesh: Mesh):
    """Logits [B,T,V] float32, split on B over 'data'; params from `shard_params` on mesh.

    tokens / attention_mask may be host arrays (placed here with `shard_batch`) or already placed.
    """
    _check_placed(params, tokens, mesh)
    return _run(cfg, mesh, params, shard_batch(tokens, mesh), shard_batch(attention_mask, mesh), None)


def resid_post(cfg, params: dict, tokens, attention_mask=None, layers=None, *, mesh: Mesh) -> dict:
    """{l: [B,T,D]} after the requested blocks, split on B over 'data' (as models.resid_post)."""
    from prunesae_jax.models.decoder import check_layers  # pylint: disable=g-import-not-at-top

    _check_placed(params, tokens, mesh)
    layers = check_layers(cfg, layers)
    return _run(cfg, mesh, params, shard_batch(tokens, mesh), shard_batch(attention_mask, mesh), layers)


def host_array(x) -> np.ndarray:
    """x as a numpy array on this process, gathering shards held by other processes if needed."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def is_main() -> bool:
    """Whether this is process 0, the one that writes the workdir's shared files."""
    return jax.process_index() == 0


def process_share(n: int) -> slice:
    """This process's contiguous share of n items: [p n / P, (p + 1) n / P). The shares of
    processes 0 .. P-1, concatenated, are the items in order; with one process, all of them."""
    p, count = jax.process_index(), jax.process_count()
    return slice(p * n // count, (p + 1) * n // count)


@functools.lru_cache(maxsize=4)
def _process_mesh(count: int) -> Mesh:
    """Mesh(('process',)) over the first device of each process."""
    return Mesh(np.array([jax.local_devices(process_index=p)[0] for p in range(count)]), ('process',))


@functools.lru_cache(maxsize=4)
def _sum_over_processes(mesh: Mesh):
    return jax.jit(lambda t: jax.tree.map(lambda a: a.sum(0), t), out_shardings=NamedSharding(mesh, P()))


def process_sum(tree):
    """The pytree's element-wise sum over processes, on this process's first device (every process
    gets the same values). One all-reduce inside jit; with one process, tree itself."""
    count = jax.process_count()
    if count == 1:
        return tree
    mesh = _process_mesh(count)
    device = jax.local_devices()[0]
    spec = NamedSharding(mesh, P('process'))

    def stacked(x):
        local = jax.device_put(jax.numpy.asarray(x)[None], device)
        return jax.make_array_from_single_device_arrays((count,) + local.shape[1:], spec, [local])

    out = _sum_over_processes(mesh)(jax.tree.map(stacked, tree))
    return jax.tree.map(lambda a: a.addressable_data(0), out)


# How long the processes wait for each other at a barrier: process 0 alone computes the measures
# (minutes to hours at paper scale) while the others wait.
BARRIER_TIMEOUT_S = 24 * 3600
_barriers = [0]


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op with one process). Every process
    must pass the same barriers in the same order; name says where, in a timeout's message, and
    must be the same on every process (no paths: hosts may mount the workdir elsewhere)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # pylint: disable=g-import-not-at-top

    _barriers[0] += 1
    distributed.global_state.client.wait_at_barrier(f'prunesae_jax:{_barriers[0]}:{name}', BARRIER_TIMEOUT_S * 1000)


def from_main(fn) -> int:
    """int(fn()) computed on process 0 only and broadcast to every process (fn() itself with one
    process). Every process must call it at the same point."""
    if jax.process_count() == 1:
        return int(fn())
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    value = np.int64(int(fn())) if is_main() else np.int64(0)
    return int(multihost_utils.broadcast_one_to_all(value))


def global_array(shape, sharding: NamedSharding, read) -> jax.Array:
    """The global array of `shape` laid out by `sharding`, built from read(box) -> numpy, where box
    (a tuple of slices) bounds the parts this process's devices hold: each process reads only
    what it holds (its share of a batch split over a 'data' axis that spans the processes)."""
    shape = tuple(int(d) for d in shape)
    index = {
        d: tuple(s.indices(n)[:2] for s, n in zip(idx, shape))
        for d, idx in sharding.addressable_devices_indices_map(shape).items()
    }
    box = tuple(
        slice(min(i[a][0] for i in index.values()), max(i[a][1] for i in index.values())) for a in range(len(shape))
    )
    block = np.asarray(read(box))
    parts = [
        jax.device_put(block[tuple(slice(lo - b.start, hi - b.start) for (lo, hi), b in zip(idx, box))], d)
        for d, idx in index.items()
    ]
    return jax.make_array_from_single_device_arrays(shape, sharding, parts)


def sae_mesh(n_seed: int = -1, n_data: int = 1) -> Mesh | None:
    """The SAE trainer's ('seed', 'data') mesh over every device, or None for one device.

    -1 for one axis: all devices / the other. With P processes 'data' spans them (it must be a
    multiple of P): process p holds data shards p D / P .. (p + 1) D / P - 1 of every seed, so it
    reads only its 1/P of each batch; each process's devices take the seeds and the rest of the
    data axis.
    """
    n, count = jax.device_count(), jax.process_count()
    if n == 1:
        return None
    seed = n // n_data if n_seed == -1 else n_seed
    data = n // seed if n_data == -1 else n_data
    if seed * data != n:
        raise InputError(f'mesh (seed={n_seed}, data={n_data}) does not fit {n} devices; accepted: seed x data = {n}')
    if count == 1:
        return make_mesh(seed, data)
    if data % count:
        raise InputError(
            f'mesh.data={data} does not split over the {count} processes; accepted: a multiple of {count} '
            '(each process then reads its share of every batch)'
        )
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    grid = np.array(devices).reshape(count, data // count, seed).transpose(2, 0, 1).reshape(seed, data)
    return Mesh(grid, ('seed', 'data'))


def place_params(params: dict, strategy: str, n_model: int = 1, cfg=None) -> dict:
    """params on a ('data', 'model') mesh over this process's devices by `strategy` (see the
    module docstring).

    Unchanged with 'none' or on one device. A model is loaded and pruned unsharded; its forwards
    (perplexity, capture, measures) then run on the placed params, each process on its own devices.
    """
    devices = jax.local_devices()
    n = len(devices)
    if strategy == 'none' or n == 1:
        return params
    if n % n_model:
        raise InputError(f'n_model={n_model} does not divide the {n} devices; accepted: a divisor of {n}')
    return shard_params(params, make_model_mesh(n // n_model, n_model, devices), strategy, cfg)


def placed_mesh(params: dict) -> Mesh | None:
    """The ('data', 'model') mesh `place_params` put params on, else None."""
    mesh = getattr(getattr(params['final_norm'], 'sharding', None), 'mesh', None)
    return mesh if mesh is not None and 'model' in mesh.axis_names else None


def layer_activations(cfg, params: dict, rows: np.ndarray, layer: int, batch_size: int) -> np.ndarray:
    """resid_post of `layer` on token rows [n, T], batch_size rows at a time: [n, T, D] float32.

    Runs on the mesh of placed params (batches split over 'data'), else on one device.
    """
    from prunesae_jax.models import decoder  # pylint: disable=g-import-not-at-top

    mesh = placed_mesh(params)
    out = []
    for a in range(0, rows.shape[0], batch_size):
        batch = rows[a : a + batch_size]
        if mesh is not None:
            h = host_array(resid_post(cfg, params, batch, layers=(layer,), mesh=mesh)[layer])
            out.append(h.astype(np.float32))
        else:
            out.append(
                np.asarray(
                    decoder.resid_post(cfg, params, jax.numpy.asarray(batch), layers=(layer,))[layer], np.float32
                )
            )
    return np.concatenate(out)


def _env_int(name: str) -> int | None:
    v = os.environ.get(name, '')
    if not v:
        return None
    if not v.lstrip('-').isdigit():
        raise InputError(f'${name}={v!r} is not valid; accepted: an integer')
    return int(v)


# How long a process that ends waits for the others at JAX's shutdown barrier. The study's
# processes end together (pipeline.run's last barrier), so only a process that failed alone waits
# this long; then the coordination service stops the others (JAX's default is 300 s).
SHUTDOWN_TIMEOUT_S = 60


def initialize_distributed(
    coordinator_address: str = '', num_processes: int = 0, process_id: int = -1
) -> tuple[int, int]:
    """jax.distributed.initialize() for a multi-host run; returns (process_index, process_count).

    Call before anything touches a JAX backend. Unset arguments ('' / 0 / -1) fall back to
    $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID, and then to JAX's cluster
    auto-detection (Cloud TPU pods, SLURM, Open MPI, ...): on a TPU pod nothing needs setting.
    On GPU hosts without a scheduler give all three (process 0's host:port as the coordinator).
    """
    address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or None
    n = num_processes if num_processes > 0 else _env_int('JAX_NUM_PROCESSES')
    pid = process_id if process_id >= 0 else _env_int('JAX_PROCESS_ID')
    if n is not None and pid is not None and not 0 <= pid < n:
        raise InputError(f'process_id={pid} is not valid for num_processes={n}; accepted: an int in [0, {n - 1}]')
    # CPU devices of several processes talk over gloo (no effect on GPU / TPU backends).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=n,
            process_id=pid,
            shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
        )
    except ValueError as e:  # e.g. no coordinator given and no cluster detected
        raise InputError(
            f'jax.distributed.initialize: {" ".join(str(e).split())}; accepted: a TPU pod / '
            'SLURM / Open MPI job, or coordinator_address, num_processes and process_id '
            '(or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID)'
        ) from None
    return jax.process_index(), jax.process_count()
