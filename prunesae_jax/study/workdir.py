"""The workdir of a study: atomic writes, the stage cache and provenance.

Only `prunesae_jax.study` and `launch/` touch the disk layout of a workdir:

    workdir/
      config.json             the validated config of the last run
      stages/<stage>/<key>/   one finished stage; the folder appears only once complete
      results.json            every number (deterministic: no timings, no timestamps)
      timings.json            wall-clock seconds per stage
      tables/*.csv, figures/*.png, report.md

A stage's key is a stable hash of everything that determines its output: the
canonical JSON of the relevant config subtree plus the keys of the stages it
reads. A stage is written into a hidden temporary folder and renamed into
place in one `os.replace`, so a `kill -9` at any moment leaves either nothing
or the whole stage; re-running the same command skips finished stages.

Crash safety, for a `kill -9` (or a power cut) at any instant:
- every file is written by `atomic_write_bytes`: a temp file in the same folder, fsync, rename,
  fsync of the folder; readers see the old file or the new one, never a torn one;
- a stage folder holds its `DONE` marker, written last, before it is renamed into place; files
  that other modules wrote into it (activation shards, masks) are fsynced first;
- `hold_workdir` (taken by `study.run`) locks the workdir against a second concurrent run and
  removes what killed runs left behind: temp files `.<name>.*.tmp` and stage temp folders
  `stages/<stage>/.<key>.tmp-*`. A stage folder without `DONE` never counts as finished.

Tests kill runs at chosen places with `crash_point(name)` and $PRUNESAE_JAX_CRASH_AT.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prunesae_jax.errors import InputError

__all__ = [
    'CRASH_ENV',
    'crash_point',
    'WorkdirBusy',
    'hold_workdir',
    'clean_stale',
    'atomic_write_bytes',
    'atomic_write_text',
    'atomic_write_json',
    'atomic_write_npz',
    'to_jsonable',
    'canonical_json',
    'stable_hash',
    'StageCache',
    'provenance',
    'package_versions',
    'git_revision',
    'device_info',
]

PROVENANCE_PACKAGES = (
    'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'transformers',
    'numpy', 'scipy', 'ml_collections', 'prunesae_jax',
)


# --------------------------------------------------------------------------- crash points

# For tests: '<point>' or '<point>:<n>' kills the process with SIGKILL the n-th time (default
# the first) `crash_point('<point>')` runs. Points: 'capture' (after each captured batch),
# 'sae_step' (before each SAE training step), 'measures' (a condition's measures computed, not
# yet written), 'commit@<stage>' (a stage's files written, DONE not yet), 'replace@<file name>'
# (an atomic write between its temp file and the rename), 'after_results' (results.json written,
# the report not yet).
CRASH_ENV = 'PRUNESAE_JAX_CRASH_AT'
_crash_hits: collections.Counter = collections.Counter()


def crash_point(name: str) -> None:
    """Dies here with a real SIGKILL (no cleanup, no atexit) when $PRUNESAE_JAX_CRASH_AT names it."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, sep, nth = spec.rpartition(':')
    if not sep or not nth.isdigit():
        point, nth = spec, '1'
    if point != name:
        return
    if int(nth) < 1:
        raise InputError(f'${CRASH_ENV}={spec!r}; accepted: <point> or <point>:<n> with n >= 1')
    _crash_hits[name] += 1
    if _crash_hits[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- atomic writes

def _fsync_dir(path: Path) -> None:
    # The rename itself must reach the disk too, or a crash can lose it.
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


def _fsync_tree(root: Path) -> None:
    """fsyncs every file and folder under `root` (files first, then their folders)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` via a temp file in the same folder, fsync and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from other users
        crash_point(f'replace@{path.name}')
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes UTF-8 text atomically."""
    return atomic_write_bytes(path, text.encode('utf-8'))


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
    raise InputError(f'cannot write {type(obj).__name__} value {obj!r} to JSON; accepted: '
                     'dicts, lists, numbers, strings, None, numpy arrays')


def canonical_json(obj: Any) -> str:
    """A stable JSON text: sorted keys, no whitespace, tuples as lists."""
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(',', ':'), allow_nan=False)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Writes `obj` as strict JSON (sorted keys) atomically."""
    text = json.dumps(to_jsonable(obj), sort_keys=True, indent=indent, allow_nan=False)
    return atomic_write_text(path, text + '\n')


def atomic_write_npz(path: str | os.PathLike, arrays: Mapping[str, Any]) -> Path:
    """Writes a dict of arrays as an uncompressed .npz atomically."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return atomic_write_bytes(path, buf.getvalue())


def stable_hash(obj: Any, n: int = 16) -> str:
    """The first `n` hex digits of sha256 over `canonical_json(obj)`."""
    return hashlib.sha256(canonical_json(obj).encode('utf-8')).hexdigest()[:n]


# --------------------------------------------------------------------------- stage cache

