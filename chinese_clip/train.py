"""Train a Chinese CLIP (BERT-style text tower + ViT image tower) contrastively, then score
retrieval and zero-shot classification on the held-out split.

    python chinese_clip/prepare_data.py
    python chinese_clip/train.py chinese_clip/configs/default.yaml                 # tiny towers, CPU minutes
    python chinese_clip/train.py ... --text_model /models/chinese-roberta --vision_model /models/clip-vit-base-patch16
    python chinese_clip/train.py ... --model_name_or_path /models/chinese-clip-vit-base-patch16 --freeze_vision true

Reads the cached uint8 images of prepare_data.py (memory copies, no JPEG decoding); batches
cross to the device as uint8 and are normalised there. `--freeze_vision` trains the text tower
against a fixed image tower (or `--freeze_text` the reverse): the usual fix when a loss will
not fall with a pretrained tower on one side.

Evaluation on `--eval_split` (default test): image->text and text->image recall@1/5/10, where a
hit is any retrieved item whose caption equals the query's (the synthetic set repeats
captions), next to the chance level of that same rule; and zero-shot accuracy over the
caption attributes when the CSV has them. All in `<output_dir>/metrics.json`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate
from transformers import (
    AutoModel,
    ChineseCLIPConfig,
    ChineseCLIPModel,
    Trainer,
    TrainingArguments,
    set_seed,
)

from common.config import parse_args
from common.errors import UserError, cli_main
from common.images import (
    CLIP_MEAN,
    CLIP_STD,
    COLOURS,
    CORNERS,
    SHAPES,
    load_prepared_split,
    normalize,
)
from common.plots import plot_losses
from common.tokenizer import load_tokenizer

logger = logging.getLogger("train")


@dataclass
class DataArguments:
    data_dir: str = field(default="data/chinese_clip", metadata={"help": "Output folder of prepare_data.py."})
    max_text_length: int = field(default=32, metadata={"help": "Captions are cut to this many tokens."})
    eval_split: str = field(default="test", metadata={"help": "Split scored after training (valid or test)."})


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A local Chinese-CLIP checkpoint."})
    text_model: str | None = field(default=None, metadata={"help": "A local BERT-style text tower."})
    vision_model: str | None = field(default=None, metadata={"help": "A local CLIP / Chinese-CLIP model or vision tower."})
    hidden_size: int = field(default=128, metadata={"help": "Width of both towers built from config."})
    num_layers: int = field(default=2, metadata={"help": "Layers of each tower built from config."})
    num_heads: int = 4
    patch_size: int = 8
    projection_dim: int = 128
    freeze_text: bool = field(default=False, metadata={"help": "Train only the image side."})
    freeze_vision: bool = field(default=False, metadata={"help": "Train only the text side."})


@dataclass
class CLIPTrainingArguments(TrainingArguments):
    output_dir: str = field(default="outputs/chinese_clip", metadata={"help": "Where model and metrics go."})
    eval_strategy: str = "no"
    save_strategy: str = "no"
    lr_scheduler_type: str = "cosine"
    report_to: str = "none"
    logging_steps: int = 20
    remove_unused_columns: bool = False  # the collator needs every field


# ------------------------------------------------------------------------- data
class ImageTextSplit(torch.utils.data.Dataset):
    """Captions (tokenised once) and their cached images of one prepared split."""

    def __init__(self, data_dir: Path, split: str, tokenizer, max_length: int):
        self.records, self.images = load_prepared_split(data_dir, split, "chinese_clip/prepare_data.py")
        self.texts = [r["text"] for r in self.records]
        self.input_ids = tokenizer(self.texts, truncation=True, max_length=max_length)["input_ids"]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "pixel_values": torch.from_numpy(self.images[i])}


class Collator:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        text = self.tokenizer.pad({"input_ids": [x["input_ids"] for x in items]}, pad_to_multiple_of=8,
                                  return_tensors="pt")  # few distinct shapes: compile and tensor cores like that
        # uint8 [B, H, W, 3]; in a loader worker default_collate stacks straight into shared
        # memory, so handing the batch to the training process copies nothing more
        return {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                "pixel_values": default_collate([x["pixel_values"] for x in items])}


class CLIPTrainer(Trainer):
    """The Trainer moves the uint8 images to the device; they are normalised there."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "pixel_values": normalize(inputs["pixel_values"], CLIP_MEAN, CLIP_STD)}
        outputs = model(**inputs, return_loss=True)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


