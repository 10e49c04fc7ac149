"""Use a trained Chinese CLIP: rank texts for an image, or search a folder of images with a text.

    python chinese_clip/predict.py --image photo.jpg --texts "左上角有一个红色的圆形" "图中有两个蓝色的正方形"
    python chinese_clip/predict.py --search "左上角有一个红色的圆形" --image_dir data/chinese_clip/source/images/test --top_k 5

A folder's image embeddings are cached in `--index` (default `<model>/image_index.npz`): a
later search embeds only images that are new or changed since. Unreadable images are
skipped with a warning.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, ChineseCLIPModel

from common.errors import UserError, cli_main
from common.images import CLIP_MEAN, CLIP_STD, check_image, load_square, normalize

DEFAULT_MODEL = "outputs/chinese_clip"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
logger = logging.getLogger("predict")


class CLIPSearcher:
    def __init__(self, model_dir: str | Path = DEFAULT_MODEL, device: str | None = None):
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise UserError(f"no trained model in {self.model_dir}: run chinese_clip/train.py first")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = ChineseCLIPModel.from_pretrained(self.model_dir).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.image_size = self.model.config.vision_config.image_size

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        if not texts or any(not t.strip() for t in texts):
            raise UserError("give at least one non-empty text")
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt").to(self.device)
        features = self.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return torch.nn.functional.normalize(features.pooler_output.float(), dim=-1).cpu()

    @torch.inference_mode()
    def embed_images(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [N, S, S, 3] at the model's image size."""
        batch = normalize(torch.from_numpy(pixels).to(self.device), CLIP_MEAN, CLIP_STD)
        features = self.model.get_image_features(pixel_values=batch).pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    def load(self, path: str | Path) -> np.ndarray:
        status = check_image(Path(path), min_size=1)
        if status not in ("ok", "converted"):
            raise UserError(f"{path}: cannot use this image ({status})")
        return load_square(Path(path), self.image_size)

    def rank_texts(self, image: str | Path | np.ndarray, texts: list[str]) -> list[tuple[str, float]]:
        """Texts with their softmax probability for the image, best first."""
        pixels = image if isinstance(image, np.ndarray) else self.load(image)
        image_features = self.embed_images(pixels[None])
        logits = self.model.logit_scale.exp().item() * image_features @ self.embed_texts(texts).t()
        probabilities = logits.softmax(dim=-1)[0].tolist()
        return sorted(zip(texts, probabilities), key=lambda pair: -pair[1])

    def index_folder(self, image_dir: str | Path, index_path: str | Path | None = None) -> tuple[list[Path], torch.Tensor]:
        """Embeddings of every usable image under `image_dir`, reusing the cached ones."""
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise UserError(f"{image_dir}: not a folder")
        index_path = Path(index_path or self.model_dir / "image_index.npz")
        paths = sorted(p.resolve() for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        cached = {}
        if index_path.is_file():
            stored = np.load(index_path, allow_pickle=False)
            cached = {(p, m): e for p, m, e in zip(stored["paths"], stored["mtimes"], stored["embeddings"])}
        keys = [(str(p), p.stat().st_mtime) for p in paths]
        todo = [i for i, key in enumerate(keys) if key not in cached]
        usable = []
        for i in todo:
            status = check_image(paths[i], min_size=1)
            if status in ("ok", "converted"):
                usable.append(i)
            else:
                logger.warning("skipping %s (%s)", paths[i], status)
        for start in range(0, len(usable), 64):
            chunk = usable[start:start + 64]
            embeddings = self.embed_images(np.stack([load_square(paths[i], self.image_size) for i in chunk]))
            cached.update({keys[i]: e for i, e in zip(chunk, embeddings.numpy())})
        kept = [i for i, key in enumerate(keys) if key in cached]
        if not kept:
            raise UserError(f"{image_dir}: no usable image")
        embeddings = np.stack([cached[keys[i]] for i in kept])
        np.savez(index_path, paths=np.array([keys[i][0] for i in kept]), mtimes=np.array([keys[i][1] for i in kept]),
                 embeddings=embeddings)
        logger.info("%s: %d images, %d embedded now", image_dir, len(kept), len(usable))
        return [paths[i] for i in kept], torch.from_numpy(embeddings)

    def search(self, text: str, image_dir: str | Path, top_k: int = 5, index_path=None) -> list[tuple[Path, float]]:
        paths, embeddings = self.index_folder(image_dir, index_path)
        scores = (embeddings @ self.embed_texts([text])[0]).tolist()
        best = sorted(range(len(paths)), key=lambda i: -scores[i])[:top_k]
        return [(paths[i], scores[i]) for i in best]


@cli_main
def main(argv: list[str] | None = None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "--model_name_or_path", default=DEFAULT_MODEL, help="train.py's output_dir.")
    parser.add_argument("--image", help="An image whose candidate --texts to rank.")
    parser.add_argument("--texts", nargs="+", help="Candidate texts for --image.")
    parser.add_argument("--search", help="A text to look for in --image_dir.")
    parser.add_argument("--image_dir", help="A folder of images to search (sub-folders included).")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--index", default=None, help="Embedding cache file (default <model>/image_index.npz).")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if bool(args.image) == bool(args.search):
        raise UserError("give either --image with --texts, or --search with --image_dir")
    searcher = CLIPSearcher(args.model, args.device)
    if args.image:
        if not args.texts:
            raise UserError("--image needs candidate --texts")
        results = searcher.rank_texts(args.image, args.texts)
        for text, probability in results:
            print(f"{probability:.3f}  {text}")
        return results
    if not args.image_dir:
        raise UserError("--search needs --image_dir")
    results = searcher.search(args.search, args.image_dir, args.top_k, args.index)
    for path, score in results:
        print(f"{score:.3f}  {path}")
    return results


if __name__ == "__main__":
    main()
