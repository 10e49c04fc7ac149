"""Token shards: a tokenised corpus of any size as memory-mapped files, and the datasets
that read training blocks from them (one source, or several mixed by a weight schedule).

Layout of one prepared source (`write_token_shards`):

    <dir>/index.json         dtype, vocabulary, eos id, the work units and which are done
    <dir>/train/00042.bin    token ids back to back, every document followed by eos
    <dir>/valid/00042.bin    the held-out documents of the same unit
    <dir>/tokenizer/         the tokenizer the ids belong to

The input files are cut into work units of about `unit_bytes` at line boundaries (txt,
JSONL; a CSV file is one unit, as quoted fields may hold newlines). A worker process reads
its unit, cleans and tokenises it in batches and writes the unit's two shards itself, so
no text or token crosses between processes and memory does not grow with the input. A
shard is written under a temporary name and renamed when whole; index.json records each
finished unit, so a rerun after an interruption skips finished units and redoes a
half-written one. Documents go to valid by a seeded hash of their text (the same document
always lands on the same side, whatever the worker count).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.data import (
    TEXT_EXTENSIONS,
    check_file,
    make_units,
    resolve_files,
    token_dtype,
    unit_texts,
)
from common.errors import UserError

logger = logging.getLogger(__name__)
FORMAT = 1


# ------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class ShardOptions:
    min_chars: int = 5
    valid_ratio: float = 0.01
    seed: int = 42
    dedup: bool = False
    text_column: str | None = None  # CSV default `content`, JSONL default `text`
    unit_bytes: int = 32 << 20
    batch_size: int = 1000  # documents per tokenizer call


def clean_documents(unit: dict, options: ShardOptions, counts: dict) -> Iterator[str]:
    """The kept documents of a unit: full-width spaces to spaces, stripped, empty and short ones
    dropped (and counted in `counts`)."""
    for raw in unit_texts(unit, options.text_column):
        counts["documents_read"] += 1
        text = raw.replace("\u3000", " ").strip()
        if not text:
            counts["dropped_empty"] += 1
        elif len(text) < options.min_chars:
            counts["dropped_too_short"] += 1
        else:
            yield text


def _hash(text: str, seed: int) -> int:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little")


def split_of(text: str, options: ShardOptions) -> str:
    """"valid" for a seeded-hash `valid_ratio` share of the documents, else "train"."""
    return "valid" if _hash(text, options.seed + 1) < int(options.valid_ratio * 2**64) else "train"


def train_documents(inputs: Sequence[str | Path], options: ShardOptions) -> Iterator[str]:
    """The documents `write_token_shards` would put in the train split (before deduplication):
    what a tokenizer learns from, so that held-out text stays unseen."""
    for unit in make_units(resolve_files(inputs, extensions=TEXT_EXTENSIONS), 1 << 62):
        yield from (text for text in clean_documents(unit, options, _new_counts())
                    if split_of(text, options) == "train")


def source_file(path: Path, texts: Sequence[str]) -> Path:
    """Built-in texts as a .txt input, one document per line, written once: rewriting it would
    change its time and void a resumable run."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(text.replace("\n", " ") for text in texts) + "\n", encoding="utf-8")
    return path


def _new_counts() -> dict:
    return dict.fromkeys(("documents_read", "dropped_empty", "dropped_too_short", "dropped_duplicate",
                          "train_documents", "valid_documents", "train_tokens", "valid_tokens"), 0)


def _unit_hashes(unit: dict, options: ShardOptions) -> np.ndarray:
    """Pass 1 of deduplication: the hash of every kept document of a unit, in order."""
    return np.fromiter((_hash(text, options.seed) for text in clean_documents(unit, options, _new_counts())),
                       dtype=np.uint64)


_TOKENIZER = None


