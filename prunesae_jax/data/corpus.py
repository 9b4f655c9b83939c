"""Text sources -> documents -> tokens -> packed [n_seq, seq_len] int32 batches.

Sources (`CorpusSpec.source`, or a plain string):
  'builtin'            the offline corpus of Python's own docs (see data/builtin.py)
  'fineweb-edu'        HuggingFaceFW/fineweb-edu, sample-10BT (the paper's SAE / calibration text)
  'wikitext-2'         wikitext, wikitext-2-raw-v1 (the paper's perplexity text: its test split)
  'hf:<name>'          any HF `datasets` dataset by hub name, or 'hf:json' etc. with `hf_data_files`
  a path               a .txt / .jsonl / .parquet file, a folder of such files (a .txt file per
                       document), or a folder written by `datasets.Dataset.save_to_disk`.

Splits: 'train', 'calibration' and 'evaluation' are DISJOINT at the document level: each
document goes to exactly one of them by a sha256 hash of its key (the builtin corpus's
stable id, otherwise the document's normalised text) with fractions 0.8 / 0.1 / 0.1.
'all' takes every document. The WikiText-2 preset maps the three splits to the dataset's
own train / validation / test splits instead (evaluation = the paper's test split).

Packing follows the paper: every sequence is [BOS] + the next seq_len - 1 tokens of the
stream of documents (tokenised one by one without special tokens, joined by a blank
line), so BOS sits at position 0 of every row. Everything streams: documents are read
and tokenised one at a time and only one batch is held at once.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from prunesae_jax.data import builtin as builtin_lib
from prunesae_jax.errors import InputError, MissingFileError

SPLITS = ('train', 'calibration', 'evaluation')
SPLIT_FRACTIONS = (('train', 0.8), ('calibration', 0.1), ('evaluation', 0.1))
FILE_EXTENSIONS = ('.txt', '.jsonl', '.parquet')
# Documents are joined by a blank line in the token stream (text, not a special token).
DOC_SEPARATOR = '\n\n'


@dataclasses.dataclass(frozen=True)
class HFPreset:
    """A named HF dataset. `split_map` maps our splits to the dataset's own splits;
    when it is empty, documents of `hf_split` are assigned to our splits by hash."""

    path: str
    name: str | None
    hf_split: str
    text_field: str = 'text'
    split_map: tuple[tuple[str, str], ...] = ()
    wikitext_articles: bool = False


PRESETS = {
    'fineweb-edu': HFPreset('HuggingFaceFW/fineweb-edu', 'sample-10BT', 'train'),
    'wikitext-2': HFPreset(
        'wikitext',
        'wikitext-2-raw-v1',
        'test',
        split_map=(('train', 'train'), ('calibration', 'validation'), ('evaluation', 'test')),
        wikitext_articles=True,
    ),
}


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Where text comes from. Every public function also accepts a plain source string.

    Attributes:
      source: 'builtin' | a preset name | 'hf:<hub name>' | a local path (see module doc).
      text_field: the text column of jsonl / parquet / HF sources.
      hf_config: HF config name (e.g. 'sample-10BT'); presets fill it in.
      hf_split: HF split to read (default: the preset's, else 'train').
      hf_data_files: `data_files` for `load_dataset` on local files (e.g. source 'hf:json').
      streaming: stream HF hub datasets instead of downloading them whole.
      cache: cache root for the built-in corpus (default $PRUNESAE_CACHE or ~/.cache/prunesae_jax).
    """

    source: str = 'builtin'
    text_field: str = 'text'
    hf_config: str | None = None
    hf_split: str | None = None
    hf_data_files: str | None = None
    streaming: bool = True
    cache: str | None = None


