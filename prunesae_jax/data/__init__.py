"""Text corpora and packed token batches ([n_seq, seq_len] int32, BOS at column 0)."""

from prunesae_jax.data.builtin import STDLIB_MODULES, Document, load_documents
from prunesae_jax.data.corpus import (
    DOC_SEPARATOR,
    PRESETS,
    SPLIT_FRACTIONS,
    SPLITS,
    CorpusSpec,
    as_spec,
    assign_split,
    bos_token_id,
    corpus_stats,
    encode,
    from_config,
    iter_batches,
    iter_document_tokens,
    iter_documents,
    iter_sequences,
    pack_sequences,
    take_tokens,
    token_stream,
)

__all__ = [
    'DOC_SEPARATOR', 'PRESETS', 'SPLIT_FRACTIONS', 'SPLITS', 'STDLIB_MODULES', 'CorpusSpec',
    'Document', 'as_spec', 'assign_split', 'bos_token_id', 'corpus_stats', 'encode', 'from_config',
    'iter_batches', 'iter_document_tokens', 'iter_documents', 'iter_sequences',
    'load_documents', 'pack_sequences', 'take_tokens', 'token_stream',
]
