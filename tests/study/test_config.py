"""Config schema and validation: every shipped config validates; bad values fail in one line."""

import importlib.util
import pathlib

import pytest

from prunesae_jax.study import config as config_lib
from prunesae_jax.study.config import ConfigError, ConfigPathError, validate, validate_layer

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ('default', 'smoke', 'paper_gemma3_1b', 'paper_gemma2_2b', 'paper_llama32_1b')


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.parametrize('name', CONFIGS)
def test_shipped_configs_validate(name):
    cfg = load(name)
    assert validate(cfg) is cfg
    # the paper's 8x dictionaries everywhere but the CPU default, sized to converge on 2 cores
    assert cfg.sae.expansion == (1 if name == 'default' else 8) and cfg.analysis.tau == 0.7
    assert tuple(cfg.analysis.taus) == (0.6, 0.7, 0.8)


def test_paper_configs_grid():
    g3 = load('paper_gemma3_1b')
    assert g3.layer == 13 and g3.model == 'google/gemma-3-1b-pt'
    assert tuple(g3.pruning.sparsities) == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    assert g3.sae.n_tokens == 1_500_000 and g3.transfer.source == 'pretrained'
    assert g3.transfer.repo == 'google/gemma-scope-2-1b-pt'
    g2 = load('paper_gemma2_2b')
    assert g2.transfer.path == 'layer_12/width_16k/average_l0_82/params.npz'
    assert load('paper_llama32_1b').transfer.source == 'dense'
    d = load('default')
    assert d.model == 'gemma-3-270m' and tuple(d.pruning.methods) == ('magnitude', 'wanda')
    assert tuple(d.pruning.sparsities) == (0.0, 0.5) and d.sae.n_seeds == 3
    assert d.analysis.pairing == 'distinct' and d.sae.dead_tokens == 0  # dead window scaled to the run


def test_dead_window_must_be_reachable():
    # smoke: 66 rows of 31 tokens = 2,046 stored tokens x 4 epochs // 256 = 32 steps of 256 tokens
    _bad(
        lambda c: setattr(c.sae, 'dead_tokens', 10_000_000),
        r'config.sae.dead_tokens=10000000 .*at most the 8192 tokens the SAEs train on \(32 steps of 256',
    )
    cfg = load('smoke')
    cfg.sae.dead_tokens = 8192
    validate(cfg)
    cfg.sae.dead_tokens = 8193
    with pytest.raises(ConfigError, match='8193'):
        validate(cfg)


def test_measure_minimum_sizes_and_new_analysis_fields():
    _bad(lambda c: setattr(c.ppl, 'max_tokens', 1024), r'config.ppl.max_tokens=1024 .*or an int >= 4096')
    _bad(lambda c: setattr(c.analysis, 'transfer_tokens', 256), r'config.analysis.transfer_tokens=256 .*>= 2048')
    _bad(lambda c: setattr(c.analysis, 'causal_tokens', 128), r'config.analysis.causal_tokens=128 .*>= 1024')
    _bad(lambda c: setattr(c.analysis, 'pairing', 'same'), r"config.analysis.pairing='same' .*distinct \| shared")
    _bad(lambda c: setattr(c.analysis, 'min_seed_floor', 1.5), r'config.analysis.min_seed_floor=1.5')
    _bad(lambda c: setattr(c.sae, 'snapshots', (0.5, 1.5)), r'config.sae.snapshots=\(0.5, 1.5\)')


def _bad(mutate, match, exc=ConfigError):
    cfg = load('smoke')
    with cfg.unlocked():
        mutate(cfg)
    with pytest.raises(exc, match=match) as info:
        validate(cfg)
    assert '\n' not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_model():
    _bad(lambda c: setattr(c, 'model', 'gpt-9000'), r"config.model='gpt-9000'.*zoo name")
    _bad(lambda c: setattr(c, 'model', 'tiny:mamba'), r'tiny:mamba.*tiny:llama')
    _bad(lambda c: setattr(c, 'model', '/nonexistent/folder'), 'no HF folder', ConfigPathError)