def batch_encoder(tokenizer):
    """texts -> token ids without special tokens. For a fast tokenizer, its Rust backend's
    `encode_batch_fast` (no offsets, no BatchEncoding): the same ids as `tokenizer(texts)`,
    about 1.5x faster here."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]


def _init_worker(tokenizer_dir: str) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, add_special_tokens=False)
    _TOKENIZER = (batch_encoder(tokenizer), tokenizer.eos_token_id)


def _write_unit(out: str, unit_id: int, unit: dict, options: ShardOptions, dtype: str,
                keep: np.ndarray | None) -> dict:
    """Clean, tokenise and write one unit's train and valid shards; returns its counts."""
    (encode, eos), counts = _TOKENIZER, _new_counts()
    paths = {split: Path(out) / split / f"{unit_id:05d}.bin" for split in ("train", "valid")}
    files = {split: path.with_suffix(".tmp").open("wb") for split, path in paths.items()}

    def flush(batch: list[str], splits: list[str]) -> None:
        for split in ("train", "valid"):
            texts = [text for text, s in zip(batch, splits) if s == split]
            if not texts:
                continue
            ids = encode(texts)
            for doc in ids:
                doc.append(eos)
            array = np.array(list(itertools.chain.from_iterable(ids)), dtype=dtype)
            files[split].write(array.tobytes())
            counts[f"{split}_documents"] += len(ids)
            counts[f"{split}_tokens"] += len(array)

    try:
        batch, splits = [], []
        for position, text in enumerate(clean_documents(unit, options, counts)):
            if keep is not None and not keep[position]:
                counts["dropped_duplicate"] += 1
                continue
            batch.append(text)
            splits.append(split_of(text, options))
            if len(batch) == options.batch_size:
                flush(batch, splits)
                batch, splits = [], []
        flush(batch, splits)
    finally:
        for f in files.values():
            f.close()
    for path in paths.values():
        os.replace(path.with_suffix(".tmp"), path)  # whole, or not there at all
    counts["bytes"] = unit["end"] - unit["start"]
    return counts


def vocabulary_hash(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode("utf-8")).hexdigest()


