"""Train an image -> Chinese caption model (ViT encoder + GPT-2 decoder with cross-attention),
then caption the held-out images with beam search and score them.

    python vit_gpt2_captioning/prepare_data.py
    python vit_gpt2_captioning/train.py vit_gpt2_captioning/configs/default.yaml       # tiny, CPU minutes
    python vit_gpt2_captioning/train.py ... --encoder /models/vit-base-patch16-224 --decoder /models/gpt2-chinese

`VisionEncoderDecoderModel` from configs, or from a local pretrained encoder and decoder
(a linear bridge is added when their widths differ). Labels are the caption's tokens then
[EOS]; padding positions are -100, so the loss covers real tokens only. Images come from the
uint8 cache of prepare_data.py and are normalised on the device.

Evaluation on `--eval_split` (default test): beam search (`--num_beams 4`, `--max_new_tokens
16`), exact-match rate and, when the CSV has the synthetic set's attribute columns, how often
the caption names the right shape / colour / position / count; beside the same scores of a
trivial baseline that always answers the most common train caption. In `metrics.json`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import default_collate
from transformers import (
    GPT2Config,
    Trainer,
    TrainingArguments,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    set_seed,
)

from common.config import parse_args
from common.errors import UserError, cli_main
from common.images import (
    COLOURS,
    CORNERS,
    COUNT_WORDS,
    SHAPES,
    VIT_MEAN,
    VIT_STD,
    caption_images,
    load_prepared_split,
    normalize,
)
from common.plots import plot_losses
from common.tokenizer import load_tokenizer

logger = logging.getLogger("train")
# ViT's input normalisation (google/vit-* processors).
IGNORE_INDEX = -100


@dataclass
class DataArguments:
    data_dir: str = field(default="data/vit_gpt2_captioning", metadata={"help": "Output folder of prepare_data.py."})
    max_caption_tokens: int = field(default=24, metadata={"help": "Captions are cut to this many tokens (plus [EOS])."})
    eval_split: str = field(default="test", metadata={"help": "Split captioned and scored after training."})
    num_beams: int = field(default=4, metadata={"help": "Beam width of the evaluation (1 = greedy)."})
    max_new_tokens: int = field(default=16, metadata={"help": "Longest generated caption, in tokens."})


@dataclass
class ModelArguments:
    encoder: str | None = field(default=None, metadata={"help": "A local ViT checkpoint. Unset: a ViT from the sizes below."})
    decoder: str | None = field(default=None, metadata={"help": "A local GPT-2 checkpoint. Unset: a GPT-2 from the sizes below."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "A local VisionEncoderDecoder checkpoint to continue."})
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    patch_size: int = 8


@dataclass
class CaptionTrainingArguments(TrainingArguments):
    output_dir: str = field(default="outputs/vit_gpt2_captioning", metadata={"help": "Where model and metrics go."})
    eval_strategy: str = "no"
    save_strategy: str = "no"
    lr_scheduler_type: str = "cosine"
    report_to: str = "none"
    logging_steps: int = 20
    remove_unused_columns: bool = False


# ------------------------------------------------------------------------- data
class CaptionSplit(torch.utils.data.Dataset):
    def __init__(self, data_dir: Path, split: str, tokenizer, max_tokens: int):
        self.records, self.images = load_prepared_split(data_dir, split, "vit_gpt2_captioning/prepare_data.py")
        self.texts = [r["text"] for r in self.records]
        ids = tokenizer(self.texts, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
        self.labels = [caption + [tokenizer.eos_token_id] for caption in ids]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return {"labels": self.labels[i], "pixel_values": torch.from_numpy(self.images[i])}


def collate(items: list[dict]) -> dict:
    """Stack uint8 images (into shared memory in a loader worker: default_collate); right-pad labels with -100, which the loss ignores (the model
    builds its decoder inputs by shifting labels right, -100 becoming the pad id)."""
    longest = max(len(x["labels"]) for x in items)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    for row, x in enumerate(items):
        labels[row, :len(x["labels"])] = torch.tensor(x["labels"])
    return {"pixel_values": default_collate([x["pixel_values"] for x in items]), "labels": labels}


class CaptionTrainer(Trainer):
    """The Trainer moves the uint8 images to the device; they are normalised there."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "pixel_values": normalize(inputs["pixel_values"], VIT_MEAN, VIT_STD)}
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


