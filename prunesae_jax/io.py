"""Every file the package writes goes through here: a temp file in the same folder, fsync,
os.replace, fsync of the folder. A reader (or a run resumed after `kill -9`) sees the old file or
the new one, never a torn one.

- `atomic_file(path)`: a context manager yielding a binary file object; the one primitive;
- `atomic_write_bytes / _text / _json / _npz / _npy`: built on it;
- `make_temp_dir(parent, prefix)` and `commit_dir(tmp, final)`: a whole folder written under a
  temporary name, fsynced file by file, then renamed into place in one `os.replace`;
- one file-mode policy: folders 0o777 and files 0o666, less the process's umask (`mkstemp` and
  `mkdtemp` would leave 0600 / 0700);
- `to_jsonable`, `canonical_json` and `stable_hash`: the JSON these writers write, and the hash
  of it that names cached work (prunesae_jax/study/workdir.py's stage keys).

A full disk raises DiskFullError (see `disk_full_errors`) and a folder (or a file where a folder
should be) in the way InputError, each naming the path; the old file, if any, is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from prunesae_jax.errors import DiskFullError, InputError

__all__ = [
    'atomic_file',
    'atomic_write_bytes',
    'atomic_write_text',
    'atomic_write_json',
    'atomic_write_npz',
    'atomic_write_npy',
    'make_temp_dir',
    'commit_dir',
    'make_dirs',
    'disk_full_errors',
    'fsync_dir',
    'fsync_tree',
    'apply_mode_policy',
    'file_mode',
    'dir_mode',
    'to_jsonable',
    'canonical_json',
    'stable_hash',
]


# --------------------------------------------------------------------------- file modes


def _current_umask() -> int:
    """The process umask, read without changing it where the kernel says it (Linux >= 4.7):
    os.umask(0) and back would open a window in which other threads create world-writable files."""
    try:
        with open('/proc/self/status', encoding='ascii') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_current_umask()


def dir_mode() -> int:
    return 0o777 & ~_current_umask()


def apply_mode_policy(root: str | os.PathLike) -> None:
    """chmods `root` and everything under it to the policy: folders 0o777, files 0o666, less umask."""
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(root, dmode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, dmode)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, fmode)


# --------------------------------------------------------------------------- atomic writes

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_full_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turns an OSError for a full disk (ENOSPC) or quota (EDQUOT) inside the block into one
    DiskFullError naming `path`; any other error passes unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno not in _NO_SPACE or isinstance(e, DiskFullError):
            raise
        what = 'no space' if e.errno == errno.ENOSPC else 'no disk quota'
        raise DiskFullError(
            f'{what} left on the device writing {os.fspath(path)!r} ({e.strerror}); '
            'accepted: a path on a device with free space (free some, or write '
            'elsewhere)',
            e.errno,
        ) from None


def make_dirs(folder: str | os.PathLike) -> None:
    """folder.mkdir(parents=True, exist_ok=True), with a file in the way as InputError and a full
    disk as DiskFullError."""
    folder = Path(folder)
    try:
        with disk_full_errors(folder):
            folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise InputError(
            f'cannot create the folder {str(folder)!r}: {e.strerror} ({e.filename!r} is '
            'a file, or a link to nothing); accepted: a path whose parts are folders '
            '(move the file out of the way)'
        ) from None


def fsync_dir(path: str | os.PathLike) -> None:
    """fsyncs a folder, so that a rename in it reaches the disk too (or a crash can lose it);
    best effort: a folder that cannot be opened or synced is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsyncs every file and folder under `root` (files first, then their folders)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                with disk_full_errors(path):  # data another module wrote, reaching the disk now
                    os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yields a binary file; on clean exit it replaces `path` (fsync, rename, fsync of the folder).

    On an exception the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    make_dirs(path.parent)
    with disk_full_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with disk_full_errors(path):
            with os.fdopen(fd, 'wb') as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, file_mode())  # mkstemp's 0600 would hide results from other users
            os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, IsADirectoryError):
            raise InputError(
                f'cannot write {str(path)!r}: it is a folder; accepted: a path where the '
                'package can write a file (move the folder out of the way)'
            ) from None
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes UTF-8 text atomically."""
    return atomic_write_bytes(path, text.encode('utf-8'))


# --------------------------------------------------------------------------- JSON


def to_jsonable(obj: Any) -> Any:
    """Converts configs, numpy/jax scalars and arrays, tuples and paths to plain JSON values.

    Non-finite floats become None so that the output is strict JSON.
    """
    if hasattr(obj, 'to_dict') and callable(obj.to_dict):  # ml_collections.ConfigDict
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, '__array__'):
        arr = np.asarray(obj)
        return to_jsonable(arr.tolist()) if arr.ndim else to_jsonable(arr.item())
    raise InputError(
        f'cannot write {type(obj).__name__} value {obj!r} to JSON; accepted: '
        'dicts, lists, numbers, strings, None, numpy arrays'
    )


def canonical_json(obj: Any) -> str:
    """A stable JSON text: sorted keys, no whitespace, tuples as lists."""
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(',', ':'), allow_nan=False)


def stable_hash(obj: Any, n: int = 16) -> str:
    """The first `n` hex digits of sha256 over `canonical_json(obj)`."""
    return hashlib.sha256(canonical_json(obj).encode('utf-8')).hexdigest()[:n]


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Writes `obj` as strict JSON (sorted keys) atomically."""
    text = json.dumps(to_jsonable(obj), sort_keys=True, indent=indent, allow_nan=False)
    return atomic_write_text(path, text + '\n')


def atomic_write_npz(path: str | os.PathLike, arrays: Mapping[str, Any]) -> Path:
    """Writes a dict of arrays as an uncompressed .npz atomically."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return atomic_write_bytes(path, buf.getvalue())


def atomic_write_npy(path: str | os.PathLike, array: Any) -> Path:
    """np.save of one array, atomically."""
    with atomic_file(path) as f:
        np.save(f, np.asarray(array))
    return Path(path)


# --------------------------------------------------------------------------- folders


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new empty folder `parent/<prefix><random>` with the folder mode of the policy (mkdtemp's
    0700 would hide it from other users), for a folder to be committed with `commit_dir`."""
    parent = Path(parent)
    make_dirs(parent)
    with disk_full_errors(parent):
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, dir_mode())
    return tmp


def commit_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Renames the finished folder `tmp` to `final` in one os.replace, after applying the mode
    policy and fsyncing every file in it (other modules may have written them without); an
    existing `final` is removed first."""
    tmp, final = Path(tmp), Path(final)
    apply_mode_policy(tmp)
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final
