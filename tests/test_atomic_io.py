"""prunesae_jax/io.py: atomic writes, the file-mode policy, full disks, commit_dir, stable JSON."""

import errno
import json
import os
import pathlib
import stat
import tempfile

import ml_collections
import numpy as np
import pytest

from prunesae_jax import io as io_lib
from prunesae_jax.errors import DiskFullError, InputError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_writers_round_trip_and_leave_no_temp_files(tmp_path):
    io_lib.atomic_write_json(
        tmp_path / 'a' / 'x.json', {'b': (1, 2.5), 'a': np.float32(0.5), 'n': float('nan'), 'arr': np.arange(3)}
    )
    assert json.loads((tmp_path / 'a' / 'x.json').read_text()) == {'a': 0.5, 'arr': [0, 1, 2], 'b': [1, 2.5], 'n': None}
    io_lib.atomic_write_npz(tmp_path / 'y.npz', {'w': np.ones((2, 3), np.float32)})
    with np.load(tmp_path / 'y.npz') as z:
        np.testing.assert_array_equal(z['w'], np.ones((2, 3)))
    io_lib.atomic_write_npy(tmp_path / 'z.npy', np.arange(5, dtype=np.int16))
    z = np.load(tmp_path / 'z.npy')
    assert z.dtype == np.int16 and z.tolist() == [0, 1, 2, 3, 4]
    io_lib.atomic_write_text(tmp_path / 'y.npz', 'replaced')
    assert (tmp_path / 'y.npz').read_text() == 'replaced'
    assert io_lib.atomic_write_bytes(tmp_path / 'b.bin', b'\x00\x01') == tmp_path / 'b.bin'
    assert sorted(os.listdir(tmp_path)) == ['a', 'b.bin', 'y.npz', 'z.npy']


def test_an_exception_leaves_the_old_file(tmp_path):
    p = tmp_path / 'r.json'
    io_lib.atomic_write_json(p, {'v': 1})
    with pytest.raises(RuntimeError, match='mid-write'):
        with io_lib.atomic_file(p) as f:
            f.write(b'{"v": 2, "torn')
            raise RuntimeError('mid-write')
    with pytest.raises(InputError, match='cannot write object value'):
        io_lib.atomic_write_json(p, {'v': object()})
    assert json.loads(p.read_text()) == {'v': 1}
    assert os.listdir(tmp_path) == ['r.json']


