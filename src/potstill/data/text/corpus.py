"""The language-modelling corpus: English reference text that ships with Python itself, no download."""

from __future__ import annotations

import re

__all__ = ["pydoc_documents"]

_RULE = re.compile(r"([*=~\-^])\1{2,}")


def _clean_topic(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    # reST heading underlines and horizontal rules: lines made of one repeated character
    # ("*****", "=====", "-----").
    out = [line for line in lines if not _RULE.fullmatch(line.strip())]
    cleaned = "\n".join(out)
    cleaned = re.sub(r"\n{3,}", "\n\n", cleaned)
    return cleaned.strip()


def pydoc_documents() -> list[str]:
    """English reference text from Python's own ``pydoc_data.topics``, one document per topic.

    Topics are sorted by their key, so the order is fixed for a given Python version. Cleaning
    removes heading underlines and horizontal rules, trailing spaces and runs of blank lines;
    code examples are kept as they are. (Python 3.11 has 79 topics, about 0.46 M characters.)
    """
    from pydoc_data.topics import topics

    docs = [_clean_topic(topics[key]) for key in sorted(topics)]
    return [d for d in docs if d]
