"""The workdir of a study: its layout and lock, the stage cache and provenance.

Only `prunesae_jax.study` and `launch/` touch the disk layout of a workdir:

    workdir/
      config.json             the validated config of the last run (results.json, timings.json,
                              report.md, tables/, figures/ are removed when a run with another
                              config starts, so that they always belong to config.json)
      .lock                   held (flock) by the live run
      run_study.error.log     launch/run_study.py: the traceback of an unexpected error
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
- every file is written by prunesae_jax/io.py: a temp file in the same folder, fsync, rename,
  fsync of the folder; readers see the old file or the new one, never a torn one;
- a stage folder holds its `DONE` marker, written last, and is renamed into place by
  `io.commit_dir`, which fsyncs every file in it first (also those other modules wrote into it:
  activation shards, masks);
- `hold_workdir` (taken by `study.run`) locks the workdir against a second concurrent run and
  removes what killed runs left behind: temp files `.<name>.*.tmp` and stage temp folders
  `stages/<stage>/.<key>.tmp-*`. A stage folder without `DONE` never counts as finished.

A damaged cache never blocks a workdir: each stage's DONE marker is a manifest of the size,
sha256 and mtime of every file in its folder, and `StageCache.done` checks them once per process
and stage folder: every size, and the sha256 of every file up to 64 MiB and of any larger one
(activation shards) whose mtime changed (see ALWAYS_HASH_BYTES; hashing runs at about 1 GB/s). A
stage whose file is missing, truncated or altered, or whose DONE is garbled, is logged in one line
('stage acts/<key>: store/shard_00000.npy is corrupt (size 1000, expected 531840); recomputing'),
removed, and computed again.

Everything the study writes follows io.py's file-mode policy: folders 0o777 and files 0o666, less
the process's umask (`io.commit_dir` applies it to the whole stage, so shards and masks that other
modules wrote with `mkstemp`'s 0600 follow it too).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from prunesae_jax import sharding
from prunesae_jax.errors import InputError
from prunesae_jax.io import (
    atomic_write_json,
    canonical_json,
    commit_dir,
    disk_full_errors,
    fsync_dir,
    make_dirs,
    make_temp_dir,
    stable_hash,
    to_jsonable,
)

__all__ = [
    'set_activity',
    'current_activity',
    'check_layout',
    'write_config',
    'OUTPUTS',
    'ERROR_LOG',
    'WorkdirBusy',
    'hold_workdir',
    'clean_stale',
    'StageCache',
    'provenance',
    'package_versions',
    'git_revision',
    'device_info',
    'file_digest',
    'manifest',
    'ALWAYS_HASH_BYTES',
    'verify_manifest',
]

PROVENANCE_PACKAGES = (
    'jax',
    'jaxlib',
    'flax',
    'optax',
    'orbax-checkpoint',
    'transformers',
    'numpy',
    'scipy',
    'ml_collections',
    'prunesae_jax',
)


# --------------------------------------------------------------------------- what the run is doing

# The stage and condition being run, for the launcher's one-line message when it is interrupted.
# StageCache.done records the stage it is asked about (a stage is computed right after its done()
# says no); the pipeline records the condition and the steps that are no cached stage.
_ACTIVITY: dict[str, str | None] = {'stage': 'startup', 'condition': None}
_UNSET = object()


def set_activity(stage: Any = _UNSET, condition: Any = _UNSET) -> None:
    """Records what the run is doing now (see current_activity); omitted fields are kept."""
    if stage is not _UNSET:
        _ACTIVITY['stage'] = stage
    if condition is not _UNSET:
        _ACTIVITY['condition'] = condition


def current_activity() -> str:
    """e.g. 'sae (condition wanda@0.5)', 'load model', 'startup'."""
    stage, condition = _ACTIVITY['stage'] or 'startup', _ACTIVITY['condition']
    return f'{stage} (condition {condition})' if condition else stage


# --------------------------------------------------------------------------- stage cache

_HASH_CHUNK = 1 << 22


def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, 'rb') as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


# Files up to this size are hashed on every check; larger ones (activation shards: GBs per
# condition at the paper's scale, most never read again on a resume) only when their size or
# modification time differs from the manifest's. The study never modifies a committed file, so a
# truncation, an edit or a copy over it is caught; a bit flip that kept the mtime is caught in the
# smaller files only.
ALWAYS_HASH_BYTES = 64 << 20


def manifest(root: str | os.PathLike) -> dict[str, list]:
    """{relative path: [size, sha256, mtime_ns]} of every file under `root` (links not followed)."""
    root = Path(root)
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                out[p.relative_to(root).as_posix()] = [*file_digest(p), p.stat().st_mtime_ns]
    return dict(sorted(out.items()))


def verify_manifest(root: str | os.PathLike, files: Mapping[str, Any]) -> str | None:
    """None when every file of `files` (as written by `manifest`) is intact under `root`, else why
    not, e.g. 'tokens.npz is corrupt (size 100, expected 5000)'. Sizes first (cheap), then the
    sha256 of every file up to ALWAYS_HASH_BYTES and of any larger one whose mtime changed."""
    root = Path(root)
    stats = {}
    for name, (size, *_) in files.items():
        try:
            stats[name] = (root / name).stat()
        except FileNotFoundError:
            return f'{name} is missing'
        except OSError as e:
            return f'{name} cannot be read ({e.strerror})'
        if stats[name].st_size != size:
            return f'{name} is corrupt (size {stats[name].st_size}, expected {size})'
    for name, (size, digest, *mtime) in files.items():
        if size > ALWAYS_HASH_BYTES and mtime and stats[name].st_mtime_ns == mtime[0]:
            continue
        try:
            _, have = file_digest(root / name)
        except OSError as e:
            return f'{name} cannot be read ({e.strerror})'
        if have != digest:
            return f'{name} is corrupt (size {size} as expected, but sha256 {have[:12]}..., expected {digest[:12]}...)'
    return None


class StageCache:
    """Finished stages under `root/stages/<stage>/<key>/`, each committed by one rename.

    Usage:
      key = cache.key('ppl', {'ppl': cfg.ppl.to_dict()}, upstream=[mask_key])
      if not cache.done('ppl', key):
        with cache.writing('ppl', key) as tmp:
          atomic_write_json(tmp / 'ppl.json', {...})
      result = cache.read_json('ppl', key, 'ppl.json')

    The DONE marker of a stage is {"key": ..., "files": {path: [size, sha256, mtime_ns]}}; `done`
    checks it (see verify_manifest; a stage whose files do not match is logged, removed and
    reported as not done). A DONE holding only the key (written before manifests existed) is
    trusted unchecked.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root) / 'stages'
        self._verified: set[Path] = set()  # stage folders checked by this process

    @staticmethod
    def key(stage: str, spec: Any, upstream: Sequence[str] = ()) -> str:
        """The stable key of a stage from what determines it and the keys it reads."""
        return stable_hash({'stage': stage, 'spec': spec, 'upstream': list(upstream)})

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def done(self, stage: str, key: str) -> bool:
        """Whether the stage is finished and intact. A damaged one is removed (one line in the log)
        and reported as not done, so the caller computes it again. Records `stage` as the run's
        current activity (a stage is computed right after done() says no)."""
        set_activity(stage)
        path = self.path(stage, key)
        if path in self._verified:
            if (path / 'DONE').is_file():
                return True
            self._verified.discard(path)
        marker = path / 'DONE'
        if not marker.is_file():
            return False
        problem = self._check(path, key)
        if problem is None:
            self._verified.add(path)
            return True
        logging.warning('stage %s/%s: %s; recomputing', stage, key, problem)
        _remove_tree(path)
        return False

    @staticmethod
    def _check(path: Path, key: str) -> str | None:
        try:
            text = (path / 'DONE').read_text(encoding='utf-8')
        except (OSError, UnicodeDecodeError) as e:
            return f'DONE cannot be read ({e})'
        if text == key + '\n':  # a marker from before manifests: trusted as it is
            return None
        try:
            marker = json.loads(text)
            files = marker['files']
            ok = (
                marker['key'] == key
                and isinstance(files, dict)
                and all(
                    isinstance(v, list)
                    and len(v) in (2, 3)
                    and all(isinstance(i, int) for i in v[::2])
                    and isinstance(v[1], str)
                    for v in files.values()
                )
            )
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            return 'DONE is corrupt (not the manifest of this stage)'
        return verify_manifest(path, files)

    @contextlib.contextmanager
    def writing(self, stage: str, key: str, spec: Any = None, together: bool = False) -> Iterator[Path]:
        """Yields an empty temporary folder; on clean exit it becomes the finished stage: `spec`
        (when given) in spec.json, then the DONE manifest of every file in it, then one
        `io.commit_dir` (mode policy, fsync of every file, rename into place).

        together=True (every process of a jax.distributed run calls this at the same point): the
        folder is `.<key>.tmp-shared`, made by process 0 before any process writes into it; once
        every process has written its files, process 0 commits the stage, and every process
        returns only once it is committed (sharding.barrier).
        """
        final = self.path(stage, key)
        main = not together or sharding.is_main()
        tmp = final.parent / f'.{key}.tmp-shared'
        if main:
            make_dirs(final.parent)
            # Leftovers of a killed run of this very stage are useless: remove them first.
            for stale in final.parent.glob(f'.{key}.tmp-*'):
                shutil.rmtree(stale, ignore_errors=True)
            if together:
                make_dirs(tmp)
            else:
                tmp = make_temp_dir(final.parent, prefix=f'.{key}.tmp-')
        if together:
            sharding.barrier(f'writing {stage}/{key}')
        try:
            yield tmp
            if together:
                sharding.barrier(f'written {stage}/{key}')
            if main:
                if spec is not None:
                    atomic_write_json(tmp / 'spec.json', spec)
                atomic_write_json(tmp / 'DONE', {'key': key, 'files': manifest(tmp)}, indent=None)
                if final.exists():  # a previous incomplete (or damaged) attempt
                    _remove_tree(final)
                commit_dir(tmp, final)
                self._verified.add(final)  # just written and hashed
            if together:
                sharding.barrier(f'committed {stage}/{key}')
        except BaseException:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def read_json(self, stage: str, key: str, name: str) -> Any:
        try:
            with open(self.path(stage, key) / name, encoding='utf-8') as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise self._unreadable(stage, key, name, e) from None

    def read_npz(self, stage: str, key: str, name: str) -> dict[str, np.ndarray]:
        try:
            with np.load(self.path(stage, key) / name) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise self._unreadable(stage, key, name, e) from None

    def _unreadable(self, stage: str, key: str, name: str, e: BaseException) -> InputError:
        """A file done() could not check (a DONE from before manifests) turned out damaged: the
        stage is removed, so that the same command computes it again."""
        self._verified.discard(self.path(stage, key))
        _remove_tree(self.path(stage, key))
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return InputError(
            f'stage {stage}/{key}: {name} cannot be read ({type(e).__name__}: {why}); '
            'the stage was removed; accepted: re-run the same command to recompute it'
        )


