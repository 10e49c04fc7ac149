"""Train a Chinese text classifier (label,text CSV) with the Hugging Face Trainer.

    python chinese_classifier/prepare_data.py
    python chinese_classifier/train.py chinese_classifier/configs/default.yaml
    python chinese_classifier/train.py configs/default.yaml --learning_rate 1e-3 --num_train_epochs 3

Fine-tune a local pretrained encoder (e.g. a downloaded bert-base-chinese):

    python chinese_classifier/train.py chinese_classifier/configs/bert_base_gpu.yaml \
        --model_name_or_path /models/bert-base-chinese

Several GPUs (same script): `torchrun --nproc_per_node 4 chinese_classifier/train.py ...`
or `accelerate launch chinese_classifier/train.py ...`; add `--deepspeed ds.json` for ZeRO.

Without `--model_name_or_path` a small encoder (`architecture`: ModernBERT with mean
pooling by default, or BERT) is built from the config with a Chinese tokenizer learnt
from the training texts; `pretrain_epochs > 0` first trains it with masked-LM on the
training texts (optionally People's Daily too): a little of what a pretrained
bert-base-chinese brings. Each epoch is evaluated on valid and the best one kept; the test
split is scored once at the end beside a TF-IDF + logistic-regression baseline, into
`<output_dir>/metrics.json` and `<output_dir>/confusion_matrix.png`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    ModernBertConfig,
    Trainer,
    TrainingArguments,
    set_seed,
)

from common.config import parse_args
from common.corpora import load_peoples_daily
from common.data import load_files
from common.errors import UserError, cli_main
from common.plots import plot_losses
from common.tokenizer import build_chinese_tokenizer, load_tokenizer

logger = logging.getLogger("train")


# ----------------------------------------------------------------------------- arguments
@dataclass
class DataArguments:
    data_dir: str = field(
        default="data/chinese_classifier",
        metadata={"help": "Folder with train.csv valid.csv test.csv (label,text) and labels.json, "
                  "as written by prepare_data.py."},
    )
    max_length: int = field(default=128, metadata={"help": "Tokens per text; longer texts are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    run_baseline: bool = field(default=True, metadata={"help": "Score TF-IDF + logistic regression on the same split."})


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local pretrained model directory. Unset: an encoder built from the sizes below."},
    )
    architecture: str = field(
        default="modernbert",
        metadata={"help": "Model built when no model_name_or_path is given: 'bert' (BERT, [CLS] pooling) "
                  "or 'modernbert' (ModernBERT: rotary positions, GeGLU, mean pooling).",
                  "choices": ["bert", "modernbert"]},
    )
    vocab_size: int = field(default=8000, metadata={"help": "Vocabulary of the tokenizer built from the data."})
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 512
    dropout: float = field(default=0.1, metadata={"help": "Hidden and attention dropout of the built model."})
    pretrain_epochs: float = field(
        default=0.0,
        metadata={"help": "Masked-LM epochs over the training texts before fine-tuning "
                  "(built model only; 0 = off)."},
    )
    pretrain_learning_rate: float = 1e-3
    pretrain_max_length: int = field(default=64, metadata={"help": "Tokens per masked-LM sequence."})
    pretrain_on_peoples_daily: bool = field(
        default=False, metadata={"help": "Add People's Daily to the masked-LM corpus (slower, more general)."},
    )


@dataclass
class ClassifierTrainingArguments(TrainingArguments):
    """TrainingArguments with this recipe's defaults (every field can be set in YAML or CLI)."""

    output_dir: str = field(default="outputs/chinese_classifier", metadata={"help": "Where model and metrics go."})
    eval_strategy: str = "epoch"
    save_strategy: str = "epoch"
    save_total_limit: int = 1
    load_best_model_at_end: bool = True
    metric_for_best_model: str = "accuracy"
    report_to: str = "none"
    logging_steps: int = 50


def compute_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    predictions = np.argmax(logits, axis=-1)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro")),
    }


def tfidf_baseline(train_texts, train_labels, test_texts, test_labels, seed: int) -> dict[str, float]:
    """What a user would try first: character 1-3-gram TF-IDF + logistic regression."""
    vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2)
    classifier = LogisticRegression(max_iter=2000, random_state=seed)
    classifier.fit(vectorizer.fit_transform(train_texts), train_labels)
    predictions = classifier.predict(vectorizer.transform(test_texts))
    return {
        "accuracy": float(accuracy_score(test_labels, predictions)),
        "macro_f1": float(f1_score(test_labels, predictions, average="macro")),
    }