# ------------------------------------------------------------------------- model
def build_model(args: ModelArguments, tokenizer, image_size: int) -> VisionEncoderDecoderModel:
    if args.model_name_or_path:
        model = VisionEncoderDecoderModel.from_pretrained(args.model_name_or_path)
    elif args.encoder or args.decoder:
        if not (args.encoder and args.decoder):
            raise UserError("give both --encoder and --decoder (or neither)")
        model = VisionEncoderDecoderModel.from_encoder_decoder_pretrained(args.encoder, args.decoder)
        if model.decoder.get_input_embeddings().num_embeddings < len(tokenizer):
            model.decoder.resize_token_embeddings(len(tokenizer))
    else:
        encoder = ViTConfig(image_size=image_size, patch_size=args.patch_size, hidden_size=args.hidden_size,
                            num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                            intermediate_size=4 * args.hidden_size)
        decoder = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=args.hidden_size, n_layer=args.num_layers,
                             n_head=args.num_heads, add_cross_attention=True, is_decoder=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        model = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder))
    # generation and the label shift read these from the top-level config
    model.config.decoder_start_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.decoder_start_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# -------------------------------------------------------------------- evaluation
_ATTRIBUTE_WORDS = {"shape": SHAPES, "colour": tuple(COLOURS), "position": (*CORNERS, "左边", "右边"),
                    "count": tuple(COUNT_WORDS.values())}


def attribute_of(caption: str, attribute: str) -> str:
    """The first word of `attribute`'s vocabulary in the caption ('' if none); for count:
    the number word, '一' when the caption says 有一个."""
    if attribute == "count":
        match = re.search(r"有([一两三四])个", caption)
        return match.group(1) if match else ""
    hits = [(caption.find(word), word) for word in _ATTRIBUTE_WORDS[attribute] if word in caption]
    return min(hits)[1] if hits else ""


def caption_scores(predictions: list[str], records: list[dict]) -> dict:
    scores = {"exact_match": sum(p == r["text"] for p, r in zip(predictions, records)) / len(records)}
    if records and "shape" in records[0]:
        for attribute in ("shape", "colour", "position", "count"):
            truths = [attribute_of(r["text"], attribute) for r in records]
            scored = [(p, t) for p, t in zip(predictions, truths) if t]
            scores[f"{attribute}_accuracy"] = sum(attribute_of(p, attribute) == t for p, t in scored) / max(1, len(scored))
    return scores


@cli_main
def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, training_args = parse_args(
        [DataArguments, ModelArguments, CaptionTrainingArguments], argv, description=__doc__
    )
    set_seed(training_args.seed)
    start = time.time()
    data_dir = Path(data_args.data_dir)
    tokenizer = load_tokenizer(data_dir / "tokenizer", made_by="vit_gpt2_captioning/prepare_data.py")
    train = CaptionSplit(data_dir, "train", tokenizer, data_args.max_caption_tokens)
    held_out = CaptionSplit(data_dir, data_args.eval_split, tokenizer, data_args.max_caption_tokens)
    model = build_model(model_args, tokenizer, train.images.size)
    logger.info("VisionEncoderDecoderModel: %.2fM parameters", model.num_parameters() / 1e6)

    trainer = CaptionTrainer(model=model, args=training_args, train_dataset=train, data_collator=collate,
                             processing_class=tokenizer)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if not trainer.is_world_process_zero():
        return {}

    pixels = torch.from_numpy(held_out.images[:])
    predictions = caption_images(trainer.model, tokenizer, pixels, data_args.num_beams, data_args.max_new_tokens)
    most_common = Counter(train.texts).most_common(1)[0][0]
    metrics = {"eval_split": data_args.eval_split, "eval_images": len(held_out),
               "model": caption_scores(predictions, held_out.records),
               "baseline_most_common_caption": {"caption": most_common,
                                                **caption_scores([most_common] * len(held_out), held_out.records)},
               "examples": [{"truth": r["text"], "caption": p} for r, p in zip(held_out.records[:8], predictions)]}
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics["train"] = {"first_logged_loss": logged[0] if logged else None,
                        "last_logged_loss": logged[-1] if logged else None,
                        "steps": trainer.state.global_step, "runtime_s": round(result.metrics["train_runtime"], 1)}
    metrics["runtime_s"] = round(time.time() - start, 1)
    out = Path(training_args.output_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    plot_losses(trainer.state.log_history, out / "loss.png", "vit_gpt2_captioning")
    for name, value in metrics["model"].items():
        print(f"{name}: {value:.3f} (most-common-caption baseline {metrics['baseline_most_common_caption'][name]:.3f})")
    for example in metrics["examples"][:4]:
        print(f"  {example['truth']}  ->  {example['caption']}")
    print(f"model and metrics.json in {out}")
    return metrics


if __name__ == "__main__":
    main()
