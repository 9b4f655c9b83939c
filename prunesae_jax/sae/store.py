"""Activation stores: a disk-backed sharded store and an in-memory one with the same reading API.

On disk: `path/metadata.json` plus shards `path/shard_00000.npy` ([rows, d_in], float16 / bfloat16
(stored as uint16 bits) / float32), read memory-mapped. A store captured by P processes holds each
process's shards, `shard_p<p>_00000.npy` ..., listed in process order in metadata.json's
`shard_files`: the rows are in the same order as one process would have stored them. Batches are a
seeded shuffle, epoch after epoch; batch `step` is a pure function of (seed, step), so a resumed run
sees the same stream, and any process can read any part of it (`batch(..., part=)`).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from prunesae_jax import io as pio
from prunesae_jax.errors import InputError, MissingFileError, NonFiniteError

DTYPES = ('float16', 'bfloat16', 'float32')


def _save_npy_parts(path: str, parts: list[np.ndarray]) -> None:
    """np.save of np.concatenate(parts), atomically, without the concatenated copy: header, then each part."""
    shape = (sum(len(p) for p in parts),) + parts[0].shape[1:]
    header = {'descr': np.lib.format.dtype_to_descr(parts[0].dtype), 'fortran_order': False, 'shape': shape}
    with pio.atomic_file(path) as f:
        np.lib.format.write_array_header_1_0(f, header)
        for p in parts:
            f.write(np.ascontiguousarray(p).data)


def _check_count(name: str, value, minimum: int = 1) -> int:
    """A size argument as an int >= minimum; bools, floats and smaller values are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f'{name}={value!r}; accepted: an int >= {minimum}')
    return int(value)


def _check_finite(x: np.ndarray, what: str) -> None:
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise InputError(f'non-finite activation {x[tuple(bad)]} at {what} row {bad[0]}; activations must be finite')


