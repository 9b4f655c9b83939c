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
