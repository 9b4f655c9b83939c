"""Stable stage keys, the stage cache's commit-by-rename, the workdir's layout, provenance.

The atomic writes themselves: tests/test_io.py.
"""

import errno
import json
import os
import stat
import tempfile

import ml_collections
import numpy as np
import pytest

from prunesae_jax import io as io_lib
from prunesae_jax.errors import DiskFullError, InputError
from prunesae_jax.study import workdir as wd


def test_stage_keys_are_stable():
    k1 = wd.StageCache.key('ppl', {'w': 1}, upstream=['abc'])
    assert k1 == wd.StageCache.key('ppl', {'w': 1}, upstream=['abc'])
    assert k1 == wd.StageCache.key('ppl', ml_collections.ConfigDict({'w': 1}), upstream=('abc',))
    assert k1 != wd.StageCache.key('ppl', {'w': 1}, upstream=['abd'])
    assert k1 != wd.StageCache.key('acts', {'w': 1}, upstream=['abc'])
    assert len(k1) == 16


def test_stage_cache_commit_and_crash(tmp_path):
    cache = wd.StageCache(tmp_path)
    key = cache.key('sae', {'k': 8})
    assert not cache.done('sae', key)
    with pytest.raises(RuntimeError):
        with cache.writing('sae', key) as tmp:
            io_lib.atomic_write_json(tmp / 'half.json', {'v': 1})
            raise RuntimeError('killed')
    assert not cache.done('sae', key)
    assert os.listdir(tmp_path / 'stages' / 'sae') == []  # the partial stage is gone
    # A stale temp folder of a kill -9 is removed by the next attempt.
    (tmp_path / 'stages' / 'sae' / f'.{key}.tmp-dead').mkdir()
    with cache.writing('sae', key, spec={'k': 8}) as tmp:
        io_lib.atomic_write_npz(tmp / 'p.npz', {'W': np.arange(4.0)})
    assert cache.done('sae', key)
    assert os.listdir(tmp_path / 'stages' / 'sae') == [key]
    np.testing.assert_array_equal(cache.read_npz('sae', key, 'p.npz')['W'], np.arange(4.0))
    assert cache.read_json('sae', key, 'spec.json') == {'k': 8}


def test_provenance_fields():
    prov = wd.provenance(ml_collections.ConfigDict({'model': 'm'}))
    assert prov['config'] == {'model': 'm'}
    for pkg in ('jax', 'flax', 'optax', 'orbax-checkpoint', 'transformers', 'numpy', 'scipy', 'prunesae_jax'):
        assert pkg in prov['versions']
    assert prov['versions']['numpy'] == np.__version__
    assert prov['device']['platform'] == 'cpu'
    assert isinstance(prov['git_revision'], str) and prov['git_revision']
    json.dumps(prov)


# --------------------------------------------------------------------------- damaged stages


def _stage(cache, key='k' * 16):
    with cache.writing('tokens', key, spec={'n': 1}) as tmp:
        io_lib.atomic_write_npz(tmp / 'tokens.npz', {'t': np.arange(1000)})
        (tmp / 'store').mkdir()
        (tmp / 'store' / 'shard_00000.npy').write_bytes(b'x' * 4096)
    return key


@pytest.mark.parametrize(
    'damage,says',
    [
        ('truncate', 'tokens.npz is corrupt (size 100, expected'),
        ('garble', 'store/shard_00000.npy is corrupt (size 4096 as expected, but sha256'),
        ('missing', 'tokens.npz is missing'),
        ('garbled_done', 'DONE is corrupt'),
        ('other_key_done', 'DONE is corrupt'),
    ],
)
def test_done_finds_a_damaged_stage_removes_it_and_says_so(tmp_path, caplog, damage, says):
    cache = wd.StageCache(tmp_path)
    key = _stage(cache)
    path = cache.path('tokens', key)
    marker = json.loads((path / 'DONE').read_text())
    assert marker['key'] == key and sorted(marker['files']) == ['spec.json', 'store/shard_00000.npy', 'tokens.npz']
    assert marker['files']['store/shard_00000.npy'][0] == 4096
    if damage == 'truncate':
        (path / 'tokens.npz').write_bytes((path / 'tokens.npz').read_bytes()[:100])
    elif damage == 'garble':
        (path / 'store' / 'shard_00000.npy').write_bytes(b'y' * 4096)
    elif damage == 'missing':
        (path / 'tokens.npz').unlink()
    elif damage == 'garbled_done':
        (path / 'DONE').write_text('{"key": ')
    else:
        (path / 'DONE').write_text(json.dumps({**marker, 'key': 'x' * 16}))
    fresh = wd.StageCache(tmp_path)  # a new run: nothing verified yet
    with caplog.at_level('WARNING'):
        assert not fresh.done('tokens', key)
    assert f'stage tokens/{key}: {says}' in caplog.text and 'recomputing' in caplog.text
    assert not path.exists() and os.listdir(path.parent) == []  # removed, no leftovers
    _stage(fresh, key)  # computed again
    assert wd.StageCache(tmp_path).done('tokens', key)


def test_intact_and_legacy_stages_are_done(tmp_path, caplog):
    cache = wd.StageCache(tmp_path)
    key = _stage(cache)
    assert wd.StageCache(tmp_path).done('tokens', key)
    (cache.path('tokens', key) / 'DONE').write_text(key + '\n')  # a marker from before manifests
    with caplog.at_level('WARNING'):
        assert wd.StageCache(tmp_path).done('tokens', key)
    assert 'recomputing' not in caplog.text
    assert wd.current_activity() == 'tokens'
    wd.set_activity(condition='wanda@0.5')
    assert wd.current_activity() == 'tokens (condition wanda@0.5)'
    wd.set_activity('load model', condition=None)
    assert wd.current_activity() == 'load model'