# ------------------------------------------------------------------------- model
def build_model(args: ModelArguments, vocab_size: int, image_size: int, pad_token_id: int) -> ChineseCLIPModel:
    if args.model_name_or_path:
        return ChineseCLIPModel.from_pretrained(args.model_name_or_path, trust_remote_code=False)
    text_config = dict(vocab_size=vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                       num_attention_heads=args.num_heads, intermediate_size=4 * args.hidden_size,
                       max_position_embeddings=128, pad_token_id=pad_token_id)
    vision_config = dict(image_size=image_size, patch_size=args.patch_size, hidden_size=args.hidden_size,
                         num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                         intermediate_size=4 * args.hidden_size)
    text_tower = AutoModel.from_pretrained(args.text_model, trust_remote_code=False) if args.text_model else None
    vision_tower = AutoModel.from_pretrained(args.vision_model, trust_remote_code=False) if args.vision_model else None
    if vision_tower is not None:
        vision_tower = getattr(vision_tower, "vision_model", vision_tower)  # a whole CLIP: its image side
    if text_tower is not None:
        text_config = text_tower.config.to_dict()
    if vision_tower is not None:
        vision_config = vision_tower.config.to_dict()
    config = ChineseCLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=args.projection_dim)
    model = ChineseCLIPModel(config)
    if text_tower is not None:
        load_tower(model.text_model, text_tower, args.text_model)
    if vision_tower is not None:
        load_tower(model.vision_model, vision_tower, args.vision_model)
    return model


def load_tower(target: torch.nn.Module, source: torch.nn.Module, name: str) -> None:
    """Copy a pretrained tower's weights; refuse a checkpoint whose layout does not match (a
    plain ViT's names differ from a CLIP vision tower's: loading it leniently would silently
    keep random weights)."""
    result = target.load_state_dict(source.state_dict(), strict=False)
    if result.missing_keys:
        raise UserError(f"{name}: {len(result.missing_keys)} of {len(target.state_dict())} weights of the "
                        f"{type(target).__name__} are missing (e.g. {result.missing_keys[0]}); give a BERT-style "
                        "text model for --text_model and a CLIP / Chinese-CLIP vision tower for --vision_model")


