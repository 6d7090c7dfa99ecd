"""lmjax's data: documents, tokenizers, the Grain pipeline and prepared datasets.

One entry point, whatever ``cfg.data`` names::

  from lmjax import data
  tok = data.get_tokenizer(cfg.data, cfg.model.vocab_size)
  it = data.make_iterator(cfg, tok, split="train", process_index=i, process_count=n)
  batch, state, counts = next(it), it.get_state(), it.metrics()
  held_out = data.make_iterator(cfg, tok, split="eval")  # finite

``data.source`` names raw documents (``.txt``, ``.jsonl``, ``.parquet``, ``.arrayrecord``;
tokenized on the fly), a directory written by :func:`prepare` / ``tools/prepare_data.py``
(pre-tokenized, pre-packed rows read in an order that is a function of the seed and the
row alone), or, with ``data.format="prompt_response"``, prompt/response pairs. Sources,
prepared directories and tokenizer files may be local paths or ``gs://`` / ``s3://`` URLs
(:mod:`lmjax.storage`).

Modules, bottom up: ``readers`` (one per file format; :class:`DataError`), ``corpus``,
``sources`` (what a source names, the bad-record policy, the held-out split), ``packing``,
``tokenizer_base`` (:class:`Tokenizer` and its loader, any kind of file), ``tokenizer``
(sentencepiece), ``tokenizer_bpe`` (``tokenizer.json``, tiktoken), ``tokenizer_train``
(byte-level BPE training), ``prepared_format`` / ``prepared_writer`` / ``prepared_reader``,
``finetune``, and ``pipeline`` (:func:`make_iterator`, :func:`get_tokenizer`).
"""

from lmjax.data.corpus import default_documents
from lmjax.data.packing import BATCH_KEYS, DataIterator
from lmjax.data.pipeline import get_tokenizer, make_iterator
from lmjax.data.prepared_format import read_metadata
from lmjax.data.prepared_writer import prepare
from lmjax.data.readers import DataError, Document
from lmjax.data.sources import (
    SkipLog,
    is_prepared,
    iter_documents,
    load_documents,
    load_records,
    split_documents,
)
from lmjax.data.tokenizer import Tokenizer, train_tokenizer
from lmjax.data.tokenizer_bpe import HFTokenizer, TiktokenTokenizer
from lmjax.data.tokenizer_train import train_bpe_tokenizer

__all__ = [
    "BATCH_KEYS",
    "DataError",
    "DataIterator",
    "Document",
    "SkipLog",
    "HFTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "default_documents",
    "get_tokenizer",
    "is_prepared",
    "iter_documents",
    "load_documents",
    "load_records",
    "make_iterator",
    "prepare",
    "read_metadata",
    "split_documents",
    "train_bpe_tokenizer",
    "train_tokenizer",
]