class StageCache:
    """Finished stages under `root/stages/<stage>/<key>/`, each committed by one rename.

    Usage:
      key = cache.key('ppl', {'ppl': cfg.ppl.to_dict()}, upstream=[mask_key])
      if not cache.done('ppl', key):
        with cache.writing('ppl', key) as tmp:
          atomic_write_json(tmp / 'ppl.json', {...})
      result = cache.read_json('ppl', key, 'ppl.json')
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root) / 'stages'

    @staticmethod
    def key(stage: str, spec: Any, upstream: Sequence[str] = ()) -> str:
        """The stable key of a stage from what determines it and the keys it reads."""
        return stable_hash({'stage': stage, 'spec': spec, 'upstream': list(upstream)})

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def done(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / 'DONE').is_file()

    @contextlib.contextmanager
    def writing(self, stage: str, key: str, spec: Any = None) -> Iterator[Path]:
        """Yields an empty temporary folder; on clean exit it becomes the finished stage."""
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Leftovers of a killed run of this very stage are useless: remove them first.
        for stale in final.parent.glob(f'.{key}.tmp-*'):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f'.{key}.tmp-', dir=final.parent))
        try:
            yield tmp
            if spec is not None:
                atomic_write_json(tmp / 'spec.json', spec)
            # Files other modules wrote (activation shards, masks) must be on disk before DONE.
            _fsync_tree(tmp)
            crash_point(f'commit@{stage}')
            atomic_write_text(tmp / 'DONE', key + '\n')
            if final.exists():  # a previous incomplete attempt without DONE
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def read_json(self, stage: str, key: str, name: str) -> Any:
        with open(self.path(stage, key) / name, encoding='utf-8') as f:
            return json.load(f)

    def read_npz(self, stage: str, key: str, name: str) -> dict[str, np.ndarray]:
        with np.load(self.path(stage, key) / name) as z:
            return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------- the workdir lock

class WorkdirBusy(InputError):
    """Another live run holds the workdir."""


def clean_stale(root: str | os.PathLike) -> list[Path]:
    """Removes what killed runs left in a workdir; returns the removed paths.

    Temp files of atomic writes (`.<name>.<random>.tmp`) in the workdir, tables/ and figures/,
    and unfinished stage folders: `stages/<stage>/.<key>.tmp-*` and any `stages/<stage>/<key>/`
    without its DONE marker. Only safe while no other run uses the workdir (see hold_workdir).
    """
    root = Path(root)
    removed = []
    for folder in (root, root / 'tables', root / 'figures'):
        for p in folder.glob('.*.tmp') if folder.is_dir() else ():
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    stages = root / 'stages'
    for stage in sorted(stages.iterdir()) if stages.is_dir() else ():
        if not stage.is_dir():
            continue
        for p in sorted(stage.iterdir()):
            unfinished = p.is_dir() and (
                (p.name.startswith('.') and '.tmp-' in p.name)
                or (not p.name.startswith('.') and not p.name.endswith('.train')
                    and not (p / 'DONE').is_file()))
            if unfinished:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        if removed:
            _fsync_dir(stage)
    return removed


@contextlib.contextmanager
def hold_workdir(root: str | os.PathLike) -> Iterator[Path]:
    """Locks `root` for this process (flock on root/.lock) and cleans what killed runs left.

    The lock dies with the process, so a `kill -9` never leaves the workdir locked. Raises
    WorkdirBusy when another live run holds it. On file systems without flock (some network
    mounts) the run goes ahead unlocked and nothing is cleaned.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / '.lock', os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirBusy(f'workdir {str(root)!r} is in use by another run; accepted: a '
                                  'workdir no live run is using (wait for it, or choose another)'
                                  ) from None
            locked = False  # no flock here (e.g. NFS without lockd)
        if locked:
            clean_stale(root)
        yield root
    finally:
        os.close(fd)  # releases the flock


# --------------------------------------------------------------------------- provenance

def package_versions(names: Sequence[str] = PROVENANCE_PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that decide the numbers ('not installed' if absent)."""
    out = {'python': platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = 'not installed'
    return out


def git_revision(repo: str | os.PathLike | None = None) -> str:
    """`git rev-parse HEAD` of the source tree, or 'unknown' (no git, or no commit yet)."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(['git', '-C', str(repo), 'rev-parse', 'HEAD'], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return rev or 'unknown'


def device_info() -> dict[str, Any]:
    """The JAX backend and devices the numbers were computed on."""
    info: dict[str, Any] = {'host': platform.platform(), 'machine': platform.machine(),
                            'cpu_count': os.cpu_count()}
    try:
        import jax  # pylint: disable=g-import-not-at-top
        devices = jax.devices()
        info.update(platform=devices[0].platform, device_kind=devices[0].device_kind,
                    device_count=len(devices), process_count=jax.process_count())
    except Exception as e:  # pylint: disable=broad-except
        info.update(platform='unknown', error=f'{type(e).__name__}: {e}')
    return info


def provenance(config: Any) -> dict[str, Any]:
    """Config, package versions, git revision and device: everything a reader needs to re-run."""
    return {
        'config': to_jsonable(config),
        'versions': package_versions(),
        'git_revision': git_revision(),
        'device': device_info(),
    }