# -------------------------------------------------------------------- evaluation
@torch.inference_mode()
def embed(model, split: ImageTextSplit, collator: Collator, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    device = next(model.parameters()).device
    texts, images = [], []
    for start in range(0, len(split), batch_size):
        batch = collator([split[i] for i in range(start, min(start + batch_size, len(split)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        texts.append(model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output)
        pixels = normalize(batch["pixel_values"], CLIP_MEAN, CLIP_STD)
        images.append(model.get_image_features(pixel_values=pixels).pooler_output)
    text = torch.nn.functional.normalize(torch.cat(texts).float(), dim=-1)
    image = torch.nn.functional.normalize(torch.cat(images).float(), dim=-1)
    return text.cpu(), image.cpu()


def chance_recall(matches: np.ndarray, candidates: int, k: int) -> float:
    """Mean probability that k candidates drawn at random include one of the query's
    `matches` equal ones: 1 - C(N - m, k) / C(N, k) per query."""
    miss = np.ones(len(matches))
    for i in range(k):
        miss *= np.clip(candidates - matches - i, 0, None) / (candidates - i)
    return float(1 - miss.mean())


def retrieval_metrics(similarity: torch.Tensor, texts: list[str], ks=(1, 5, 10)) -> dict:
    """similarity [images, texts]; item i of each side belongs to caption texts[i]."""
    codes = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    labels = torch.tensor([codes[t] for t in texts])
    same = labels[:, None] == labels[None, :]  # [query, candidate]: same caption
    matches = same.sum(1).numpy()
    metrics = {}
    for name, scores in (("image_to_text", similarity), ("text_to_image", similarity.t())):
        ranked = scores.argsort(dim=1, descending=True)
        for k in ks:
            hits = same.gather(1, ranked[:, :k]).any(dim=1).float().mean().item()
            metrics[f"{name}_recall@{k}"] = hits
            metrics[f"{name}_recall@{k}_chance"] = chance_recall(matches, len(texts), k)
    return metrics


def zero_shot_metrics(model, tokenizer, text_features: torch.Tensor, image_features: torch.Tensor,
                      records: list[dict], max_length: int) -> dict:
    """For single-shape scenes: pick the shape (colour, position) among all values, the other
    words of the caption kept: accuracy against chance (1 / number of values)."""
    singles = [i for i, r in enumerate(records) if r.get("kind") == "single"]
    if not singles:
        return {}
    device = next(model.parameters()).device
    choices = {"shape": SHAPES, "colour": tuple(COLOURS), "position": tuple(CORNERS)}
    metrics = {}
    for attribute, values in choices.items():
        correct = 0
        for i in singles:
            record = records[i]

            def caption(value, attribute=attribute, record=record):
                fields = {"shape": record["shape"], "colour": record["colour"], "position": record["position"], attribute: value}
                return f"{fields['position']}有一个{fields['colour']}的{fields['shape']}"

            encoded = tokenizer([caption(v) for v in values], padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt").to(device)
            with torch.inference_mode():
                candidates = model.get_text_features(input_ids=encoded["input_ids"],
                                                     attention_mask=encoded["attention_mask"]).pooler_output
            candidates = torch.nn.functional.normalize(candidates.float(), dim=-1).cpu()
            correct += values[int((candidates @ image_features[i]).argmax())] == record[attribute]
        metrics[f"zero_shot_{attribute}_accuracy"] = correct / len(singles)
        metrics[f"zero_shot_{attribute}_chance"] = 1 / len(values)
    metrics["zero_shot_images"] = len(singles)
    return metrics


def build_trainer(data_args: DataArguments, model_args: ModelArguments, training_args: CLIPTrainingArguments,
                  trainer_class: type[CLIPTrainer] = CLIPTrainer) -> CLIPTrainer:
    """Tokenizer, train split, model (towers frozen as asked) and the Trainer over them."""
    tokenizer = load_tokenizer(Path(data_args.data_dir) / "tokenizer", made_by="chinese_clip/prepare_data.py")
    train = ImageTextSplit(Path(data_args.data_dir), "train", tokenizer, data_args.max_text_length)
    model = build_model(model_args, len(tokenizer), train.images.size, tokenizer.pad_token_id)
    if model_args.freeze_text and model_args.freeze_vision:
        raise UserError("--freeze_text and --freeze_vision together leave nothing to train")
    for frozen, tower in ((model_args.freeze_text, model.text_model), (model_args.freeze_vision, model.vision_model)):
        if frozen:
            tower.requires_grad_(False)
    logger.info("ChineseCLIPModel: %.2fM parameters, %.2fM trained", model.num_parameters() / 1e6,
                model.num_parameters(only_trainable=True) / 1e6)
    return trainer_class(model=model, args=training_args, train_dataset=train, data_collator=Collator(tokenizer),
                         processing_class=tokenizer)


def parse(argv: list[str] | None = None) -> tuple[DataArguments, ModelArguments, CLIPTrainingArguments]:
    return parse_args([DataArguments, ModelArguments, CLIPTrainingArguments], argv, description=__doc__)


@cli_main
def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, training_args = parse(argv)
    set_seed(training_args.seed)
    start = time.time()
    trainer = build_trainer(data_args, model_args, training_args)
    tokenizer, collator = trainer.processing_class, trainer.data_collator
    held_out = ImageTextSplit(Path(data_args.data_dir), data_args.eval_split, tokenizer, data_args.max_text_length)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if not trainer.is_world_process_zero():
        return {}

    text, image = embed(trainer.model, held_out, collator)
    metrics = {"eval_split": data_args.eval_split, "eval_pairs": len(held_out),
               **retrieval_metrics(image @ text.t(), held_out.texts),
               **zero_shot_metrics(trainer.model, tokenizer, text, image, held_out.records, data_args.max_text_length)}
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics["train"] = {"first_logged_loss": logged[0] if logged else None,
                        "last_logged_loss": logged[-1] if logged else None,
                        "steps": trainer.state.global_step, "runtime_s": round(result.metrics["train_runtime"], 1)}
    metrics["runtime_s"] = round(time.time() - start, 1)
    out = Path(training_args.output_dir)
    (out / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    plot_losses(trainer.state.log_history, out / "loss.png", "chinese_clip: contrastive loss")
    for key in ("image_to_text_recall@1", "text_to_image_recall@1", "image_to_text_recall@5"):
        print(f"{key}: {metrics[key]:.3f} (chance {metrics[key + '_chance']:.3f})")
    for attribute in ("shape", "colour", "position"):
        if f"zero_shot_{attribute}_accuracy" in metrics:
            print(f"zero-shot {attribute}: {metrics[f'zero_shot_{attribute}_accuracy']:.3f} "
                  f"(chance {metrics[f'zero_shot_{attribute}_chance']:.3f})")
    print(f"model and metrics.json in {out}")
    return metrics


if __name__ == "__main__":
    main()
