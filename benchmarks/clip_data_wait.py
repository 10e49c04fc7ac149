"""Does Chinese CLIP training wait on data? The data share of the training step on one GPU.

    python benchmarks/clip_data_wait.py                      # one GPU: ViT-B/16 config, all variants
    python benchmarks/clip_data_wait.py --variants loader,resident --synced_steps 20
    python benchmarks/clip_data_wait.py --tiny               # CPU smoke test: default tiny config, seconds

Trains chinese_clip/train.py's model through its own `parse` and `build_trainer` with
chinese_clip/configs/clip_vit_b16_gpu.yaml (ViT-B/16 at 224 x 224 + a BERT-base-shaped text
tower, batch 256, bf16) on the built-in synthetic set prepared at 224 x 224 by
chinese_clip/prepare_data.py (the cache holds uint8 pixels: the images' content does not
change the cost of reading them). Each variant runs in its own child process:

  loader            the config as it is: 6 pinned loader workers reading the uint8 cache,
                    non-blocking copies, normalisation on the GPU.
  loader_0_workers  the same with the batches read in the training process.
  resident          no data loading at all: the first batch, already on the GPU, is given to
                    every step. The floor the loader variants are compared against.
  *_compile         the same with torch_compile: true (a shorter step leaves less time to hide
                    loading behind).

Two timed phases after --warmup_steps (compilation, allocator and worker warm-up):
  synced  --synced_steps steps, the GPU synchronised before each batch is fetched, so the
          host's time inside the Trainer's `get_batch_samples` is time the GPU stands idle:
          data share = that time / the phase's time. An upper bound: in a normal run the
          host fetches the next batch while the GPU still works on the last one.
  free    --free_steps steps as the Trainer runs them (no extra syncs; one at each end of
          the phase): images/s, compared with `resident`'s (x resident = 1.00 means the
          GPU never waited on data).
The training set is smaller than the steps, so epoch ends (iterator restarts) are inside the
timed phases. Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from children import child_row, print_row  # benchmarks/ is on sys.path when a benchmark runs
from recipe_loader import load_recipe_script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPU_CONFIG = REPO / "chinese_clip" / "configs" / "clip_vit_b16_gpu.yaml"
TINY_CONFIG = REPO / "chinese_clip" / "configs" / "default.yaml"
# variant -> the config keys it changes
VARIANTS: dict[str, dict] = {
    "loader": {},
    "loader_0_workers": {"dataloader_num_workers": 0, "dataloader_persistent_workers": False,
                         "dataloader_prefetch_factor": None},
    "resident": {},
    "loader_compile": {"torch_compile": True},
    "resident_compile": {"torch_compile": True},
}


def run_variant(name: str, args) -> dict:
    """In the child process: train and time one variant; returns its row."""
    import torch
    import yaml
    from transformers import TrainerCallback

    from common.config import load_yaml

    clip = load_recipe_script("chinese_clip")
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    warmup, synced, free = args.warmup_steps, args.synced_steps, args.free_steps
    resident = name.startswith("resident")

    class TimedTrainer(clip.CLIPTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.fetches: list[tuple[int, float]] = []  # (step, seconds) in the synced phase
            self.first_batches = None

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            step = self.state.global_step
            if resident and self.first_batches is not None:
                return self.first_batches, None
            timed = warmup <= step < warmup + synced
            if timed:
                sync()
                start = time.perf_counter()
            batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
            if timed:
                self.fetches.append((step, time.perf_counter() - start))
            if resident:
                self.first_batches = [self._prepare_inputs(b) for b in batches]
                return self.first_batches, count
            return batches, count

    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, train_args, state, control, **kwargs):
            if state.global_step in (warmup, warmup + synced, warmup + synced + free):
                sync()
                marks[state.global_step] = time.perf_counter()

    config = load_yaml(TINY_CONFIG if args.tiny else GPU_CONFIG) | VARIANTS[name]
    with tempfile.TemporaryDirectory() as out:
        (Path(out) / "config.yaml").write_text(yaml.safe_dump(config))
        argv = [str(Path(out) / "config.yaml"), "--data_dir", str(args.data_dir), "--output_dir", out,
                "--max_steps", str(warmup + synced + free), "--save_strategy", "no",
                "--logging_steps", "100000", "--disable_tqdm", "true"]
        if args.tiny:
            argv += ["--per_device_train_batch_size", "16"]
        data_args, model_args, training_args = clip.parse(argv)
        trainer = clip.build_trainer(data_args, model_args, training_args, trainer_class=TimedTrainer)
        trainer.add_callback(Clock())
        trainer.train()
    synced_s = marks[warmup + synced] - marks[warmup]
    free_s = marks[warmup + synced + free] - marks[warmup + synced]
    batch = training_args.per_device_train_batch_size
    steps_per_epoch = len(trainer.train_dataset) // batch
    fetch_s = sum(seconds for _, seconds in trainer.fetches)
    epoch_starts = [seconds for step, seconds in trainer.fetches if step % steps_per_epoch == 0]
    return {
        "variant": name, "batch": batch, "workers": training_args.dataloader_num_workers,
        "compile": training_args.torch_compile, "attention": trainer.model.config._attn_implementation,
        "params_M": round(trainer.model.num_parameters() / 1e6, 2),
        "train_images": len(trainer.train_dataset),
        "steps_per_epoch": steps_per_epoch, "synced_step_ms": 1000 * synced_s / synced,
        "data_ms": 1000 * fetch_s / synced, "data_share": fetch_s / synced_s,
        "max_data_ms": 1000 * max((seconds for _, seconds in trainer.fetches), default=0),
        "epoch_start_data_ms": [round(1000 * seconds, 2) for seconds in epoch_starts],
        "data_share_within_epoch": (fetch_s - sum(epoch_starts)) / synced_s,
        "free_images_per_s": free * batch / free_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def prepare(args) -> None:
    if (args.data_dir / "report.json").exists():
        return
    sizes = ["512", "64", "64"] if args.tiny else [str(args.train_images), "256", "256"]
    size = "64" if args.tiny else "224"
    subprocess.run([sys.executable, str(REPO / "chinese_clip" / "prepare_data.py"), "--output_dir",
                    str(args.data_dir), "--image_size", size, "--synthetic_size", *sizes], check=True)


def environment() -> str:
    import torch
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    return f"{device}, torch {torch.__version__}, transformers {transformers.__version__}, {time.strftime('%Y-%m-%d')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated, from {list(VARIANTS)}.")
    parser.add_argument("--data_dir", type=Path, default=Path(tempfile.gettempdir()) / "clip_data_wait")
    parser.add_argument("--train_images", type=int, default=16384,
                        help="Synthetic training images (224 x 224): 64 steps of 256 per epoch.")
    parser.add_argument("--warmup_steps", type=int, default=16)
    parser.add_argument("--synced_steps", type=int, default=64)
    parser.add_argument("--free_steps", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with the default tiny config.")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmarks" / "clip_data_wait.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.data_dir = args.data_dir.with_name(args.data_dir.name + "_tiny")
        args.warmup_steps, args.synced_steps, args.free_steps = 2, 32, 8
    if args.child:
        print_row(run_variant(args.child, args))
        return

    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    prepare(args)
    rows = []
    for name in names:
        row = child_row(__file__, name)
        if "error" in row:
            raise SystemExit(f"variant {name} failed: {row['error']}")
        rows.append(row)
        print(f"{name}: done", flush=True)

    floors = {row["compile"]: row["free_images_per_s"] for row in rows if row["variant"].startswith("resident")}
    header = environment()
    print(header)
    print(f"{'variant':<18}{'workers':>8}{'step ms':>9}{'data ms':>9}{'data share':>12}{'in epoch':>10}"
          f"{'epoch start ms':>16}{'images/s':>10}{'x resident':>12}")
    for row in rows:
        floor = floors.get(row["compile"])
        row["x_resident"] = row["free_images_per_s"] / floor if floor else None
        ratio = f"{row['x_resident']:.3f}" if floor else "-"
        starts = ",".join(f"{ms:.0f}" for ms in row["epoch_start_data_ms"]) or "-"
        print(f"{row['variant']:<18}{row['workers']:>8}{row['synced_step_ms']:>9.1f}{row['data_ms']:>9.2f}"
              f"{row['data_share']:>11.1%}{row['data_share_within_epoch']:>9.1%}{starts:>16}"
              f"{row['free_images_per_s']:>10.0f}{ratio:>12}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": header, "config": str((TINY_CONFIG if args.tiny else GPU_CONFIG).relative_to(REPO)),
                                    "steps": {"warmup": args.warmup_steps, "synced": args.synced_steps,
                                              "free": args.free_steps}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