def test_unknown_method_and_group():
    _bad(lambda c: setattr(c.pruning, 'methods', ('magnitude', 'obs')), r"'obs'.*magnitude \| wanda")
    _bad(lambda c: setattr(c.pruning, 'methods', ('wanda', 'wanda')), 'duplicates')
    _bad(lambda c: setattr(c.pruning.group, 'wanda', 'global'), r'group.wanda.*per_row \| per_matrix')
    _bad(lambda c: setattr(c.pruning.group, 'magnitude', '4:2'), 'N:M')


def test_bad_sparsities():
    _bad(lambda c: setattr(c.pruning, 'sparsities', (0.0, 1.0)), r'\[0, 1\)')
    _bad(lambda c: setattr(c.pruning, 'sparsities', (0.0, -0.1)), r'\[0, 1\)')
    _bad(lambda c: setattr(c.pruning, 'sparsities', (0.5, 0.3, 0.5)), 'duplicates')
    cfg = load('smoke')
    cfg.pruning.sparsities = (0.5, 0.0, 0.3)  # unsorted is fine
    validate(cfg)
    cfg.pruning.group.wanda = '2:4'
    with pytest.raises(ConfigError, match='fixes the sparsity'):
        validate(cfg)
    cfg.pruning.sparsities = (0.0, 0.5)
    validate(cfg)


def test_wrong_types_and_unknown_fields():
    _bad(lambda c: setattr(c.sae, 'n_seeds', 1), r'sae.n_seeds=1.*>= 2')
    _bad(lambda c: setattr(c, 'dtype', 'float8'), 'float32 | bfloat16')
    _bad(lambda c: setattr(c.analysis, 'tau', 0.0), r'analysis.tau')
    _bad(lambda c: setattr(c.ppl, 'stride', 1000), r'ppl.stride=1000')
    _bad(lambda c: c.sae.__setattr__('expnasion', 8), "unknown config field 'sae.expnasion'")
    _bad(lambda c: setattr(c.data.train, 'source', 'nowhere.txt'), 'does not exist', ConfigPathError)
    _bad(lambda c: setattr(c.data.eval, 'split', 'test'), 'train | calibration')
    _bad(lambda c: setattr(c.transfer, 'source', 'pretrained'), 'transfer.path')
    cfg = load('smoke')
    del cfg['mesh']
    with pytest.raises(ConfigError, match="'mesh' is missing"):
        validate(cfg)
    with pytest.raises(ConfigError, match='ConfigDict'):
        validate({'model': 'x'})


def test_layer_range():
    cfg = load('smoke')
    assert validate_layer(cfg, 4, 64) == 1
    cfg.layer = -1
    assert validate_layer(cfg, 18) == 9
    cfg.layer = 4
    with pytest.raises(ConfigError, match=r'config.layer=4.*\[0, 3\].*4 layers'):
        validate_layer(cfg, 4)
    cfg.layer = 1
    cfg.sae.k = 10_000
    with pytest.raises(ConfigError, match='sae.k'):
        validate_layer(cfg, 4, 64)


def test_local_data_and_model_paths(tmp_path):
    (tmp_path / 'corpus.jsonl').write_text('{"text": "hello"}\n')
    (tmp_path / 'model').mkdir()
    (tmp_path / 'model' / 'config.json').write_text('{}')
    cfg = load('smoke')
    cfg.data.train.source = str(tmp_path / 'corpus.jsonl')
    cfg.model = str(tmp_path / 'model')
    validate(cfg)
    (tmp_path / 'corpus.csv').write_text('a\n')
    cfg.data.train.source = str(tmp_path / 'corpus.csv')
    with pytest.raises(ConfigError, match='ending in'):
        validate(cfg)


def test_base_config_fields_documented():
    doc = config_lib.__doc__
    for k in config_lib.base_config().keys():
        assert k in doc, k
