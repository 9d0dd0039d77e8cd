"""Offline teacher store: run the teacher once (`potstill store`), train many students from its outputs.

* :mod:`~potstill.store.manifest`: the manifest model, identifying settings and training-time checks.
* :mod:`~potstill.store.source`: a task's data and teacher as the writer sees them.

The Teacher over a store is :class:`potstill.teachers.store.StoreTeacher`.
* :mod:`~potstill.store.writer`: sharded, atomic, resumable writing (``build_store``).
* :mod:`~potstill.store.reader`: verified, memory-mapped reading (``StoreReader``).

Formats, sizes and semantics: docs/store.md.
"""

from potstill.store.manifest import FORMATS, Manifest, load_manifest
from potstill.store.reader import StoreReader

__all__ = ["FORMATS", "Manifest", "StoreReader", "load_manifest"]