def save_confusion_matrix(matrix: np.ndarray, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_config(model_args, tokenizer, max_length: int, id2label: dict[int, str]):
    """The configuration of the encoder built from scratch."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
        max_position_embeddings=max(512, max_length),
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
    )
    if model_args.architecture == "modernbert":
        return ModernBertConfig(
            **common,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            global_attn_every_n_layers=1,  # texts are short: every layer attends globally
            classifier_pooling="mean",
            sparse_prediction=True,  # masked-LM logits only at the masked positions
            embedding_dropout=model_args.dropout,
            mlp_dropout=model_args.dropout,
            attention_dropout=model_args.dropout,
            classifier_dropout=model_args.dropout,
        )
    return BertConfig(**common, hidden_dropout_prob=model_args.dropout,
                      attention_probs_dropout_prob=model_args.dropout)


def pretrain_encoder(tokenizer, config, texts: list[str], model_args,
                     training_args) -> tuple[Path, dict]:
    """Masked-LM pretraining of the built encoder; returns the checkpoint directory and
    the pretraining metrics.

    On a small model the LM head over the whole vocabulary, not the encoder, is most of the
    cost of a masked-LM step: short sequences (`pretrain_max_length`) and, for ModernBERT,
    logits only at the masked positions keep it cheap (about 4x faster here than logits at
    every position).
    """
    out = Path(training_args.output_dir) / "mlm_pretrain"

    def tokenize_in_chunks(batch):
        # Long texts become several sequences instead of losing their tails.
        encoding = tokenizer(batch["text"], truncation=True, max_length=model_args.pretrain_max_length,
                             return_overflowing_tokens=True, return_token_type_ids=False)
        encoding.pop("overflow_to_sample_mapping", None)
        return encoding

    corpus = Dataset.from_dict({"text": texts}).map(
        tokenize_in_chunks, batched=True, remove_columns=["text"], desc="tokenizing the pretraining corpus",
    )
    mlm_args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=model_args.pretrain_epochs,
        learning_rate=model_args.pretrain_learning_rate,
        per_device_train_batch_size=training_args.per_device_train_batch_size,
        warmup_steps=training_args.warmup_steps,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        logging_steps=training_args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=training_args.seed,
        bf16=training_args.bf16,
        use_cpu=training_args.use_cpu,
        disable_tqdm=training_args.disable_tqdm,
    )
    trainer = Trainer(
        model=AutoModelForMaskedLM.from_config(config),
        args=mlm_args,
        train_dataset=corpus,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
        processing_class=tokenizer,
    )
    result = trainer.train()
    trainer.save_model(str(out))
    trainer.accelerator.wait_for_everyone()  # every rank loads what the main rank wrote
    return out, {
        "loss": result.metrics["train_loss"],
        "first_logged_loss": next((h["loss"] for h in trainer.state.log_history if "loss" in h), None),
        "epochs": result.metrics["epoch"],
        "sequences": len(corpus),
        "runtime_s": round(result.metrics["train_runtime"], 1),
    }


@cli_main
def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, training_args = parse_args(
        [DataArguments, ModelArguments, ClassifierTrainingArguments], argv, description=__doc__
    )
    set_seed(training_args.seed)
    start = time.time()

    # ------------------------------------------------------------------------- data
    data_dir = Path(data_args.data_dir)
    if not (data_dir / "train.csv").is_file():
        raise UserError(f"{data_dir}/train.csv not found: run chinese_classifier/prepare_data.py first")
    splits = load_files({s: str(data_dir / f"{s}.csv") for s in ("train", "valid", "test")},
                        required_columns=["label", "text"])
    if data_args.max_train_samples:
        splits["train"] = splits["train"].select(range(min(data_args.max_train_samples, len(splits["train"]))))
    labels_file = data_dir / "labels.json"
    if labels_file.is_file():
        names = json.loads(labels_file.read_text(encoding="utf-8"))["names"]
    else:
        names = [str(i) for i in range(max(max(splits[s]["label"]) for s in splits) + 1)]
    logger.info("rows: %s; labels: %s", {s: len(d) for s, d in splits.items()}, names)

    # ------------------------------------------------------------- tokenizer and model
    id2label = dict(enumerate(names))
    label2id = {name: i for i, name in id2label.items()}
    pretrain_metrics = None
    if model_args.model_name_or_path:
        tokenizer = load_tokenizer(model_args.model_name_or_path, add_special_tokens=False)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_args.model_name_or_path, num_labels=len(names), id2label=id2label,
            label2id=label2id, trust_remote_code=False,
        )
    else:
        tokenizer = build_chinese_tokenizer(splits["train"]["text"], vocab_size=model_args.vocab_size)
        config = build_config(model_args, tokenizer, data_args.max_length, id2label)
        if model_args.pretrain_epochs > 0:
            # Only training texts: valid and test stay unseen, even unlabelled.
            texts = list(splits["train"]["text"])
            if model_args.pretrain_on_peoples_daily:
                texts += load_peoples_daily()
            pretrained, pretrain_metrics = pretrain_encoder(tokenizer, config, texts, model_args, training_args)
            logger.info("masked-LM pretraining: %s", pretrain_metrics)
            model = AutoModelForSequenceClassification.from_pretrained(pretrained, config=config)
        else:
            model = AutoModelForSequenceClassification.from_config(config)
    logger.info("model: %s, %.2fM parameters", type(model).__name__, model.num_parameters() / 1e6)

    # Saved with the tokenizer, so predict.py and serve.py truncate as training did.
    tokenizer.model_max_length = data_args.max_length

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=data_args.max_length)

    encoded = splits.map(tokenize, batched=True, remove_columns=["text"], desc="tokenizing")
    encoded = encoded.rename_column("label", "labels")

    # --------------------------------------------------------------------------- train
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=encoded["train"],
        eval_dataset=encoded["valid"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # ------------------------------------------------------------- evaluate and save
    output_dir = Path(training_args.output_dir)
    test_output = trainer.predict(encoded["test"], metric_key_prefix="test")
    test_labels = np.asarray(encoded["test"]["labels"])
    test_predictions = test_output.predictions.argmax(-1)
    matrix = confusion_matrix(test_labels, test_predictions, labels=list(range(len(names))))

    metrics = {
        "model": {
            "test_accuracy": test_output.metrics["test_accuracy"],
            "test_macro_f1": test_output.metrics["test_macro_f1"],
            "test_loss": test_output.metrics["test_loss"],
            "best_valid_accuracy": trainer.state.best_metric,
            "parameters": model.num_parameters(),
        },
        "train": {
            "loss": train_result.metrics.get("train_loss"),
            "first_logged_loss": next((h["loss"] for h in trainer.state.log_history if "loss" in h), None),
            "epochs": train_result.metrics.get("epoch"),
            "steps": trainer.state.global_step,
        },
        "runtime_s": round(time.time() - start, 1),  # data, pretraining, training and test
        "mlm_pretraining": pretrain_metrics,
        "labels": names,
        "confusion_matrix": matrix.tolist(),
        "rows": {s: len(d) for s, d in splits.items()},
    }
    trainer.save_model(str(output_dir))  # on every rank: DeepSpeed ZeRO-3 gathers the weights here
    if not trainer.is_world_process_zero():
        return metrics
    if data_args.run_baseline:
        metrics["tfidf_logreg_baseline"] = {
            f"test_{k}": v for k, v in tfidf_baseline(
                splits["train"]["text"], splits["train"]["label"],
                splits["test"]["text"], splits["test"]["label"], training_args.seed,
            ).items()
        }

    save_confusion_matrix(matrix, names, output_dir / "confusion_matrix.png")
    (output_dir / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    plot_losses(trainer.state.log_history, output_dir / "loss.png", "chinese_classifier")
    line = f"test accuracy {metrics['model']['test_accuracy']:.4f} (macro-F1 {metrics['model']['test_macro_f1']:.4f})"
    if "tfidf_logreg_baseline" in metrics:
        line += f" | TF-IDF + logistic regression {metrics['tfidf_logreg_baseline']['test_accuracy']:.4f}"
    print(line)
    print(f"model, metrics.json and confusion_matrix.png in {output_dir}")
    if not math.isfinite(metrics["model"]["test_loss"]):
        raise UserError("training diverged (test loss is not finite): lower the learning rate")
    return metrics


if __name__ == "__main__":
    main()
