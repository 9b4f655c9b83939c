"""Size arguments and token ids of the data stage, checked at the call (direct library calls)."""

import numpy as np
import pytest

from prunesae_jax import data
from prunesae_jax.errors import InputError

BOS = 1


class ByteTokenizer:
    bos_token_id = BOS

    def encode(self, text, add_special_tokens=True):
        return ([BOS] if add_special_tokens else []) + [b + 3 for b in text.encode('utf-8')]


class NegativeTokenizer(ByteTokenizer):
    def encode(self, text, add_special_tokens=True):
        return [-2] + super().encode(text, add_special_tokens)


def test_packing_is_linear_when_seq_len_exceeds_the_text(monkeypatch):
    """seq_len larger than the corpus: the packer must read it once, not re-copy a growing buffer per chunk."""
    copied = []
    real = np.concatenate

    def counting(arrays, *a, **k):
        out = real(arrays, *a, **k)
        copied.append(out.size)
        return out

    monkeypatch.setattr(np, 'concatenate', counting)
    chunks = [[5] * 10 for _ in range(2000)]  # 20,000 tokens
    rows = data.pack_sequences(iter(chunks), 10**6, bos_id=BOS)
    assert list(rows) == []
    assert sum(copied) <= 3 * 20_000  # the old packer copied ~2000 * 20,000 / 2 = 2e7 elements
    copied.clear()
    rows = list(data.pack_sequences(iter(chunks), 101, bos_id=BOS))
    assert len(rows) == 200 and all(r[0] == BOS and (r[1:] == 5).all() for r in rows)
    assert sum(copied) <= 3 * 20_000


@pytest.mark.parametrize(
    'call,match',
    [
        (lambda tok, src: data.take_tokens(src, tok, 2.5, 8, split='all'), r'n_seqs=2.5; accepted: an int >= 1'),
        (lambda tok, src: data.take_tokens(src, tok, True, 8, split='all'), r'n_seqs=True'),
        (lambda tok, src: data.iter_batches(src, tok, 8, 2, max_batches=-1, split='all'), r'max_batches=-1'),
        (lambda tok, src: data.iter_batches(src, tok, 8, 2.0, split='all'), r'batch_size=2.0'),
        (lambda tok, src: data.token_stream(src, tok, split='all', max_tokens=2.5), r'max_tokens=2.5'),
        (lambda tok, src: data.take_tokens(src, tok, 1, 8, split='all', bos_id=-1), r'bos_id=-1'),
    ],
)
def test_count_arguments_are_checked(tmp_path, call, match):
    (tmp_path / 'a.txt').write_text('some text ' * 50)
    with pytest.raises(InputError, match=match):
        call(ByteTokenizer(), str(tmp_path / 'a.txt'))


def test_negative_token_ids_from_a_tokenizer_are_refused(tmp_path):
    (tmp_path / 'a.txt').write_text('some text ' * 50)
    with pytest.raises(InputError, match=r'token id -2; accepted: 0 <= id'):
        data.take_tokens(str(tmp_path / 'a.txt'), NegativeTokenizer(), 2, 8, split='all')
    with pytest.raises(InputError, match=r'token id -2'):
        data.token_stream(str(tmp_path / 'a.txt'), NegativeTokenizer(), split='all')
