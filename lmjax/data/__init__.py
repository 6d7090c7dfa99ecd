"""lmjax's data: documents, sentencepiece tokenizers, the Grain pipeline and prepared datasets.

Typical use::

  from lmjax import data
  tok = data.get_tokenizer(cfg.data, cfg.model.vocab_size)
  it = data.make_train_iterator(cfg, tok, process_index=i, process_count=n)
  batch, state, counts = next(it), it.get_state(), it.metrics()

``data.source`` names raw documents (``.txt``, ``.jsonl``, ``.parquet``, ``.arrayrecord``;
tokenized on the fly) or a directory written by ``tools/prepare_data.py`` (pre-tokenized,
pre-packed rows read in an order that is a function of the seed and the row alone).
"""

from lmjax.data.corpus import default_documents
from lmjax.data.packing import BATCH_KEYS, DataIterator
from lmjax.data.pipeline import (
    make_eval_dataset,
    make_eval_iterator,
    make_iterator,
    make_train_dataset,
    make_train_iterator,
)
from lmjax.data.prepared import is_prepared, prepare, read_metadata
from lmjax.data.readers import Document
from lmjax.data.sources import (
    DataError,
    SkipLog,
    iter_documents,
    load_documents,
    load_records,
    split_documents,
)
from lmjax.data.tokenizer import Tokenizer, get_tokenizer, train_tokenizer

__all__ = [
    "BATCH_KEYS",
    "DataError",
    "DataIterator",
    "Document",
    "SkipLog",
    "Tokenizer",
    "default_documents",
    "get_tokenizer",
    "is_prepared",
    "iter_documents",
    "load_documents",
    "load_records",
    "make_eval_dataset",
    "make_eval_iterator",
    "make_iterator",
    "make_train_dataset",
    "make_train_iterator",
    "prepare",
    "read_metadata",
    "split_documents",
    "train_tokenizer",
]