def _fingerprint(units: list[dict], options: ShardOptions, tokenizer) -> str:
    """What the shards depend on: the inputs (paths, sizes, times), the options, the vocabulary."""
    files = sorted({u["file"] for u in units})
    state = [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
    text = json.dumps([state, asdict(options) | {"batch_size": None}, vocabulary_hash(tokenizer)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_index(out: Path, index: dict) -> None:
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, out / "index.json")


def write_token_shards(inputs: Sequence[str | Path], out: str | Path, tokenizer, options: ShardOptions,
                       workers: int) -> dict:
    """Tokenise `inputs` (txt: one document per line; JSONL; CSV) into shards under `out`
    (its `tokenizer/` must hold `tokenizer`). Resumes a run with the same inputs and options;
    returns the report (counts over all units, this run's speed)."""
    out = Path(out)
    files = resolve_files(inputs, extensions=TEXT_EXTENSIONS)
    for path in files:
        if path.stat().st_size == 0:
            raise UserError(f"{path}: empty file")
        if path.suffix.lower() == ".csv":
            check_file(path, [options.text_column or "content"])
    units = make_units(files, options.unit_bytes)
    fingerprint = _fingerprint(units, options, tokenizer)
    index = {"format": FORMAT, "fingerprint": fingerprint, "dtype": token_dtype(len(tokenizer)).name,
             "vocab_size": len(tokenizer), "vocab_sha256": vocabulary_hash(tokenizer),
             "eos_token_id": tokenizer.eos_token_id, "tokenizer": "tokenizer",
             "options": asdict(options), "units": units, "done": {}, "complete": False}
    if (out / "index.json").is_file():
        previous = json.loads((out / "index.json").read_text())
        if previous.get("fingerprint") != fingerprint:
            raise UserError(f"{out} holds shards of other inputs, options or tokenizer: give a new --output_dir "
                            "or delete it")
        index["done"] = previous["done"]
    for split in ("train", "valid"):
        (out / split).mkdir(parents=True, exist_ok=True)
        for tmp in (out / split).glob("*.tmp"):
            tmp.unlink()  # half-written by an interrupted run
    todo = [i for i in range(len(units)) if str(i) not in index["done"]]
    if index["done"]:
        logger.info("resuming: %d of %d units already done", len(index["done"]), len(units))
    _write_index(out, index)

    start = time.time()
    total_bytes = sum(units[i]["end"] - units[i]["start"] for i in todo)
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(str(out / "tokenizer"),)) as pool:
        keeps: dict[int, np.ndarray] = {}
        if options.dedup:
            # Every kept document's 8-byte hash, all units in order: the first occurrence stays.
            hashes = list(tqdm(pool.map(_unit_hashes, units, [options] * len(units)), total=len(units),
                               desc="hashing for dedup", unit=" units"))
            _, first = np.unique(np.concatenate(hashes), return_index=True)
            keep_all = np.zeros(sum(map(len, hashes)), dtype=bool)
            keep_all[first] = True
            bounds = np.cumsum([0, *map(len, hashes)])
            keeps = {i: keep_all[bounds[i]:bounds[i + 1]] for i in todo}
            del hashes, keep_all, first
        progress = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing")
        pending, queue = set(), list(todo)
        while queue or pending:
            while queue and len(pending) < 2 * workers:  # bounded: the input is never all queued
                i = queue.pop(0)
                future = pool.submit(_write_unit, str(out), i, units[i], options, index["dtype"], keeps.pop(i, None))
                future.unit_id = i
                pending.add(future)
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                counts = future.result()
                index["done"][str(future.unit_id)] = counts
                _write_index(out, index)
                progress.update(counts["bytes"])
        progress.close()
    seconds = time.time() - start
    index["complete"] = True
    _write_index(out, index)

    report = _new_counts() | {"bytes": 0}
    for counts in index["done"].values():
        for key in report:
            report[key] += counts[key]
    report |= {"units": len(units), "units_this_run": len(todo), "seconds_this_run": round(seconds, 1),
               "mb_per_s_this_run": round(total_bytes / 1e6 / max(seconds, 1e-9), 2), "dtype": index["dtype"]}
    if report["train_tokens"] == 0:
        raise UserError(f"no training text left after cleaning ({report}): give more text or lower --min_chars")
    return report


# ------------------------------------------------------------------------- reading
def read_index(source: str | Path) -> dict:
    source = Path(source)
    path = source / "index.json"
    if not path.is_file():
        raise UserError(f"{source}: no index.json (run the recipe's prepare_data.py)")
    index = json.loads(path.read_text())
    if not index.get("complete"):
        raise UserError(f"{source}: preparation did not finish (rerun prepare_data.py: it resumes)")
    return index


class TokenShards(torch.utils.data.Dataset):
    """Blocks of `block_size` tokens from one split of a prepared source, memory-mapped.

    Block i of the split is read from the shard holding it (a shard's tail shorter than a
    block is not used; documents run across block boundaries, separated by eos). Items are
    `{"input_ids", "labels"}`; the model shifts labels itself. The memory maps are opened
    lazily in each process, so DataLoader workers (fork or spawn) share the page cache.
    """

    def __init__(self, source: str | Path, split: str, block_size: int):
        self.source, self.split, self.block_size = Path(source), split, block_size
        self.index = read_index(source)
        self.dtype = np.dtype(self.index["dtype"])
        tokens = {int(i): c[f"{split}_tokens"] for i, c in self.index["done"].items()}
        self.shards = [(self.source / split / f"{i:05d}.bin", n // block_size)
                       for i, n in sorted(tokens.items()) if n >= block_size]
        self.ends = np.cumsum([blocks for _, blocks in self.shards])
        if not len(self.ends) or self.ends[-1] == 0:
            raise UserError(f"{source}: the {split} split has {sum(tokens.values())} tokens, fewer than one block "
                            f"of {block_size} (give more text, a larger --valid_ratio or a smaller block_size)")
        self._maps: dict[int, np.memmap] = {}

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def tokens(self, limit: int | None = None) -> np.ndarray:
        """The token ids of the split's shards (those holding a block), one after another, at most
        `limit`, in memory."""
        parts, left = [], limit if limit is not None else float("inf")
        for path, _ in self.shards:
            if left <= 0:
                break
            ids = np.memmap(path, dtype=self.dtype, mode="r")
            parts.append(np.array(ids[: int(min(left, len(ids)))]))
            left -= len(parts[-1])
        return np.concatenate(parts)

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = int(np.searchsorted(self.ends, i, side="right"))
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.shards[shard][0], dtype=self.dtype, mode="r")
        start = (i - (int(self.ends[shard - 1]) if shard else 0)) * self.block_size
        block = torch.from_numpy(self._maps[shard][start:start + self.block_size].astype(np.int64))
        return {"input_ids": block, "labels": block}


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A fixed bijective scrambling of uint64 values (SplitMix64's finaliser)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class MixedTokens(torch.utils.data.Dataset):
    """Training blocks drawn from several sources with weights that change over training.

    Item i is the i-th sample of training (read it with a sequential sampler): it belongs to
    optimizer step i // global_batch, whose weights interpolate linearly from `start_weights`
    at step 0 to `end_weights` at `total_steps`. Its source and its block within that source
    (drawn with replacement) are pure functions of (seed, i): no state, so DataLoader workers,
    several GPUs and resuming (the Trainer skips the batches already seen) all give the same
    sequence, and the proportions realised over any range of steps can be recomputed exactly.
    """

    def __init__(self, sources: Sequence[TokenShards], names: Sequence[str], start_weights: Sequence[float],
                 end_weights: Sequence[float] | None, total_steps: int, global_batch: int, seed: int):
        if len(start_weights) != len(sources) or (end_weights is not None and len(end_weights) != len(sources)):
            raise UserError(f"{len(sources)} sources need {len(sources)} weights each at start and end")
        for weights in (start_weights, end_weights or start_weights):
            if min(weights) < 0 or sum(weights) <= 0:
                raise UserError(f"mixing weights must be >= 0 with a positive sum, got {list(weights)}")
        if total_steps <= 0:
            raise UserError("mixing sources needs a fixed number of steps: set max_steps")
        self.sources, self.names = list(sources), list(names)
        self.start = np.asarray(start_weights, dtype=np.float64) / sum(start_weights)
        end = np.asarray(end_weights if end_weights is not None else start_weights, dtype=np.float64)
        self.end = end / end.sum()
        self.total_steps, self.global_batch, self.seed = total_steps, global_batch, seed
        self.sizes = np.array([len(s) for s in sources], dtype=np.uint64)

    def __len__(self) -> int:
        return self.total_steps * self.global_batch

    def weights_at(self, steps: np.ndarray) -> np.ndarray:
        """[len(steps), sources] normalised weights of those optimizer steps."""
        t = np.clip(np.asarray(steps, dtype=np.float64) / max(self.total_steps - 1, 1), 0.0, 1.0)[:, None]
        return (1 - t) * self.start + t * self.end

    def _draws(self, indices: np.ndarray, stream: int) -> np.ndarray:
        key = np.uint64((self.seed * 2 + stream) & (2**64 - 1))
        return _splitmix64(_splitmix64(indices.astype(np.uint64) ^ key))

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        """Which source each sample index draws from."""
        indices = np.asarray(indices)
        uniform = (self._draws(indices, 0) >> np.uint64(11)).astype(np.float64) / 2.0**53
        cumulative = np.cumsum(self.weights_at(indices // self.global_batch), axis=1)
        return np.minimum((uniform[:, None] >= cumulative).sum(axis=1), len(self.sources) - 1)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        index = np.array([i])
        source = int(self.source_of(index)[0])
        block = int(self._draws(index, 1)[0] % self.sizes[source])
        return self.sources[source][block]

    def planned(self, first_step: int, end_step: int) -> dict[str, float]:
        """The schedule's mean weight of each source over steps [first_step, end_step)."""
        weights = self.weights_at(np.arange(first_step, max(end_step, first_step + 1))).mean(axis=0)
        return {name: float(w) for name, w in zip(self.names, weights)}

    def proportions(self, first_step: int, end_step: int) -> dict[str, float]:
        """The share of each source among the samples of steps [first_step, end_step)."""
        indices = np.arange(first_step * self.global_batch, end_step * self.global_batch)
        counts = np.bincount(self.source_of(indices), minlength=len(self.sources))
        return {name: float(c) / max(len(indices), 1) for name, c in zip(self.names, counts)}
