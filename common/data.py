"""Load the user's CSV / JSON / JSONL files into `datasets` (Arrow, memory-mapped, cached),
and read raw texts from txt / JSONL / CSV files (the one text reader: whole files or byte
ranges). Tokenised text for language-model training lives in common/shards.py.

Inputs are given as a file, a folder (every data file under it) or a glob. Before the
files reach `datasets`, each one is checked so that a mistake ends with one clear message
naming the file: not found, empty, not UTF-8 (with the line), or missing a column.
"""

from __future__ import annotations

import codecs
import csv
import glob
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from common.errors import UserError

EXTENSIONS = {".csv": "csv", ".json": "json", ".jsonl": "json"}
_CHUNK = 1 << 20


def resolve_files(specs: str | Sequence[str], extensions: Iterable[str] = EXTENSIONS) -> list[Path]:
    """Expand files, folders (recursively) and globs into a sorted list of data files."""
    if isinstance(specs, (str, Path)):
        specs = [specs]
    extensions = tuple(extensions)
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
            if not found:
                raise UserError(f"{path}: folder holds no {'/'.join(extensions)} files")
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
            if not found:
                raise UserError(f"{spec}: no such file, folder or matching glob")
        files.extend(found)
    unsupported = [f for f in files if f.suffix.lower() not in extensions]
    if unsupported:
        raise UserError(f"{unsupported[0]}: unsupported file type (expected {', '.join(extensions)})")
    return list(dict.fromkeys(files))


def check_utf8(path: Path) -> None:
    """Fail with the line number of the first byte sequence that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                line += chunk[: err.start].count(b"\n")
                raise UserError(
                    f"{path}: line {line} is not valid UTF-8 (byte {chunk[err.start]:#04x}); "
                    "save the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8`)"
                ) from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"{path}: ends in a truncated UTF-8 character") from None


def read_lines(path: str | Path) -> list[str]:
    """The non-empty, stripped lines of a UTF-8 text file (prompts, texts to classify...)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    check_utf8(path)
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_columns(path: Path) -> list[str]:
    """The column names of a CSV header or of the first JSON(L) record."""
    try:
        return _read_columns(path)
    except UnicodeDecodeError:  # (text is decoded in blocks: the bad line may come after the header)
        check_utf8(path)  # names the line
        raise


def _read_columns(path: Path) -> list[str]:
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), None)
        if not header or not any(h.strip() for h in header):
            raise UserError(f"{path}: empty file (expected a CSV header line)")
        return [h.strip() for h in header]
    with path.open(encoding="utf-8-sig") as f:
        if path.suffix.lower() == ".jsonl":
            first = next((ln for ln in f if ln.strip()), None)
            if first is None:
                raise UserError(f"{path}: empty file (expected one JSON object per line)")
            try:
                record = json.loads(first)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: first record is not valid JSON: {err}") from None
        else:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: not valid JSON: {err}") from None
            if not isinstance(data, list) or not data:
                raise UserError(f"{path}: expected a non-empty JSON list of objects")
            record = data[0]
    if not isinstance(record, dict):
        raise UserError(f"{path}: expected JSON objects with named fields, got {type(record).__name__}")
    return list(record)


def check_file(path: Path, required_columns: Sequence[str] = ()) -> None:
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file")
    check_utf8(path)
    check_columns(path, required_columns)


def check_columns(path: Path, required_columns: Sequence[str]) -> None:
    """A missing column, named with the columns the file has (reads the header only)."""
    columns = read_columns(path)
    missing = [c for c in required_columns if c not in columns]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'} "
            f"(expected {', '.join(required_columns)})"
        )


