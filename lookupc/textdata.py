"""English text from the Python standard library's docstrings, offline and deterministic.

The docstrings are read with :mod:`ast` from the stdlib source files (nothing is
imported, so no module side effects), in sorted file order. They serve as
calibration and evaluation text for distillation (:func:`docstring_sentences`)
and as a small training corpus (:func:`docstring_corpus`).
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sysconfig
from functools import lru_cache

from .errors import LookupcInputError

__all__ = ["stdlib_docstrings", "docstring_sentences", "docstring_corpus", "split_sentences"]

# Packages whose sources are tests, GUIs or vendored code rather than documentation.
_SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages",
              "ensurepip", "venv", "__pycache__", "unittest", "distutils", "pydoc_data"}
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]][.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z]{2,}")


def _stdlib_files(root: str) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return files


def _docstrings_of(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            out.append(doc)
    return out


@lru_cache(maxsize=2)
def stdlib_docstrings(root: str | None = None) -> tuple[str, ...]:
    """All docstrings (module, class, function) of the stdlib sources under ``root``.

    Parameters
    ----------
    root : str, optional
        The stdlib directory; defaults to ``sysconfig.get_paths()["stdlib"]``.
    """
    root = root or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"stdlib directory {root!r} not found")
    docs: list[str] = []
    for path in _stdlib_files(root):
        docs.extend(_docstrings_of(path))
    return tuple(docs)


def split_sentences(text: str) -> list[str]:
    """Prose sentences of one docstring: paragraphs joined, code/doctest lines dropped."""
    sentences = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.splitlines()]
        if any(ln.startswith((">>>", "...", "$", "#")) for ln in lines):
            continue
        flat = " ".join(ln for ln in lines if ln)
        sentences.extend(s.strip() for s in _SENTENCE_END.split(flat))
    return sentences


def _is_prose(s: str, min_words: int, max_words: int) -> bool:
    words = s.split()
    if not min_words <= len(words) <= max_words or not s[0].isupper():
        return False
    letters = sum(len(w) for w in _WORD.findall(s))
    return letters >= 0.6 * len(s) and s[-1] in ".!?:"


@lru_cache(maxsize=8)
def _all_sentences(min_words: int, max_words: int) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for doc in stdlib_docstrings():
        for s in split_sentences(doc):
            if _is_prose(s, min_words, max_words):
                seen.setdefault(s, None)
    # A stable pseudo-random order (independent of file order), so that any prefix is a
    # sample of the whole library and two disjoint slices are two disjoint samples.
    return tuple(sorted(seen, key=lambda s: hashlib.sha1(s.encode()).hexdigest()))


def docstring_sentences(n: int | None = None, *, offset: int = 0, min_words: int = 6,
                        max_words: int = 40) -> list[str]:
    """Distinct English sentences from stdlib docstrings, in a fixed shuffled order.

    ``docstring_sentences(2000)`` and ``docstring_sentences(500, offset=2000)`` are
    disjoint (use them as calibration and held-out sets).

    Parameters
    ----------
    n : int, optional
        How many sentences (all from ``offset`` on if omitted).
    offset : int
        Index of the first sentence returned.
    min_words, max_words : int
        Keep sentences with this many words.

    Examples
    --------
    >>> calib, held_out = docstring_sentences(100), docstring_sentences(50, offset=100)
    >>> set(calib).isdisjoint(held_out)
    True
    """
    if offset < 0 or (n is not None and n < 0):
        raise LookupcInputError(f"n and offset must be >= 0, got n={n!r}, offset={offset!r}")
    pool = _all_sentences(min_words, max_words)
    end = len(pool) if n is None else offset + n
    if end > len(pool):
        raise LookupcInputError(f"asked for sentences {offset}..{end} but only {len(pool)} exist")
    return list(pool[offset:end])


def docstring_corpus(max_chars: int | None = None) -> str:
    """The stdlib docstrings joined by blank lines (a plain-text training corpus)."""
    text = "\n\n".join(stdlib_docstrings())
    return text if max_chars is None else text[:max_chars]