def _remove_tree(path: Path) -> None:
    """Removes a stage folder: renamed aside first (clean_stale removes what a kill leaves of it),
    so that its DONE never outlives part of its files."""
    aside = path.with_name(f'.{path.name}.tmp-removed')
    try:
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
    except OSError:
        aside = path
    shutil.rmtree(aside, ignore_errors=True)


# --------------------------------------------------------------------------- the workdir lock


class WorkdirBusy(InputError):
    """Another live run holds the workdir."""


# What a run writes at the top of its workdir: the outputs of the last finished run (removed when
# a run with another config starts, see write_config) and the run's own files.
OUTPUTS = ('results.json', 'timings.json', 'report.md', 'tables', 'figures')
ERROR_LOG = 'run_study.error.log'  # launch/run_study.py: the traceback of an unexpected error
_FOLDERS = ('stages', 'tables', 'figures')
_FILES = ('.lock', 'config.json', 'results.json', 'timings.json', 'report.md', ERROR_LOG)


def check_layout(root: str | os.PathLike, name: str | None = None) -> None:
    """Raises InputError when something in `root` is in the way of the study's own files: a file
    where it keeps a folder (stages/, stages/<stage>/, tables/, figures/), a folder where it keeps a
    file (.lock, config.json, results.json, ...), or a link to nothing. Nothing is changed.
    `name` is how the message names `root` (default: its path)."""
    root = Path(root)
    label = name or repr(str(root))

    def kind(p: Path) -> str:
        return 'a link to nothing' if p.is_symlink() and not p.exists() else ('a folder' if p.is_dir() else 'a file')

    wrong = [
        (n, 'a folder') for n in _FOLDERS if (root / n).is_symlink() or (root / n).exists() if not (root / n).is_dir()
    ]
    wrong += [
        (n, 'a file') for n in _FILES if (root / n).is_symlink() or (root / n).exists() if not (root / n).is_file()
    ]
    stages = root / 'stages'
    if stages.is_dir() and not wrong:
        wrong += [
            (f'stages/{p.name}', 'a folder')
            for p in sorted(stages.iterdir())
            if not p.name.startswith('.') and not p.is_dir()
        ]
    if wrong:
        what, need = wrong[0]
        raise InputError(
            f'{label} holds {kind(root / what)} {what!r} where the study keeps {need}; '
            f'accepted: a workdir whose {what!r} is {need} or absent (move it out of the '
            'way)'
        )


