"""Classify texts with a trained model: label + probability.

    python chinese_classifier/predict.py "这本书写得太好了" "质量很差，用了两天就坏了"
    python chinese_classifier/predict.py --file reviews.txt            # one text per line
    python chinese_classifier/predict.py --file test.csv --output predictions.csv   # CSV with a text column

`TextClassifier` is also what serve.py and export_onnx.py use, so every path tokenises
and truncates the same way the model was trained.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common.data import check_file, read_lines
from common.errors import UserError, cli_main

DEFAULT_MODEL = "outputs/chinese_classifier"


class TextClassifier:
    """A trained sequence classifier and its tokenizer, ready for batched inference."""

    def __init__(self, model_dir: str | Path = DEFAULT_MODEL, device: str | None = None):
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise UserError(f"no trained model in {model_dir}: run chinese_classifier/train.py first")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=False)
        self.model.to(self.device).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts, truncation=True, max_length=self.tokenizer.model_max_length,
            padding=True, return_tensors="pt", return_token_type_ids=False,
        )

    @torch.inference_mode()
    def predict_proba(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities, shape (len(texts), num_labels)."""
        probabilities = []
        for start in range(0, len(texts), batch_size):
            batch = {k: v.to(self.device) for k, v in self.encode(texts[start:start + batch_size]).items()}
            probabilities.append(torch.softmax(self.model(**batch).logits.float(), dim=-1).cpu().numpy())
        return np.concatenate(probabilities) if probabilities else np.zeros((0, len(self.labels)))

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict]:
        results = []
        for text, probs in zip(texts, self.predict_proba(texts, batch_size)):
            best = int(probs.argmax())
            results.append({
                "text": text,
                "label": self.labels[best],
                "label_id": best,
                "probability": float(probs[best]),
                "probabilities": {name: float(p) for name, p in zip(self.labels, probs)},
            })
        return results


def read_texts(path: Path) -> list[str]:
    if path.suffix.lower() != ".csv":
        return read_lines(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    check_file(path, required_columns=["text"])
    with path.open(encoding="utf-8-sig", newline="") as f:
        return [row["text"].strip() for row in csv.DictReader(f)]


@cli_main
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("texts", nargs="*", help="Texts to classify.")
    parser.add_argument("--model", "--model_name_or_path", default=DEFAULT_MODEL, help="Trained model directory (train.py's output_dir).")
    parser.add_argument("--file", type=Path, help="A .txt file (one text per line) or a CSV with a text column.")
    parser.add_argument("--output", type=Path, help="Write a CSV (text,label,probability,...) instead of printing.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    args = parser.parse_args(argv)

    texts = list(args.texts) + (read_texts(args.file) if args.file else [])
    if not texts:
        raise UserError("nothing to classify: give texts as arguments or --file")
    if any(not t.strip() for t in texts):
        raise UserError("empty text given")
    classifier = TextClassifier(args.model, device=args.device)
    results = classifier.predict(texts, batch_size=args.batch_size)
    if args.output:
        with args.output.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label", "probability"] + [f"p_{name}" for name in classifier.labels])
            for r in results:
                writer.writerow([r["text"], r["label"], f"{r['probability']:.6f}"]
                                + [f"{p:.6f}" for p in r["probabilities"].values()])
        print(f"wrote {len(results)} predictions to {args.output}")
    else:
        for r in results:
            print(json.dumps({k: r[k] for k in ("label", "probability", "text")}, ensure_ascii=False))
    return results


if __name__ == "__main__":
    main()
