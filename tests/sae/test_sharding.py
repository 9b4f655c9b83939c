import os
import subprocess
import sys
import textwrap

import numpy as np

from prunesae_jax import sae
from prunesae_jax.sharding import make_mesh

_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    from prunesae_jax import sae
    from prunesae_jax.sharding import make_mesh
    assert len(jax.devices()) == 8, jax.devices()
    x = np.random.default_rng(0).normal(size=(4096, 32)).astype(np.float32)
    cfg = sae.SAEConfig(32, 128, k=4, dead_tokens=1024)
    t = sae.TrainConfig(n_steps=12, n_seeds=4, batch_size=512, lr=3e-3, warmup_steps=2, progress=False, log_every=0)
    r = sae.train(cfg, t, x, mesh=make_mesh(4, 2))
    np.savez(sys.argv[1], **r.params)
""")


def test_eight_device_mesh_equals_single_device(tmp_path):
    out = tmp_path / 'mesh.npz'
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
    proc = subprocess.run(
        [sys.executable, '-c', _SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meshed = dict(np.load(out))
    x = np.random.default_rng(0).normal(size=(4096, 32)).astype(np.float32)
    cfg = sae.SAEConfig(32, 128, k=4, dead_tokens=1024)
    t = sae.TrainConfig(n_steps=12, n_seeds=4, batch_size=512, lr=3e-3, warmup_steps=2, progress=False, log_every=0)
    single = sae.train(cfg, t, x).params
    for k in single:
        np.testing.assert_allclose(meshed[k], single[k], atol=1e-5, err_msg=k)


def test_mesh_errors():
    import pytest

    with pytest.raises(ValueError, match='needs 16 devices'):
        make_mesh(8, 2)
    mesh = make_mesh(1, 1)
    cfg = sae.SAEConfig(8, 16, k=2)
    r = sae.train(
        cfg,
        sae.TrainConfig(n_steps=2, batch_size=64, progress=False, log_every=0),
        np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32),
        mesh=mesh,
    )
    assert r.params['W_dec'].shape == (1, 16, 8)


_TWO_PROCESSES = textwrap.dedent("""
    import sys
    import numpy as np
    from prunesae_jax import sharding
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    assert sharding.initialize_distributed(f'localhost:{port}', 2, pid) == (pid, 2)
    from prunesae_jax import sae
    from prunesae_jax.sae.store import ArrayStore
    x = np.random.default_rng(0).normal(size=(4096, 32)).astype(np.float32)
    cfg = sae.SAEConfig(32, 128, k=4, dead_tokens=1024)
    res = {}
    for per_seed in (False, True):
        store, rows = ArrayStore(x), []
        batch = store.batch
        store.batch = lambda *a, **k: rows.append(len(batch(*a, **k))) or batch(*a, **k)
        t = sae.TrainConfig(n_steps=12, n_seeds=2, batch_size=512, lr=3e-3, warmup_steps=2, progress=False,
                            log_every=4, per_seed_data=per_seed)
        r = sae.train(cfg, t, store, mesh=sharding.sae_mesh(2, 2))
        res.update({f'{per_seed}_{k}': v for k, v in r.params.items()})
        res[f'{per_seed}_rows'] = np.asarray(sum(rows))
        res[f'{per_seed}_fvu'] = np.asarray(r.metrics[-1]['fvu'])
    np.savez(out, **res)
""")


def test_two_processes_train_on_their_share_of_each_batch(tmp_path, free_port):
    """2 processes x 2 devices, mesh seed 2 x data 2 with 'data' across the processes: the params
    equal one device's, and each process reads half of every batch (per seed with per_seed_data)."""
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu')
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, '-c', _TWO_PROCESSES, str(i), port, str(tmp_path / f'p{i}.npz')],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    x = np.random.default_rng(0).normal(size=(4096, 32)).astype(np.float32)
    cfg = sae.SAEConfig(32, 128, k=4, dead_tokens=1024)
    got = [dict(np.load(tmp_path / f'p{i}.npz')) for i in range(2)]
    for per_seed in (False, True):
        t = sae.TrainConfig(
            n_steps=12,
            n_seeds=2,
            batch_size=512,
            lr=3e-3,
            warmup_steps=2,
            progress=False,
            log_every=4,
            per_seed_data=per_seed,
        )
        single = sae.train(cfg, t, x)
        for g in got:
            for k, v in single.params.items():
                np.testing.assert_allclose(g[f'{per_seed}_{k}'], v, atol=1e-5, err_msg=k)
            np.testing.assert_allclose(g[f'{per_seed}_fvu'], single.metrics[-1]['fvu'], rtol=1e-5)
            assert int(g[f'{per_seed}_rows']) == 12 * 512 // 2 * (2 if per_seed else 1)
