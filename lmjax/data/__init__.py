"""lmjax's data: documents, sentencepiece tokenizers and the Grain pipeline.

Typical use::

  from lmjax import data
  tok = data.get_tokenizer(cfg.data, cfg.model.vocab_size)
  it = data.make_train_iterator(cfg, tok, process_index=i, process_count=n)
"""

from lmjax.data.corpus import default_documents
from lmjax.data.pipeline import (
    BATCH_KEYS,
    make_eval_dataset,
    make_eval_iterator,
    make_train_dataset,
    make_train_iterator,
)
from lmjax.data.sources import DataError, load_documents, split_documents
from lmjax.data.tokenizer import Tokenizer, get_tokenizer, train_tokenizer

__all__ = [
    "BATCH_KEYS",
    "DataError",
    "Tokenizer",
    "default_documents",
    "get_tokenizer",
    "load_documents",
    "make_eval_dataset",
    "make_eval_iterator",
    "make_train_dataset",
    "make_train_iterator",
    "split_documents",
    "train_tokenizer",
]
