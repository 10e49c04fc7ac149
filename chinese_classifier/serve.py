"""HTTP API for a trained classifier (FastAPI + uvicorn), bound to 127.0.0.1 by default.

    python chinese_classifier/serve.py --model outputs/chinese_classifier --port 8000
    curl -s localhost:8000/health
    curl -s localhost:8000/predict -H 'content-type: application/json' -d '{"text": "这本书写得太好了"}'
    curl -s localhost:8000/predict -H 'content-type: application/json' -d '{"texts": ["很好", "太差了"]}'

Every request is validated: exactly one of `text` / `texts`, no empty text, at most
`--max_items` texts of at most `--max_chars` characters; bad requests get a 4xx answer.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from common.errors import cli_main

from predict import DEFAULT_MODEL, TextClassifier


class PredictRequest(BaseModel):
    text: str | None = None
    texts: list[str] | None = None


class Prediction(BaseModel):
    label: str
    label_id: int
    probability: float
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    predictions: list[Prediction]


def create_app(classifier: TextClassifier, max_items: int = 64, max_chars: int = 2000) -> FastAPI:
    app = FastAPI(title="chinese_classifier", description="Chinese text classification")
    lock = threading.Lock()  # one forward pass at a time: torch already uses every core
    max_body = max_items * (max_chars * 4 + 16) + 1024  # UTF-8 is at most 4 bytes per character

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            return JSONResponse({"detail": f"request body over {max_body} bytes"}, status_code=413)
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "labels": classifier.labels}

    @app.post("/predict", response_model=PredictResponse)
    def predict(request: PredictRequest) -> dict:
        if (request.text is None) == (request.texts is None):
            raise HTTPException(422, "give exactly one of 'text' (a string) or 'texts' (a list of strings)")
        texts = [request.text] if request.text is not None else request.texts
        if not texts:
            raise HTTPException(422, "'texts' is empty")
        if len(texts) > max_items:
            raise HTTPException(413, f"{len(texts)} texts in one request; the limit is {max_items}")
        for i, text in enumerate(texts):
            if not text.strip():
                raise HTTPException(422, f"text {i} is empty")
            if len(text) > max_chars:
                raise HTTPException(413, f"text {i} has {len(text)} characters; the limit is {max_chars}")
        with lock:
            results = classifier.predict(texts)
        return {"predictions": results}

    return app


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "--model_name_or_path", type=Path, default=Path(DEFAULT_MODEL), help="Trained model directory.")
    parser.add_argument("--host", default="127.0.0.1", help="Use 0.0.0.0 to accept other machines.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_items", type=int, default=64, help="Most texts in one request.")
    parser.add_argument("--max_chars", type=int, default=2000, help="Most characters in one text.")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    app = create_app(TextClassifier(args.model, device=args.device), args.max_items, args.max_chars)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