def as_spec(corpus: str | CorpusSpec | Mapping[str, Any]) -> CorpusSpec:
    """A CorpusSpec from a spec, a source string or a dict / ConfigDict of spec fields."""
    if isinstance(corpus, CorpusSpec):
        return corpus
    if isinstance(corpus, (str, os.PathLike)):
        return CorpusSpec(source=os.fspath(corpus))
    if isinstance(corpus, Mapping) or hasattr(corpus, 'to_dict'):
        d = dict(corpus.to_dict() if hasattr(corpus, 'to_dict') else corpus)
        names = {f.name for f in dataclasses.fields(CorpusSpec)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f'unknown corpus field(s) {unknown}; accepted: {sorted(names)}')
        # Configs write '' for "the default" of the optional string fields.
        for k in ('hf_config', 'hf_split', 'hf_data_files', 'cache'):
            if d.get(k) == '':
                d[k] = None
        return CorpusSpec(**d)
    raise InputError(f'corpus={corpus!r} is not a source string, CorpusSpec or dict')


def from_config(source_cfg: Mapping[str, Any]) -> tuple[CorpusSpec, str]:
    """(CorpusSpec, split) from a study config's data source (CorpusSpec fields + 'split').

    E.g. config.data.calibration = {'source': 'builtin', 'split': 'calibration', ...};
    '' in hf_config / hf_split means the default.
    """
    d = dict(source_cfg.to_dict() if hasattr(source_cfg, 'to_dict') else source_cfg)
    split = d.pop('split', 'train')
    _check_split(split)
    return as_spec(d), split


# ---------------------------------------------------------------------------
# Split assignment.


def assign_split(key: str) -> str:
    """The split ('train' | 'calibration' | 'evaluation') of a document, by sha256 of its key."""
    u = builtin_lib.hash64('split:' + key) / 2.0**64
    acc = 0.0
    for name, frac in SPLIT_FRACTIONS:
        acc += frac
        if u < acc:
            return name
    return SPLIT_FRACTIONS[-1][0]


def _check_split(split: str) -> None:
    if split not in SPLITS + ('all',):
        raise InputError(f'split={split!r} is not one of {SPLITS + ("all",)}')


def _content_key(text: str) -> str:
    return hashlib.sha256(builtin_lib.normalise(text).encode('utf-8')).hexdigest()


def _select(docs: Iterable[str], split: str) -> Iterator[str]:
    """Keep the non-empty documents of `split`, keyed by their normalised text."""
    for text in docs:
        if text and text.strip() and (split == 'all' or assign_split(_content_key(text)) == split):
            yield text


# ---------------------------------------------------------------------------
# Local files.


def _iter_txt(path: str, one_doc: bool) -> Iterator[str]:
    """Documents of a .txt file: the whole file, or blocks separated by blank lines."""
    with open(path, encoding='utf-8') as f:
        if one_doc:
            yield f.read()
            return
        block: list[str] = []
        for line in f:
            if line.strip():
                block.append(line.rstrip('\n'))
            elif block:
                yield '\n'.join(block)
                block = []
        if block:
            yield '\n'.join(block)


def _field(record: Any, field: str, where: str) -> str:
    if not isinstance(record, Mapping) or field not in record:
        keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
        raise InputError(f'text_field={field!r} not found in {where}; it has {keys}')
    value = record[field]
    if value is None:
        return ''
    if not isinstance(value, str):
        raise InputError(f'text_field={field!r} in {where} holds {type(value).__name__}, not text (str)')
    return value


def _iter_jsonl(path: str, field: str) -> Iterator[str]:
    with open(path, encoding='utf-8') as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(
                        f'{path}:{i + 1} is not valid JSON ({e.msg}); expected one object per line'
                    ) from None
                yield _field(record, field, f'{path}:{i + 1}')


