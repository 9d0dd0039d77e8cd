"""Offline teacher store: run the teacher once (`potstill cache`), train many students from its outputs.

* :mod:`~potstill.store.manifest`: the manifest model, identifying settings and training-time checks.
* :mod:`~potstill.store.source`: a task's data and teacher as the writer sees them; fingerprints.
* :mod:`~potstill.store.writer`: sharded, atomic, resumable writing (``build_store``).
* :mod:`~potstill.store.reader`: verified, memory-mapped reading (``StoreReader``).
* :mod:`~potstill.store.teacher`: ``StoreTeacher``, the Teacher protocol over a store.

Formats, sizes and semantics: docs/store.md.
"""

from potstill.store.manifest import FORMATS, Manifest, load_manifest
from potstill.store.reader import StoreReader
from potstill.store.teacher import StoreTeacher

__all__ = ["FORMATS", "Manifest", "StoreReader", "StoreTeacher", "load_manifest"]