# --------------------------------------------------------------------------- modes, layout, config


def test_stage_files_follow_the_umask_policy(tmp_path):
    old = os.umask(0o027)
    try:
        cache = wd.StageCache(tmp_path)
        with cache.writing('acts', 'a' * 16) as tmp:
            fd, name = tempfile.mkstemp(dir=tmp)  # as the activation store and save_masks write: 0600
            os.close(fd)
            tempfile.mkdtemp(dir=tmp)  # 0700
            io_lib.atomic_write_json(tmp / 'x.json', {})
        final = cache.path('acts', 'a' * 16)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [final, *final.rglob('*')]}
        assert modes[final.name] == 0o750
        assert {m for n, m in modes.items() if (final / n).is_dir() and n != final.name} == {0o750}
        assert {m for n, m in modes.items() if (final / n).is_file()} == {0o640}
        assert stat.S_IMODE((tmp_path / 'stages' / 'acts').stat().st_mode) == 0o750
    finally:
        os.umask(old)


def test_check_layout_names_what_is_in_the_way(tmp_path):
    wd.check_layout(tmp_path)  # empty: fine
    (tmp_path / 'stages').write_text('')
    with pytest.raises(InputError, match=r"holds a file 'stages' where the study keeps a folder"):
        wd.check_layout(tmp_path)
    (tmp_path / 'stages').unlink()
    (tmp_path / 'stages' / 'ppl').mkdir(parents=True)
    (tmp_path / 'stages' / 'sae').write_text('')
    with pytest.raises(InputError, match=r"'stages/sae'"):
        wd.check_layout(tmp_path)
    (tmp_path / 'stages' / 'sae').unlink()
    (tmp_path / '.lock').mkdir()
    with pytest.raises(InputError, match=r"holds a folder '.lock' where the study keeps a file"):
        with wd.hold_workdir(tmp_path):
            pass
    (tmp_path / '.lock').rmdir()
    (tmp_path / 'results.json').symlink_to(tmp_path / 'nowhere')
    with pytest.raises(InputError, match=r"a link to nothing 'results.json'"):
        wd.check_layout(tmp_path)


def test_write_config_keeps_results_and_their_config_together(tmp_path):
    a = ml_collections.ConfigDict({'name': 'a', 'x': 1})
    wd.write_config(tmp_path, a)
    for name in ('results.json', 'timings.json', 'report.md'):
        (tmp_path / name).write_text('{}')
    (tmp_path / 'tables').mkdir()
    (tmp_path / 'tables' / 'ppl.csv').write_text('1')
    (tmp_path / 'stages').mkdir()
    wd.write_config(tmp_path, a)  # the same config: its results stay
    assert (tmp_path / 'results.json').exists() and (tmp_path / 'tables' / 'ppl.csv').exists()
    wd.write_config(tmp_path, ml_collections.ConfigDict({'name': 'a', 'x': 2}))
    assert sorted(os.listdir(tmp_path)) == ['config.json', 'stages']  # stages stay cached
    assert json.loads((tmp_path / 'config.json').read_text()) == {'name': 'a', 'x': 2}


def test_a_full_disk_in_a_stage_commit_removes_the_stage(tmp_path, monkeypatch):
    """A shard another module wrote that the disk cannot hold (ENOSPC when io.commit_dir fsyncs
    it): one DiskFullError naming the shard, and no stage, finished or half."""
    cache = wd.StageCache(tmp_path)
    real = os.fsync

    def fsync(fd):
        if os.readlink(f'/proc/self/fd/{fd}').endswith('shard.npy'):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, 'fsync', fsync)
    with pytest.raises(DiskFullError, match=r"no space left on the device writing '.*shard\.npy'"):
        with cache.writing('acts', 'a' * 16) as tmp:
            (tmp / 'shard.npy').write_bytes(b'x' * 64)
    assert os.listdir(tmp_path / 'stages' / 'acts') == []  # no temp folder, no stage
    assert not cache.done('acts', 'a' * 16)


def test_large_files_are_rehashed_only_when_their_mtime_changed(tmp_path, monkeypatch):
    """Activation shards (GBs at the paper's scale) are not re-read on every resume: above
    ALWAYS_HASH_BYTES an unchanged size and mtime are trusted; any write changes the mtime."""
    monkeypatch.setattr(wd, 'ALWAYS_HASH_BYTES', 1024)
    cache = wd.StageCache(tmp_path)
    key = _stage(cache)
    shard = cache.path('tokens', key) / 'store' / 'shard_00000.npy'  # 4096 bytes: "large"
    st = shard.stat()
    shard.write_bytes(b'z' * 4096)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # a flip that kept the mtime: trusted
    assert wd.StageCache(tmp_path).done('tokens', key)
    shard.write_bytes(b'w' * 4096)  # a write (a second later, as the clock may be coarse): caught
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not wd.StageCache(tmp_path).done('tokens', key)


def test_a_damaged_file_behind_an_unchecked_done_is_removed_when_read(tmp_path):
    """A DONE from before manifests is trusted; a damaged file behind it is found when read: one
    InputError asking for a re-run, and the stage is gone, so the re-run recomputes it."""
    cache = wd.StageCache(tmp_path)
    key = _stage(cache)
    path = cache.path('tokens', key)
    (path / 'DONE').write_text(key + '\n')
    (path / 'tokens.npz').write_bytes((path / 'tokens.npz').read_bytes()[:100])
    fresh = wd.StageCache(tmp_path)
    assert fresh.done('tokens', key)
    with pytest.raises(InputError, match=rf'stage tokens/{key}: tokens.npz cannot be read .*re-run'):
        fresh.read_npz('tokens', key, 'tokens.npz')
    assert not path.exists() and not fresh.done('tokens', key)
