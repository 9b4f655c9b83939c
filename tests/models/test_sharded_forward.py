"""The decoder forward with params sharded over 8 simulated CPU devices equals one device.

The 8-device runs happen in a subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=8
must be set before JAX starts); the single-device reference is computed here.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from prunesae_jax import sharding
from prunesae_jax.errors import InputError
from prunesae_jax.models import decoder
from prunesae_jax.testing import tiny_config

# H=8, KV=4, hd=8: tensor parallelism over 4 devices splits whole KV-head groups; F=128, V=128,
# D=64 are divisible by 8 for FSDP. The batch of 8 splits over 'data' = 8 and 2.
_CFG = dict(num_heads=8, num_kv_heads=4, head_dim=8)
_LAYER = 1  # a middle layer of 4

_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    from prunesae_jax import sharding
    from prunesae_jax.models import decoder
    from prunesae_jax.testing import tiny_config
    assert len(jax.devices()) == 8, jax.devices()
    family, out = sys.argv[1], sys.argv[2]
    cfg = tiny_config(family, dtype='float32', num_heads=8, num_kv_heads=4, head_dim=8)
    params = decoder.init_params(cfg, 0)
    data = np.load(sys.argv[3])
    res = {}
    for strategy, n_data, n_model in (('fsdp', 8, 1), ('tp', 2, 4)):
        mesh = sharding.make_model_mesh(n_data, n_model)
        sp = sharding.shard_params(params, mesh, strategy, cfg)
        logits = sharding.forward(cfg, sp, data['tokens'], data['mask'], mesh=mesh)
        h = sharding.resid_post(cfg, sp, data['tokens'], data['mask'], layers=(1,), mesh=mesh)[1]
        res[f'{strategy}/logits'] = np.asarray(logits)
        res[f'{strategy}/resid'] = np.asarray(h)
        res[f'{strategy}/logits_shard'] = np.array(logits.addressable_shards[0].data.shape)
        for name in ('q_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'input_norm'):
            res[f'{strategy}/{name}'] = np.array(sp['layers'][0][name].addressable_shards[0].data.shape)
        res[f'{strategy}/embed'] = np.array(sp['embed'].addressable_shards[0].data.shape)
    np.savez(out, **res)
""")


def _batch(cfg):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, (8, 16)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :5] = 0  # one left-padded row
    return tokens, mask