def write_config(root: str | os.PathLike, config: Any) -> Path:
    """Writes root/config.json for a run that starts; when it differs from the config of the
    results in `root`, those results (OUTPUTS) are removed first, so that config.json always
    describes results.json, also when the new run fails. Finished stages stay cached."""
    root = Path(root)
    new = json.loads(canonical_json(config))
    try:
        old = json.loads((root / 'config.json').read_text(encoding='utf-8'))
    except (OSError, ValueError):
        old = None
    if old != new:
        for name in OUTPUTS:  # results.json first: a kill in between leaves no stale results
            p = root / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        fsync_dir(root)
    return atomic_write_json(root / 'config.json', config)


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
                or (not p.name.startswith('.') and not p.name.endswith('.train') and not (p / 'DONE').is_file())
            )
            if unfinished:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        if removed:
            fsync_dir(stage)
    return removed


@contextlib.contextmanager
def hold_workdir(root: str | os.PathLike) -> Iterator[Path]:
    """Locks `root` for this process (flock on root/.lock) and cleans what killed runs left.

    The lock dies with the process, so a `kill -9` never leaves the workdir locked. Raises
    WorkdirBusy when another live run holds it. On file systems without flock (some network
    mounts) the run goes ahead unlocked and nothing is cleaned.
    """
    root = Path(root)
    make_dirs(root)
    check_layout(root)
    with disk_full_errors(root / '.lock'):
        fd = os.open(root / '.lock', os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirBusy(
                    f'workdir {str(root)!r} is in use by another run; accepted: a '
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
        rev = subprocess.run(
            ['git', '-C', str(repo), 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return rev or 'unknown'


def device_info() -> dict[str, Any]:
    """The JAX backend and devices the numbers were computed on."""
    info: dict[str, Any] = {'host': platform.platform(), 'machine': platform.machine(), 'cpu_count': os.cpu_count()}
    try:
        import jax  # pylint: disable=g-import-not-at-top

        devices = jax.devices()
        info.update(
            platform=devices[0].platform,
            device_kind=devices[0].device_kind,
            device_count=len(devices),
            process_count=jax.process_count(),
        )
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