class _Batches:
    """Shared batching logic: needs self.n_tokens, self.d_in and self._take(sorted_rows)."""

    n_tokens: int
    d_in: int

    def __len__(self) -> int:
        return self.n_tokens

    def _perm(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([int(seed), int(epoch)]).permutation(self.n_tokens)

    def batch(self, batch_size: int, seed: int, step: int, part: slice | None = None) -> np.ndarray:
        """Batch number `step` of the seeded shuffled stream: float32 [batch_size, d_in], or only
        its rows `part` (a slice of 0..batch_size: the share of the batch one process reads)."""
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, (int, np.integer))
            or not 0 < batch_size <= self.n_tokens
        ):
            raise InputError(f'batch_size={batch_size!r}; accepted: an int in 1..n_tokens={self.n_tokens}')
        _check_count('step', step, minimum=0)
        per_epoch = self.n_tokens // batch_size  # drop the ragged tail of each epoch
        epoch, j = divmod(int(step), per_epoch)
        rows = self._perm(seed, epoch)[j * batch_size : (j + 1) * batch_size]
        if part is not None:
            rows = rows[part]
        order = np.argsort(rows, kind='stable')  # sorted reads are much faster on a memmap
        out = np.empty((len(rows), self.d_in), np.float32)
        out[order] = self._take(rows[order])
        return out

    def batches(self, batch_size: int, seed: int = 0, start_step: int = 0) -> Iterator[np.ndarray]:
        """Endless iterator of shuffled float32 batches [batch_size, d_in], starting at `start_step`."""
        step = int(start_step)
        while True:
            yield self.batch(batch_size, seed, step)
            step += 1

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """n rows drawn without replacement (all rows if n >= n_tokens), float32 [n, d_in]."""
        n = min(_check_count('n', n), self.n_tokens)  # more than the store: every row
        rows = np.sort(np.random.default_rng([int(seed), 2**31 - 1]).choice(self.n_tokens, n, replace=False))
        return self._take(rows).astype(np.float32)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 (stop clamped to n_tokens) as float32."""
        start, stop = _check_count('start', start, 0), _check_count('stop', stop, 0)
        if start > min(stop, self.n_tokens):
            raise InputError(f'start={start}, stop={stop}; accepted: 0 <= start <= min(stop, n_tokens={self.n_tokens})')
        return self._take(np.arange(start, min(stop, self.n_tokens))).astype(np.float32)


class ArrayStore(_Batches):
    """In-memory activations [N, d_in] with the ActivationStore reading API."""

    def __init__(self, x, metadata: dict | None = None):
        x = np.asarray(x, np.float32)
        if x.ndim != 2:
            raise InputError(f'activations shape {x.shape}; expected [n_tokens, d_in]')
        _check_finite(x, 'in-memory activations')
        self.x = x
        self.n_tokens, self.d_in = x.shape
        self.metadata = dict(metadata or {}, n_tokens=self.n_tokens, d_in=self.d_in, dtype='float32')

    def _take(self, rows):
        return self.x[rows]


class ActivationStore(_Batches):
    """Disk-backed sharded activation store (see module docstring). `ActivationStore(path)` opens one."""

    def __init__(self, path: str):
        meta_path = os.path.join(path, 'metadata.json')
        if not os.path.exists(meta_path):
            raise MissingFileError(f'no activation store at {path!r} (missing metadata.json)')
        try:
            with open(meta_path) as f:
                self.metadata = json.load(f)
            self.d_in = _check_count('d_in', self.metadata['d_in'])
            self.dtype = self.metadata['dtype']
            self._shard_rows = [_check_count('shard_rows entry', r) for r in self.metadata['shard_rows']]
            self._files = self.metadata.get('shard_files') or [
                f'shard_{i:05d}.npy' for i in range(len(self._shard_rows))
            ]
            if len(self._files) != len(self._shard_rows) or not all(isinstance(f, str) for f in self._files):
                raise ValueError('shard_files does not list one file name per shard_rows entry')
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(
                f'activation store metadata {meta_path!r} is unreadable ({type(e).__name__}: {e}); '
                'accepted: a metadata.json written by StoreWriter'
            ) from None
        if self.dtype not in DTYPES:
            raise InputError(f'activation store {path!r} has dtype {self.dtype!r}; accepted: {DTYPES}')
        self.path = path
        self._starts = np.concatenate([[0], np.cumsum(self._shard_rows)]).astype(np.int64)
        self.n_tokens = int(self._starts[-1])
        self._maps = [None] * len(self._shard_rows)

    def _shard(self, i: int) -> np.ndarray:
        if self._maps[i] is None:
            f = os.path.join(self.path, self._files[i])
            try:
                m = np.load(f, mmap_mode='r')
            except (OSError, ValueError, EOFError) as e:  # missing or truncated shard
                raise InputError(
                    f'activation shard {f!r} is missing or damaged ({type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else ""}); accepted: a complete store'
                ) from None
            want = (self._shard_rows[i], self.d_in)
            want_dtype = {'float16': np.float16, 'bfloat16': np.uint16, 'float32': np.float32}[self.dtype]
            if m.shape != want or m.dtype != want_dtype:
                raise InputError(
                    f'activation shard {f!r} is {m.dtype} {m.shape}; metadata.json says {self.dtype} {want}'
                )
            self._maps[i] = m
        return self._maps[i]

    def _take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.d_in), np.float32)
        shard_of = np.searchsorted(self._starts, rows, side='right') - 1
        for i in np.unique(shard_of):
            sel = shard_of == i
            raw = self._shard(int(i))[rows[sel] - self._starts[i]]
            if self.dtype == 'bfloat16':
                raw = raw.view(ml_dtypes.bfloat16)
            out[sel] = raw.astype(np.float32)
        return out

    @staticmethod
    def create(
        path: str, d_in: int, dtype: str = 'float16', metadata: dict | None = None, shard_tokens: int = 2**18
    ) -> 'StoreWriter':
        """A writer for a new store at `path` (must not hold a store already)."""
        return StoreWriter(path, d_in, dtype, metadata, shard_tokens)


class StoreWriter:
    """Appends activations shard by shard; metadata.json is written last, so a store is complete or absent."""

    def __init__(self, path, d_in, dtype, metadata, shard_tokens, prefix='shard_'):
        if dtype not in DTYPES:
            raise InputError(f'dtype={dtype!r}; accepted: {DTYPES}')
        _check_count('d_in', d_in)
        # shard_tokens <= 0 would never let append() finish a shard (an endless flush loop)
        _check_count('shard_tokens', shard_tokens)
        if os.path.exists(os.path.join(path, 'metadata.json')):
            raise InputError(f'an activation store already exists at {path!r}; choose a new path')
        pio.make_dirs(path)
        self.path, self.d_in, self.dtype = path, int(d_in), dtype
        self.metadata = dict(metadata or {})
        self.shard_tokens = int(shard_tokens)
        self.prefix = prefix  # shard i is <prefix><i:05d>.npy
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self._shard_rows: list[int] = []
        self._sumsq = 0.0
        self._sum_norm = 0.0

    def append(self, x) -> None:
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise InputError(f'activations shape {x.shape}; this store expects [N, d_in={self.d_in}]')
        _check_finite(x, f'capture (after {sum(self._shard_rows) + self._buffered} stored tokens)')
        self._sum_norm += float(np.linalg.norm(x, axis=1).sum())
        # Buffered already in the store dtype (a float16 shard buffer is half a float32 one) and
        # written part by part, so the writer holds at most one shard's rows, never a second copy.
        self._buf.append(self._encode(x))
        self._buffered += len(x)
        while self._buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _encode(self, x: np.ndarray) -> np.ndarray:
        if self.dtype == 'float16':
            return x.astype(np.float16)
        if self.dtype == 'bfloat16':
            return x.astype(ml_dtypes.bfloat16).view(np.uint16)
        return x

    def _flush(self, n: int) -> None:
        parts, taken = [], 0
        while taken < n:
            p = self._buf.pop(0)
            if taken + len(p) > n:  # split the part that straddles the shard boundary
                self._buf.insert(0, p[n - taken :])
                p = p[: n - taken]
            parts.append(p)
            taken += len(p)
        _save_npy_parts(os.path.join(self.path, self.shard_name(len(self._shard_rows))), parts)
        self._shard_rows.append(n)
        self._buffered -= n

    def shard_name(self, i: int) -> str:
        return f'{self.prefix}{i:05d}.npy'

    def flush(self) -> tuple[int, float]:
        """Writes the buffered rows as the last shard; returns (rows stored, sum of their norms).
        The shards are then shard_tokens rows each, the last one the rest."""
        if self._buffered:
            self._flush(self._buffered)
        return sum(self._shard_rows), self._sum_norm

    def close(self) -> ActivationStore:
        n, sum_norm = self.flush()
        self.write_metadata([self.shard_name(i) for i in range(len(self._shard_rows))], self._shard_rows, sum_norm)
        return ActivationStore(self.path)

    def write_metadata(self, files: list[str], rows: list[int], sum_norm: float) -> None:
        """metadata.json, written last, for shards `files` of `rows` rows (this writer's own, or
        every process's in process order); it completes the store."""
        n = sum(rows)
        if n == 0:
            raise InputError(f'no activations were appended to the store at {self.path!r}')
        meta = dict(self.metadata, n_tokens=n, d_in=self.d_in, dtype=self.dtype, shard_rows=list(rows))
        meta['mean_norm'] = sum_norm / n
        if files != [f'shard_{i:05d}.npy' for i in range(len(rows))]:
            meta['shard_files'] = list(files)
        # sorted keys, indent 1, no trailing newline: the bytes of every store written so far
        pio.atomic_write_text(os.path.join(self.path, 'metadata.json'), json.dumps(meta, indent=1, sort_keys=True))


def capture_activations(
    model_cfg,
    params,
    token_batches,
    layer: int,
    path: str | None = None,
    masks=None,
    attention_masks=None,
    model_id: str = '',
    mask_id: str = 'dense',
    exclude_bos: bool = True,
    dtype: str = 'float16',
    batch_size: int = 8,
    shard_tokens: int = 2**18,
    on_batch: Callable[[int, int], None] | None = None,
):
    """Capture resid_post of block `layer` for every real token and store it.

    token_batches: int [n_seq, T] (or a list of such arrays); attention_masks: matching 0/1 arrays
    or None (every token real: the forward runs without a mask). masks: pruning masks applied to
    params first (None = dense). Params placed on a ('data', 'model') mesh (prunesae_jax.sharding)
    run there, each batch split over 'data'. BOS positions (position 0) are skipped when exclude_bos, as their
    huge norm dominates SAE training. The sequences are run batch_size at a time; after batch `step`
    (0-based) is stored, on_batch(step, n_batches) is called (a progress bar, say).
    path=None returns an in-memory ArrayStore (the one-pass capture+train mode); otherwise an
    ActivationStore on disk with layer/model_id/mask_id/token count in its metadata.
    A batch whose real tokens' resid_post is not finite raises NonFiniteError (stage 'capture', the
    layer, step = the batch); what was written to `path` by then is left for the caller to remove.
    """
    import jax  # noqa: PLC0415

    from prunesae_jax import models, sharding  # noqa: PLC0415

    if masks is not None:
        from prunesae_jax.pruning.masks import apply_masks  # noqa: PLC0415

        params = apply_masks(params, masks)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < model_cfg.num_layers:
        raise InputError(f'layer={layer!r}; accepted: an int in 0..{model_cfg.num_layers - 1}')
    layer = int(layer)
    batch_size = _check_count('batch_size', batch_size)  # more than the sequences: one batch
    _check_count('shard_tokens', shard_tokens)
    toks = token_batches if isinstance(token_batches, (list, tuple)) else [token_batches]
    toks = [np.asarray(t) for t in toks]
    if not toks or any(t.ndim != 2 for t in toks) or len({t.shape[1] for t in toks}) != 1:
        raise InputError(
            f'token_batches shapes {[t.shape for t in toks]}; accepted: [n_seq, T] int arrays (or a '
            'list of them) with one T'
        )
    for t in toks:  # ids checked before the int32 cast, so nothing wraps around
        models.decoder.check_token_ids(model_cfg, t, what='token_batches')
    toks = np.concatenate([t.astype(np.int32) for t in toks])
    if toks.shape[0] < 1 or toks.shape[1] < 1:
        raise InputError(f'token_batches shape {toks.shape}; accepted: at least one sequence of at least one token')
    am = None
    if attention_masks is not None:
        ams = attention_masks if isinstance(attention_masks, (list, tuple)) else [attention_masks]
        am = np.concatenate([np.asarray(a, np.int32) for a in ams])
        if am.shape != toks.shape:
            raise InputError(f'attention_masks shape {am.shape} differs from tokens shape {toks.shape}')

    # resid_post is jitted with its compilation cached per (config, layers, shape), so repeated captures
    # (one per mask, per model) reuse it; an outer jax.jit here would recompile every call.
    mesh = sharding.placed_mesh(params)

    def resid(t, m):
        """resid_post of the batch, float32 [b, T, D] on the host."""
        if m is None:
            return sharding.layer_activations(model_cfg, params, t, layer, len(t))
        if mesh is None:
            return np.asarray(models.resid_post(model_cfg, params, t, m, layers=(layer,))[layer], np.float32)
        h = sharding.resid_post(model_cfg, params, t, m, layers=(layer,), mesh=mesh)[layer]
        return sharding.host_array(h).astype(np.float32)

    meta = dict(
        layer=layer,
        model_id=model_id,
        mask_id=mask_id,
        exclude_bos=exclude_bos,
        seq_len=int(toks.shape[1]),
        n_sequences=int(toks.shape[0]),
    )
    n_batches = -(-len(toks) // batch_size)
    # Several processes (jax.distributed) each capture their contiguous share of the batches into
    # their own shards of the one store; one process captures them all.
    count = 1 if path is None else jax.process_count()
    mine = sharding.process_share(n_batches) if count > 1 else slice(None)
    prefix = _process_prefix(jax.process_index()) if count > 1 else 'shard_'
    writer = None
    if path is not None:
        writer = StoreWriter(path, model_cfg.hidden_size, dtype, meta, shard_tokens, prefix)
    chunks = []
    for step in range(n_batches)[mine]:
        t = toks[step * batch_size : (step + 1) * batch_size]
        m = None if am is None else am[step * batch_size : (step + 1) * batch_size]
        h = resid(t, m)  # [b, T, D]
        real = h if m is None else h[m.astype(bool)]
        if not np.isfinite(real).all():
            raise NonFiniteError(
                'resid_post activations',
                stage='capture',
                layer=layer,
                step=step,
                detail=f'capture batch of {batch_size} sequences',
            )
        if m is None:
            rows = (h[:, 1:] if exclude_bos else h).reshape(-1, h.shape[-1])
        else:
            keep = m.astype(bool)
            if exclude_bos:
                keep[:, 0] = False
            rows = h[keep]
        if writer is None:
            chunks.append(rows)
        else:
            writer.append(rows)
        if on_batch is not None:
            on_batch(step, n_batches)
    if writer is None:
        return ArrayStore(np.concatenate(chunks), meta)
    if count == 1:
        return writer.close()
    return _close_shared(writer, count)


def _process_prefix(p: int) -> str:
    """The shard names of process p in a store captured by several processes."""
    return f'shard_p{p:05d}_'


def _close_shared(writer: StoreWriter, count: int) -> ActivationStore:
    """Completes a store that `count` processes captured into: each process writes its last shard,
    process 0 lists every process's shards (their rows follow from each process's total, see
    StoreWriter.flush) in metadata.json, and every process opens the store once it exists."""
    from jax.experimental import multihost_utils  # noqa: PLC0415

    from prunesae_jax import sharding  # noqa: PLC0415

    n, sum_norm = writer.flush()
    totals = np.asarray(multihost_utils.process_allgather(np.asarray([n, sum_norm], np.float64))).reshape(count, 2)
    if sharding.is_main():
        files, rows = [], []
        for p, (n_p, _) in enumerate(totals):
            full, rest = divmod(int(n_p), writer.shard_tokens)
            sizes = [writer.shard_tokens] * full + ([rest] if rest else [])
            files += [f'{_process_prefix(p)}{i:05d}.npy' for i in range(len(sizes))]
            rows += sizes
        writer.write_metadata(files, rows, float(totals[:, 1].sum()))
    sharding.barrier('activation store complete')
    return ActivationStore(writer.path)
