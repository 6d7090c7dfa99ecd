"""The embedded default corpus: the Python reference manual that ships with Python.

``pydoc_data.topics`` holds the text of the language reference topics (statements,
operators, data model, ...) as used by ``help()``. It is real English prose with
code examples, about half a megabyte, and needs no download, which makes it the
default ``data.source`` for tiny CPU runs and tests.
"""

from __future__ import annotations


def default_documents() -> list[str]:
  """The reference-manual topics, one document each, in sorted-key order."""
  from pydoc_data.topics import topics  # pylint: disable=import-outside-toplevel

  docs = (topics[key].strip() for key in sorted(topics))
  return [doc for doc in docs if doc]