@pytest.mark.parametrize('family', ['llama', 'gemma3_text'])
def test_eight_device_fsdp_and_tp_equal_single_device(tmp_path, family):
    cfg = tiny_config(family, dtype='float32', **_CFG)
    tokens, mask = _batch(cfg)
    np.savez(tmp_path / 'batch.npz', tokens=tokens, mask=mask)
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
    proc = subprocess.run(
        [sys.executable, '-c', _SCRIPT, family, str(tmp_path / 'out.npz'), str(tmp_path / 'batch.npz')],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dict(np.load(tmp_path / 'out.npz'))

    params = decoder.init_params(cfg, 0)
    ref_logits = np.asarray(decoder.forward(cfg, params, tokens, mask))
    ref_resid = np.asarray(decoder.resid_post(cfg, params, tokens, mask, layers=(_LAYER,))[_LAYER])
    for strategy in ('fsdp', 'tp'):
        for what, ref in (('logits', ref_logits), ('resid', ref_resid)):
            err = np.abs(got[f'{strategy}/{what}'] - ref).max() / np.abs(ref).max()
            assert err < 1e-5, (strategy, what, err)

    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    Hhd = cfg.num_heads * cfg.head_dim
    # FSDP over 8: each weight split 8 ways on its largest divisible dim; norms replicated.
    assert tuple(got['fsdp/gate_proj']) == (D, F // 8)
    assert tuple(got['fsdp/down_proj']) == (F // 8, D)
    assert tuple(got['fsdp/q_proj']) == (D // 8, Hhd)
    assert tuple(got['fsdp/embed']) == (V // 8, D)
    assert tuple(got['fsdp/input_norm']) == (D,)
    # TP over model=4: column-parallel gate/up/q, row-parallel down/o, vocab-split embedding.
    assert tuple(got['tp/gate_proj']) == tuple(got['tp/up_proj']) == (D, F // 4)
    assert tuple(got['tp/down_proj']) == (F // 4, D)
    assert tuple(got['tp/q_proj']) == (D, Hhd // 4)
    assert tuple(got['tp/o_proj']) == (Hhd // 4, D)
    assert tuple(got['tp/embed']) == (V // 4, D)
    assert tuple(got['tp/input_norm']) == (D,)
    # Outputs come back split on batch over 'data'.
    assert tuple(got['fsdp/logits_shard']) == (1, 16, V)
    assert tuple(got['tp/logits_shard']) == (4, 16, V)


class _AxisSizes:
    """Stands in for a Mesh: param_specs reads only the axis sizes."""

    def __init__(self, **shape):
        self.shape = shape


def test_specs_replicate_what_does_not_divide():
    cfg = tiny_config('llama', dtype='float32')  # D=64, F=128, V=128, H=4, KV=2
    params = decoder.init_params(cfg, 0)
    specs = sharding.param_specs(params, _AxisSizes(data=2, model=4), 'tp', cfg)
    layer = specs['layers'][0]
    assert layer['gate_proj'] == layer['up_proj'] == P(None, 'model')
    assert layer['down_proj'] == P('model', None)
    assert layer['q_proj'] == layer['o_proj'] == P()  # KV=2 head groups cannot split 4 ways
    assert specs['lm_head'] == P(None, 'model') and specs['embed'] == P('model', None)
    # FSDP over 128: only the 128-long dims (F, V) divide; D=64 leaves stay replicated.
    specs = sharding.param_specs(params, _AxisSizes(data=128, model=1), 'fsdp')
    layer = specs['layers'][0]
    assert layer['gate_proj'] == P(None, 'data') and layer['down_proj'] == P('data', None)
    assert layer['q_proj'] == P() and layer['input_norm'] == P() and specs['final_norm'] == P()
    assert specs['embed'] == P('data', None)
    assert all(
        s == P()
        for s in jax.tree.leaves(
            sharding.param_specs(params, _AxisSizes(data=8, model=1), 'none'), is_leaf=lambda x: isinstance(x, P)
        )
    )


def test_one_device_mesh_and_errors():
    cfg = tiny_config('gemma2', dtype='float32')
    params = decoder.init_params(cfg, 0)
    tokens, mask = _batch(cfg)
    mesh = sharding.make_model_mesh(1, 1)
    sp = sharding.shard_params(params, mesh, 'fsdp', cfg)
    np.testing.assert_allclose(
        np.asarray(sharding.forward(cfg, sp, tokens, mask, mesh=mesh)),
        np.asarray(decoder.forward(cfg, params, tokens, mask)),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(InputError, match="strategy='zero3'"):
        sharding.shard_params(params, mesh, 'zero3')
    with pytest.raises(InputError, match='needs 16 devices'):
        sharding.make_model_mesh(4, 4)
    with pytest.raises(InputError, match='not placed on this mesh'):
        sharding.forward(cfg, params, tokens, mesh=mesh)


_MULTI_PROCESS = textwrap.dedent("""
    import sys
    import numpy as np
    from prunesae_jax import sharding
    pid, port, out, batch = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    assert sharding.initialize_distributed(f'localhost:{port}', 2, pid) == (pid, 2)
    import jax
    from prunesae_jax.models import decoder
    from prunesae_jax.testing import tiny_config
    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    cfg = tiny_config('llama', dtype='float32', num_heads=8, num_kv_heads=4, head_dim=8)
    params = decoder.init_params(cfg, 0)
    data = np.load(batch)
    res = {}
    for strategy, n_data, n_model in (('fsdp', 8, 1), ('tp', 2, 4)):
        mesh = sharding.make_model_mesh(n_data, n_model)
        sp = sharding.shard_params(params, mesh, strategy, cfg)
        logits = sharding.forward(cfg, sp, data['tokens'], data['mask'], mesh=mesh)
        assert not logits.is_fully_addressable  # half the batch lives on the other process
        res[f'{strategy}/logits'] = sharding.host_array(logits)
        h = sharding.resid_post(cfg, sp, data['tokens'], data['mask'], layers=(1,), mesh=mesh)[1]
        res[f'{strategy}/resid'] = sharding.host_array(h)
        res[f'{strategy}/gate_proj'] = np.array(sp['layers'][0]['gate_proj'].addressable_shards[0].data.shape)
    np.savez(f'{out}.{pid}.npz', **res)
""")


@pytest.mark.slow  # two JAX processes compiling side by side: about a minute on 2 cores
def test_two_processes_via_jax_distributed_equal_single_device(tmp_path, free_port):
    """jax.distributed.initialize() with 2 local processes x 4 CPU devices (gloo collectives):
    the multi-host code path (global arrays built from host data, results gathered back)."""
    cfg = tiny_config('llama', dtype='float32', **_CFG)
    tokens, mask = _batch(cfg)
    np.savez(tmp_path / 'batch.npz', tokens=tokens, mask=mask)
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
    port, out = str(free_port()), str(tmp_path / 'out')
    procs = [
        subprocess.Popen(
            [sys.executable, '-c', _MULTI_PROCESS, str(pid), port, out, str(tmp_path / 'batch.npz')],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]

    params = decoder.init_params(cfg, 0)
    ref_logits = np.asarray(decoder.forward(cfg, params, tokens, mask))
    ref_resid = np.asarray(decoder.resid_post(cfg, params, tokens, mask, layers=(_LAYER,))[_LAYER])
    for pid in (0, 1):
        got = dict(np.load(f'{out}.{pid}.npz'))
        for strategy in ('fsdp', 'tp'):
            for what, ref in (('logits', ref_logits), ('resid', ref_resid)):
                err = np.abs(got[f'{strategy}/{what}'] - ref).max() / np.abs(ref).max()
                assert err < 1e-5, (pid, strategy, what, err)
        assert tuple(got['fsdp/gate_proj']) == (cfg.hidden_size, cfg.intermediate_size // 8)
        assert tuple(got['tp/gate_proj']) == (cfg.hidden_size, cfg.intermediate_size // 4)


@pytest.mark.parametrize(
    'field, value, match',
    [
        ('mesh.model_sharding', 'zero3', r"mesh.model_sharding='zero3'.*none \| fsdp \| tp"),
        ('mesh.model', 0, r'mesh.model=0.*int >= 1'),
        ('mesh.model', 2, r"mesh.model=2.*unless mesh.model_sharding='tp'"),
        ('mesh.model_sharding', 'tp', r"mesh.model_sharding='tp'.*mesh.model >= 2"),
        ('distributed.num_processes', -1, r'distributed.num_processes=-1.*int >= 0'),
        ('distributed.coordinator_address', 'nohost', r"coordinator_address='nohost'.*host:port"),
        ('distributed.process_id', 4, r'distributed.process_id=4.*\[0, distributed.num_processes - 1\]'),
    ],
)
def test_config_mesh_and_distributed_fields(field, value, match):
    from prunesae_jax.study.config import ConfigError, base_config, validate

    config = base_config()
    config.model = 'tiny:llama'
    config.distributed.num_processes = 2
    section, name = field.split('.')
    config[section][name] = value
    with pytest.raises(ConfigError, match=match):
        validate(config)
    config = base_config()
    config.mesh.model_sharding, config.mesh.model = 'tp', 2
    config.distributed.enabled, config.distributed.coordinator_address = True, '10.0.0.1:1234'
    validate(config)