def _iter_parquet(path: str, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ImportError(f'reading {path} needs pyarrow: pip install prunesae_jax[datasets]') from None
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise InputError(f'text_field={field!r} not found in {path}; it has {pf.schema_arrow.names}')
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield _field({field: value}, field, path)


def _iter_file(path: str, field: str, one_txt_doc: bool = False) -> Iterator[str]:
    ext = os.path.splitext(path)[1].lower()
    if ext == '.txt':
        return _iter_txt(path, one_txt_doc)
    if ext == '.jsonl':
        return _iter_jsonl(path, field)
    if ext == '.parquet':
        return _iter_parquet(path, field)
    raise InputError(f'unsupported file extension {ext!r} of {path}; accepted: {FILE_EXTENSIONS}')


def _is_saved_dataset(path: str) -> bool:
    """Whether `path` is a folder written by datasets' save_to_disk."""
    return any(os.path.exists(os.path.join(path, f)) for f in ('dataset_info.json', 'state.json', 'dataset_dict.json'))


def _folder_files(path: str) -> list[str]:
    """The .txt / .jsonl / .parquet files under a folder, recursively, sorted by path."""
    files = sorted(
        f
        for f in glob.glob(os.path.join(glob.escape(path), '**', '*'), recursive=True)
        if os.path.isfile(f) and os.path.splitext(f)[1].lower() in FILE_EXTENSIONS
    )
    if not files:
        raise InputError(f'folder {path} holds no {FILE_EXTENSIONS} files and is not a datasets save_to_disk folder')
    return files


def _iter_folder(files: list[str], field: str) -> Iterator[str]:
    for f in files:
        # In a folder, each .txt file is one document.
        yield from _iter_file(f, field, one_txt_doc=True)


# ---------------------------------------------------------------------------
# HF datasets.


def _import_datasets():
    try:
        import datasets  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ImportError(
            'this corpus needs the optional `datasets` package: pip install prunesae_jax[datasets]'
        ) from None
    return datasets


def _wikitext_articles(rows: Iterable[str]) -> Iterator[str]:
    """Group WikiText rows into articles (a new one at each ' = Title = ' row).

    Rows inside an article are joined by DOC_SEPARATOR, so the concatenated stream is
    exactly the usual "\\n\\n".join(rows) of the perplexity literature.
    """
    article: list[str] = []
    for row in rows:
        if re.match(r'^ = [^=].* = \n?$', row) and any(r.strip() for r in article):
            yield DOC_SEPARATOR.join(article)
            article = []
        article.append(row)
    if any(r.strip() for r in article):
        yield DOC_SEPARATOR.join(article)


def _iter_hf(
    spec: CorpusSpec, hf_split: str | None = None, *, local_folder: str | None = None, preset: HFPreset | None = None
) -> Iterator[str]:
    datasets = _import_datasets()
    split = hf_split or spec.hf_split or (preset.hf_split if preset else 'train')
    field = preset.text_field if preset and spec.text_field == 'text' else spec.text_field
    if local_folder is not None:
        ds = datasets.load_from_disk(local_folder)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise InputError(f'hf_split={split!r} not in {local_folder}; it has {sorted(ds)}')
            ds = ds[split]
    else:
        path = preset.path if preset else spec.source[len('hf:') :]
        name = spec.hf_config or (preset.name if preset else None)
        ds = datasets.load_dataset(path, name, split=split, streaming=spec.streaming, data_files=spec.hf_data_files)
    columns = getattr(ds, 'column_names', None)
    if columns is not None and field not in columns:
        raise InputError(f'text_field={field!r} not in dataset columns {columns}')
    where = local_folder or spec.source
    rows = (_field(r, field, where) for r in ds)
    if preset is not None and preset.wikitext_articles:
        yield from _wikitext_articles(rows)
    else:
        yield from rows


# ---------------------------------------------------------------------------
# Documents.


def _looks_like_path(source: str) -> bool:
    return os.sep in source or source.startswith(('.', '~')) or os.path.splitext(source)[1] != ''


def iter_documents(corpus: str | CorpusSpec, split: str = 'train') -> Iterator[str]:
    """Stream the text documents of one split of a corpus, in a deterministic order.

    Args:
      corpus: a source string or CorpusSpec (see module doc).
      split: 'train' | 'calibration' | 'evaluation' (disjoint) | 'all'.
    Raises ValueError for an unknown source or split or an unsupported extension, and
    MissingFileError (a FileNotFoundError) for a missing path, before any document is read.
    """
    spec = as_spec(corpus)
    _check_split(split)
    src = spec.source
    if src == 'builtin':
        docs = builtin_lib.load_documents(cache=spec.cache)
        return (d.text for d in docs if split == 'all' or assign_split(d.key) == split)
    if src in PRESETS:
        _import_datasets()
        preset = PRESETS[src]
        split_map = dict(preset.split_map)
        if split_map and spec.hf_split is None:
            hf_splits = list(split_map.values()) if split == 'all' else [split_map[split]]
            return itertools.chain.from_iterable(
                (t for t in _iter_hf(spec, s, preset=preset) if t.strip()) for s in hf_splits
            )
        return _select(_iter_hf(spec, preset=preset), split)
    if src.startswith('hf:') and len(src) > 3:
        _import_datasets()  # fail here, not at the first document
        return _select(_iter_hf(spec), split)
    path = os.path.expanduser(src)
    if os.path.isdir(path):
        if _is_saved_dataset(path):
            _import_datasets()
            return _select(_iter_hf(spec, local_folder=path), split)
        return _select(_iter_folder(_folder_files(path), spec.text_field), split)
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in FILE_EXTENSIONS:
            raise InputError(f'unsupported file extension {ext!r} of {src}; accepted: {FILE_EXTENSIONS}')
        return _select(_iter_file(path, spec.text_field), split)
    if _looks_like_path(src):
        raise MissingFileError(f'corpus path {src!r} does not exist')
    raise InputError(
        f"unknown corpus source {src!r}; accepted: 'builtin', {sorted(PRESETS)}, "
        "'hf:<dataset name>', or a path to a folder or a "
        f'{"/".join(FILE_EXTENSIONS)} file'
    )


# ---------------------------------------------------------------------------
# Tokenising and packing.


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` WITHOUT special tokens (BOS is added by the packer).

    Works with transformers tokenizers, `tokenizers.Tokenizer`, sentencepiece, and any
    object whose `encode(text)` or `__call__(text)` returns ids (or an object with `.ids`
    or a mapping with 'input_ids').
    """
    if hasattr(tokenizer, 'encode'):
        try:
            out = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            out = tokenizer.encode(text)
    elif callable(tokenizer):
        try:
            out = tokenizer(text, add_special_tokens=False)
        except TypeError:
            out = tokenizer(text)
    else:
        raise InputError(f'tokenizer {type(tokenizer).__name__} has neither encode() nor __call__')
    if hasattr(out, 'ids'):
        out = out.ids
    elif isinstance(out, Mapping):
        out = out['input_ids']
    return list(out)


def bos_token_id(tokenizer: Any, bos_id: int | None = None) -> int:
    """`bos_id` if given, else the tokenizer's `bos_token_id`; a clear error when neither."""
    if bos_id is None:
        bos_id = getattr(tokenizer, 'bos_token_id', None)
    if bos_id is None or isinstance(bos_id, bool) or not isinstance(bos_id, (int, np.integer)):
        raise InputError(
            f'bos_id={bos_id!r}: tokenizer {type(tokenizer).__name__} has no integer bos_token_id; pass bos_id=<int>'
        )
    _check_bos(bos_id)
    return int(bos_id)


def iter_document_tokens(
    corpus: str | CorpusSpec,
    tokenizer: Any,
    split: str = 'train',
) -> Iterator[list[int]]:
    """Token ids of each document of `split`, each followed by the blank-line separator."""
    docs = iter_documents(corpus, split)  # bad source / split raise here, not at next()
    sep = encode(tokenizer, DOC_SEPARATOR)
    return (ids + sep for ids in (encode(tokenizer, text) for text in docs) if ids)


def _check_seq_len(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise InputError(f'seq_len={seq_len!r} is too short; need an int seq_len >= 2 (BOS + 1 token)')


def _check_count(name: str, value, allow_none: bool = False, minimum: int = 1) -> None:
    """A count argument: an int >= minimum (or None where allowed); bools and floats are refused."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        accepted = f'an int >= {minimum}' + (' or None' if allow_none else '')
        raise InputError(f'{name}={value!r}; accepted: {accepted}')


_INT32 = np.iinfo(np.int32)


def _ids(chunk: Sequence[int]) -> np.ndarray:
    """Token ids as int32, refusing what the cast would change (non-integers, ids outside int32)."""
    a = np.asarray(chunk)
    if a.size == 0:
        return np.empty(0, np.int32)
    if a.ndim != 1 or a.dtype.kind not in 'iu':
        raise InputError(f'token ids of dtype {a.dtype} and shape {a.shape}; accepted: a 1-D sequence of ints')
    lo, hi = a.min(), a.max()
    if lo < 0 or hi > _INT32.max:
        raise InputError(f'token id {int(lo if lo < 0 else hi)}; accepted: 0 <= id <= {_INT32.max}')
    return a.astype(np.int32)


def pack_sequences(
    token_chunks: Iterable[Sequence[int]],
    seq_len: int,
    bos_id: int,
) -> Iterator[np.ndarray]:
    """Pack a stream of token chunks into rows [seq_len] int32 = [BOS] + seq_len - 1 tokens.

    Tokens carry over from one row to the next; the final partial row is dropped.
    """
    _check_seq_len(seq_len)  # here, not at the first next()
    _check_bos(bos_id)
    return _pack(token_chunks, int(seq_len), int(bos_id))


def _check_bos(bos_id) -> None:
    if isinstance(bos_id, bool) or not isinstance(bos_id, (int, np.integer)) or not 0 <= bos_id <= _INT32.max:
        raise InputError(f'bos_id={bos_id!r}; accepted: a non-negative int token id')


def _pack(
    token_chunks: Iterable[Sequence[int]],
    seq_len: int,
    bos_id: int,
) -> Iterator[np.ndarray]:
    # Chunks wait in a list until they fill a row, so the work is linear in the tokens read whatever
    # seq_len is (growing one buffer chunk by chunk would copy it again for every chunk: quadratic when
    # seq_len exceeds the text, which then reads the whole corpus before it can say so).
    body = seq_len - 1
    pending: list[np.ndarray] = []
    n_pending = 0
    for chunk in token_chunks:
        ids = _ids(chunk)
        if not ids.size:
            continue
        pending.append(ids)
        n_pending += ids.size
        if n_pending < body:
            continue
        buf = np.concatenate(pending)
        n_full = len(buf) // body
        for i in range(n_full):
            row = np.empty(seq_len, np.int32)
            row[0] = bos_id
            row[1:] = buf[i * body : (i + 1) * body]
            yield row
        rest = buf[n_full * body :]
        pending, n_pending = ([rest] if rest.size else []), rest.size


def _describe(corpus: str | CorpusSpec, split: str) -> str:
    return f'split {split!r} of corpus {as_spec(corpus).source!r}'


def iter_sequences(
    corpus: str | CorpusSpec, tokenizer: Any, seq_len: int, *, split: str = 'train', bos_id: int | None = None
) -> Iterator[np.ndarray]:
    """Stream packed rows [seq_len] int32 with BOS at position 0 (see pack_sequences).

    Bad arguments raise at the call; a corpus with zero tokens, or too few for one row,
    raises ValueError when the stream is read.
    """
    _check_seq_len(seq_len)
    _check_split(split)
    bos = bos_token_id(tokenizer, bos_id)
    docs = iter_document_tokens(corpus, tokenizer, split)  # validates the source now
    return _counted_sequences(docs, int(seq_len), bos, _describe(corpus, split))


def _counted_sequences(
    docs: Iterator[list[int]],
    seq_len: int,
    bos: int,
    where: str,
) -> Iterator[np.ndarray]:
    n_tokens = 0

    def counted():
        nonlocal n_tokens
        for ids in docs:
            n_tokens += len(ids)
            yield ids

    produced = False
    for row in _pack(counted(), seq_len, bos):
        produced = True
        yield row
    if n_tokens == 0:
        raise InputError(f'{where} yields zero tokens; accepted: a source with at least {seq_len - 1} tokens of text')
    if not produced:
        raise InputError(
            f'{where} yields {n_tokens} tokens, fewer than the {seq_len - 1} that '
            f'one sequence of seq_len={seq_len} needs'
        )


def iter_batches(
    corpus: str | CorpusSpec,
    tokenizer: Any,
    seq_len: int,
    batch_size: int,
    *,
    split: str = 'train',
    bos_id: int | None = None,
    max_batches: int | None = None,
    drop_remainder: bool = True,
) -> Iterator[np.ndarray]:
    """Stream batches [batch_size, seq_len] int32 of packed sequences, BOS at column 0.

    Stops after `max_batches` batches or when the split runs out; the last, smaller
    batch is yielded only when `drop_remainder` is False.
    """
    _check_count('batch_size', batch_size)
    _check_count('max_batches', max_batches, allow_none=True)
    rows = iter_sequences(corpus, tokenizer, seq_len, split=split, bos_id=bos_id)
    return _batched(rows, batch_size, max_batches, drop_remainder)


def _batched(
    rows: Iterator[np.ndarray], batch_size: int, max_batches: int | None, drop_remainder: bool
) -> Iterator[np.ndarray]:
    n = 0
    while max_batches is None or n < max_batches:
        batch = list(itertools.islice(rows, batch_size))
        if not batch or (len(batch) < batch_size and drop_remainder):
            return
        yield np.stack(batch)
        n += 1


def take_tokens(
    corpus: str | CorpusSpec,
    tokenizer: Any,
    n_seqs: int,
    seq_len: int,
    *,
    split: str = 'train',
    bos_id: int | None = None,
) -> np.ndarray:
    """The first `n_seqs` packed sequences of a split: [n_seqs, seq_len] int32, BOS at column 0.

    Raises ValueError naming how many sequences the split holds when it has fewer.
    """
    _check_count('n_seqs', n_seqs)
    rows = list(itertools.islice(iter_sequences(corpus, tokenizer, seq_len, split=split, bos_id=bos_id), n_seqs))
    if len(rows) < n_seqs:
        raise InputError(
            f'n_seqs={n_seqs} exceeds the {len(rows)} sequences of seq_len={seq_len} '
            f'that {_describe(corpus, split)} holds'
        )
    return np.stack(rows)


def token_stream(
    corpus: str | CorpusSpec, tokenizer: Any, *, split: str = 'evaluation', max_tokens: int | None = None
) -> np.ndarray:
    """One long token stream [N] int32 of a split, WITHOUT BOS, for the perplexity protocol.

    Documents are joined by a blank line (the WikiText preset then reproduces the usual
    "\\n\\n".join of its rows); the perplexity code adds BOS to each window itself.
    `max_tokens` truncates the stream (and stops reading once reached).
    """
    _check_split(split)
    _check_count('max_tokens', max_tokens, allow_none=True)
    sep = _ids(encode(tokenizer, DOC_SEPARATOR))
    parts, n = [], 0
    for text in iter_documents(corpus, split):
        ids = _ids(encode(tokenizer, text))
        if not len(ids):
            continue
        if parts:  # separators go between documents, not after the last one
            parts.append(sep)
            n += len(sep)
        parts.append(ids)
        n += len(ids)
        if max_tokens is not None and n >= max_tokens:
            break
    if n == 0:
        raise InputError(
            f'{_describe(corpus, split)} yields zero tokens; accepted: a source with at least one token of text'
        )
    stream = np.concatenate(parts)
    return stream[:max_tokens] if max_tokens is not None else stream


def corpus_stats(
    corpus: str | CorpusSpec = 'builtin',
    tokenizer: Any = None,
) -> dict[str, dict[str, int]]:
    """Documents, characters (and tokens when a tokenizer is given) per split.

    Reads the whole corpus: meant for the built-in corpus and small local files.
    """
    stats = {}
    for split in SPLITS:
        docs = chars = toks = 0
        for text in iter_documents(corpus, split):
            docs += 1
            chars += len(text)
            if tokenizer is not None:
                toks += len(encode(tokenizer, text))
        stats[split] = {'documents': docs, 'characters': chars}
        if tokenizer is not None:
            stats[split]['tokens'] = toks
    return stats