@pytest.mark.parametrize(
    'mask,file_mode,dir_mode', [(0o027, 0o640, 0o750), (0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_modes_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    old = os.umask(mask)
    try:
        io_lib.atomic_write_text(tmp_path / 'new' / 'deeper' / 'f.txt', 'x')
        assert _mode(tmp_path / 'new' / 'deeper' / 'f.txt') == file_mode
        assert _mode(tmp_path / 'new') == _mode(tmp_path / 'new' / 'deeper') == dir_mode
        tmp = io_lib.make_temp_dir(tmp_path / 'stage', prefix='.k.tmp-')
        assert tmp.name.startswith('.k.tmp-') and _mode(tmp) == dir_mode
        assert io_lib.file_mode() == file_mode and io_lib.dir_mode() == dir_mode
    finally:
        os.umask(old)


def test_a_folder_in_the_way_is_an_input_error(tmp_path):
    (tmp_path / 'r.json').mkdir()
    with pytest.raises(InputError, match=r"cannot write '.*r\.json': it is a folder; accepted"):
        io_lib.atomic_write_json(tmp_path / 'r.json', {'v': 1})
    assert os.listdir(tmp_path) == ['r.json']  # no temp file left
    (tmp_path / 'f').write_text('a file')
    with pytest.raises(
        InputError,
        match=r"cannot create the folder '.*f'.*accepted: a path whose "
        r'parts are folders',
    ):
        io_lib.atomic_write_text(tmp_path / 'f' / 'x.txt', 'x')


class _FullFile:
    """A file object whose writes find the disk full."""

    def __init__(self, f, err):
        self.f, self.err = f, err

    def write(self, data):
        raise OSError(self.err, os.strerror(self.err))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize('err,says', [(errno.ENOSPC, 'no space'), (errno.EDQUOT, 'no disk quota')])
def test_a_full_disk_is_one_error_naming_the_file(tmp_path, monkeypatch, err, says):
    io_lib.atomic_write_json(tmp_path / 'r.json', {'v': 1})
    real = os.fdopen
    monkeypatch.setattr(os, 'fdopen', lambda fd, *a, **k: _FullFile(real(fd, *a, **k), err))
    with pytest.raises(
        DiskFullError,
        match=rf"{says} left on the device writing '.*r\.json'.*"
        'accepted',
    ) as e:
        io_lib.atomic_write_json(tmp_path / 'r.json', {'v': 2})
    assert isinstance(e.value, InputError) and isinstance(e.value, OSError)
    assert e.value.errno == err
    assert os.listdir(tmp_path) == ['r.json']  # the temp file is gone, the old file is there
    assert json.loads((tmp_path / 'r.json').read_text()) == {'v': 1}


def test_a_full_disk_when_creating_files_and_folders(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, 'mkstemp', full)
    with pytest.raises(DiskFullError, match=r"writing '.*a\.txt'"):
        io_lib.atomic_write_text(tmp_path / 'a.txt', 'x')
    monkeypatch.setattr(tempfile, 'mkdtemp', full)
    with pytest.raises(DiskFullError, match=rf"writing '{tmp_path}'"):
        io_lib.make_temp_dir(tmp_path, prefix='.t-')
    monkeypatch.setattr(os, 'mkdir', full)
    with pytest.raises(DiskFullError, match=r"writing '.*new'"):
        io_lib.make_dirs(tmp_path / 'new')


def test_disk_full_errors_passes_other_errors():
    with pytest.raises(PermissionError):
        with io_lib.disk_full_errors('/x'):
            raise PermissionError(errno.EACCES, 'denied')
    with pytest.raises(DiskFullError) as e:  # not wrapped twice
        with io_lib.disk_full_errors('/outer'):
            with io_lib.disk_full_errors('/inner'):
                raise OSError(errno.ENOSPC, 'full')
    assert "'/inner'" in str(e.value) and '/outer' not in str(e.value)


def test_commit_dir_renames_a_whole_folder_into_place(tmp_path, umask_027, monkeypatch):
    final = tmp_path / 'stages' / 'k'
    final.mkdir(parents=True)
    (final / 'old.txt').write_text('an earlier attempt')
    tmp = io_lib.make_temp_dir(final.parent, prefix='.k.tmp-')
    fd, name = tempfile.mkstemp(dir=tmp)  # as other modules write: 0600
    os.write(fd, b'shard')
    os.close(fd)
    sub = tempfile.mkdtemp(dir=tmp)  # 0700
    io_lib.atomic_write_text(os.path.join(sub, 'x.txt'), 'x')
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: (synced.append(os.readlink(f'/proc/self/fd/{fd}')), real(fd)))

    assert io_lib.commit_dir(tmp, final) == final
    assert not tmp.exists() and os.listdir(final.parent) == ['k']
    names = sorted(str(p.relative_to(final)) for p in final.rglob('*'))
    assert names == sorted(
        [os.path.basename(name), os.path.basename(sub), os.path.join(os.path.basename(sub), 'x.txt')]
    )
    assert (final / os.path.basename(name)).read_bytes() == b'shard'
    assert {_mode(p) for p in final.rglob('*') if p.is_file()} == {0o640}
    assert {_mode(p) for p in [final, *final.rglob('*')] if p.is_dir()} == {0o750}
    # Every file was fsynced before the rename (under its temporary folder's name).
    assert {os.path.basename(p) for p in synced if str(tmp) in p} >= {os.path.basename(name), 'x.txt'}


def test_stable_hash_and_canonical_json():
    a = ml_collections.ConfigDict({'x': 1, 'y': (0.3, 0.5), 'z': {'b': 'w', 'a': 2}})
    b = {'z': {'a': 2, 'b': 'w'}, 'y': [0.3, 0.5], 'x': 1}
    assert io_lib.canonical_json(a) == io_lib.canonical_json(b) == ('{"x":1,"y":[0.3,0.5],"z":{"a":2,"b":"w"}}')
    assert io_lib.stable_hash(a) == io_lib.stable_hash(b)
    assert io_lib.stable_hash(a) != io_lib.stable_hash({**b, 'x': 2})
    assert len(io_lib.stable_hash(b)) == 16 and len(io_lib.stable_hash(b, 6)) == 6
    assert io_lib.to_jsonable({1: np.bool_(True), 'p': pathlib.PurePosixPath('a/b'), 'inf': np.float64('inf')}) == {
        '1': True,
        'p': 'a/b',
        'inf': None,
    }