def load_files(
    data_files: dict[str, str | Sequence[str]] | str | Sequence[str],
    required_columns: Sequence[str] = (),
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Load `{split: file/folder/glob}` (or one spec, giving the split "train").

    Each split's files must be of one kind (all CSV or all JSON/JSONL). Only the required
    columns are kept, so files with extra columns load together.
    """
    if not isinstance(data_files, dict):
        data_files = {"train": data_files}
    resolved: dict[str, list[str]] = {}
    builders = set()
    for split, spec in data_files.items():
        files = resolve_files(spec)
        for f in files:
            check_file(f, required_columns)
        kinds = {EXTENSIONS[f.suffix.lower()] for f in files}
        if len(kinds) > 1:
            raise UserError(f"split '{split}' mixes CSV and JSON files; use one format per split")
        builders |= kinds
        resolved[split] = [str(f) for f in files]
    if len(builders) > 1:
        raise UserError("all splits must use one format (CSV or JSON/JSONL)")
    builder = builders.pop()
    kwargs = {"keep_default_na": False} if builder == "csv" else {}
    try:
        loaded = datasets.load_dataset(builder, data_files=resolved, cache_dir=cache_dir, **kwargs)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as err:
        cause = err.__cause__ or err
        raise UserError(f"cannot read {', '.join(sum(resolved.values(), []))}: {cause}") from None
    if required_columns:
        loaded = loaded.select_columns(list(required_columns))
    return loaded


# ------------------------------------------------------------------------ reading texts
# The one reader of raw text files: whole files, or byte ranges of a large one (the work units
# model_clm's prepare_data.py hands to its processes), never all in memory.
TEXT_EXTENSIONS = (".txt", ".jsonl", ".csv")


def make_units(files: Sequence[Path], unit_bytes: int) -> list[dict]:
    """Cut the input into work units: byte ranges of txt / JSONL files, whole CSV files."""
    units = []
    for path in files:
        size = path.stat().st_size
        if path.suffix.lower() == ".csv" or size <= unit_bytes:
            units.append({"file": str(path), "start": 0, "end": size})
        else:
            units.extend({"file": str(path), "start": s, "end": min(s + unit_bytes, size)}
                         for s in range(0, size, unit_bytes))
    return units


def unit_texts(unit: dict, column: str | None) -> Iterator[str]:
    """The texts of one unit. A byte range owns every line that starts inside it."""
    path = Path(unit["file"])
    suffix = path.suffix.lower()
    if suffix == ".csv":
        column = column or "content"
        check_columns(path, [column])  # the header only: each pass over a large corpus reads the file once
        try:
            for chunk in pd.read_csv(path, usecols=[column], dtype=str, keep_default_na=False,
                                     chunksize=10_000, encoding="utf-8-sig"):
                yield from chunk[column]
        except UnicodeDecodeError:
            check_utf8(path)  # names the line
            raise
        except (pd.errors.ParserError, ValueError) as err:
            raise UserError(f"{path}: not a well-formed CSV with a '{column}' column: {err}") from None
        return
    column = column or "text"
    line_number = 0 if unit["start"] == 0 else None  # known when the unit starts the file

    def where(offset: int) -> str:
        return f"line {line_number} (byte {offset})" if line_number else f"the line at byte {offset}"

    with path.open("rb") as f:
        if unit["start"] > 0:
            f.seek(unit["start"] - 1)
            f.readline()  # the rest of a line that started in the previous unit
        while f.tell() < unit["end"]:
            offset = f.tell()
            raw = f.readline()
            if not raw:
                break
            if line_number is not None:
                line_number += 1
            try:
                line = raw.decode("utf-8-sig" if offset == 0 else "utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}: {where(offset)} is not valid UTF-8; save the file as "
                                "UTF-8 (e.g. `iconv -f GBK -t UTF-8`)") from None
            if suffix == ".txt":
                yield line
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: {where(offset)} is not valid JSON: {err}") from None
            if not isinstance(record, dict) or column not in record:
                raise UserError(f"{path}: {where(offset)} has no field '{column}'")
            yield "" if record[column] is None else str(record[column])


def file_texts(path: Path, column: str | None = None) -> Iterator[str]:
    """The texts of one whole file (txt lines, JSONL `column` or `text`, CSV `column` or `content`)."""
    yield from unit_texts({"file": str(path), "start": 0, "end": path.stat().st_size}, column)


def token_dtype(vocab_size: int) -> np.dtype:
    """How token ids are stored (common/shards.py): uint16 when the vocabulary fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def corpus_texts(specs: list[str], column: str | None = None) -> Iterator[str]:
    """Texts of files / folders / globs (.txt lines, .jsonl `column` or `text`, .csv `column` or
    `content`), or of the built-in corpora: `builtin` (People's Daily, then the reviews), `builtin:news`,
    `builtin:reviews`."""
    if specs and all(s in ("builtin", "builtin:news", "builtin:reviews") for s in specs):
        from common.corpora import load_peoples_daily, load_reviews

        if {"builtin", "builtin:news"} & set(specs):
            yield from load_peoples_daily()
        if {"builtin", "builtin:reviews"} & set(specs):
            yield from (text for text, _ in load_reviews())
        return
    files = resolve_files(specs, extensions=(".txt", ".jsonl", ".json", ".csv"))
    if not files:
        raise UserError(f"no .txt / .jsonl / .csv files in {specs}")
    for unit in make_units(files, 1 << 60):
        yield from (t.strip() for t in unit_texts(unit, column) if t.strip())


def split_held_out(texts: list[str], ratio: float, seed: int) -> tuple[list[str], list[str]]:
    """(kept, held out): a seeded random `ratio` of the texts held out."""
    order = np.random.default_rng(seed).permutation(len(texts))
    cut = int(round(len(texts) * ratio))
    return [texts[i] for i in order[cut:]], [texts[i] for i in order[:cut]]
