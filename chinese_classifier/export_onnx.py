"""Export a trained classifier to ONNX and prove the export right on the test split.

    python chinese_classifier/export_onnx.py --model outputs/chinese_classifier

Exports with torch.export (the dynamo exporter: dynamic batch and length), then runs the
test split through onnxruntime and PyTorch with the same tokenisation and fails unless
every class probability agrees within `--tolerance` (1e-4). Prints both latencies at
batch size 1 and writes `onnx_report.json` beside the model. Needs the `onnx` extra
(`pip install -e '.[onnx]'`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from common.data import load_files
from common.errors import UserError, cli_main

from predict import DEFAULT_MODEL, TextClassifier


class LogitsOnly(torch.nn.Module):
    """The classifier as a function of plain tensors, which is what ONNX can express."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export(classifier: TextClassifier, path: Path) -> None:
    example = classifier.encode(["示例文本", "另一个更长一些的示例文本"])
    batch = torch.export.Dim("batch")
    length = torch.export.Dim("length", max=classifier.tokenizer.model_max_length)
    torch.onnx.export(
        LogitsOnly(classifier.model).eval(),
        (example["input_ids"], example["attention_mask"]),
        str(path),
        dynamo=True,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
        external_data=False,
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def onnx_probabilities(session, classifier: TextClassifier, texts: list[str], batch_size: int) -> np.ndarray:
    out = []
    for start in range(0, len(texts), batch_size):
        encoding = classifier.encode(texts[start:start + batch_size])
        feeds = {name: encoding[name].numpy() for name in ("input_ids", "attention_mask")}
        out.append(softmax(session.run(["logits"], feeds)[0]))
    return np.concatenate(out)


def median_latency_ms(fn, texts: list[str]) -> float:
    fn(texts[:1])  # warm-up
    times = []
    for text in texts:
        start = time.perf_counter()
        fn([text])
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@cli_main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "--model_name_or_path", type=Path, default=Path(DEFAULT_MODEL), help="Trained model directory.")
    parser.add_argument("--output", type=Path, help="ONNX file (default: <model>/model.onnx).")
    parser.add_argument("--data_dir", type=Path, default=Path("data/chinese_classifier"),
                        help="Folder with test.csv, the texts the parity check runs on.")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="Largest allowed probability difference.")
    parser.add_argument("--latency_samples", type=int, default=200, help="Texts timed one by one.")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install -e '.[onnx]'") from None

    classifier = TextClassifier(args.model, device="cpu")
    output = args.output or args.model / "model.onnx"
    export(classifier, output)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])

    texts = [t for t in load_files(str(args.data_dir / "test.csv"), required_columns=["text"])["train"]["text"]]
    torch_probs = classifier.predict_proba(texts, batch_size=args.batch_size)
    ort_probs = onnx_probabilities(session, classifier, texts, args.batch_size)
    max_diff = float(np.abs(torch_probs - ort_probs).max())
    timed = texts[: args.latency_samples]
    report = {
        "onnx_file": str(output),
        "texts_checked": len(texts),
        "max_abs_probability_diff": max_diff,
        "tolerance": args.tolerance,
        "same_predicted_label": float((torch_probs.argmax(-1) == ort_probs.argmax(-1)).mean()),
        "latency_ms_batch1_median": {
            "pytorch": median_latency_ms(lambda t: classifier.predict_proba(t), timed),
            "onnxruntime": median_latency_ms(lambda t: onnx_probabilities(session, classifier, t, 1), timed),
        },
        "torch_threads": torch.get_num_threads(),
    }
    (args.model / "onnx_report.json").write_text(json.dumps(report, indent=2) + "\n")
    lat = report["latency_ms_batch1_median"]
    print(f"exported {output}")
    print(f"parity on {len(texts)} test texts: max |p_torch - p_onnx| = {max_diff:.2e} (tolerance {args.tolerance:g})")
    print(f"median latency, batch 1, CPU: PyTorch {lat['pytorch']:.2f} ms, onnxruntime {lat['onnxruntime']:.2f} ms")
    if not max_diff <= args.tolerance:
        raise UserError(f"ONNX export does not match PyTorch: max difference {max_diff:.2e} > {args.tolerance:g}")
    return report


if __name__ == "__main__":
    main()
