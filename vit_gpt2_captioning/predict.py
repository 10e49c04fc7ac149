"""Caption images with a trained ViT + GPT-2 model.

    python vit_gpt2_captioning/predict.py photo1.jpg photo2.png
    python vit_gpt2_captioning/predict.py photo.jpg --num_beams 1 --do_sample --temperature 0.8 --top_p 0.9

Beam search by default (4 beams, at most 16 new tokens); sampling with --do_sample. Output
is Chinese without the spaces a WordPiece decode puts between characters.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, VisionEncoderDecoderModel

from common.errors import UserError, cli_main
from common.images import caption_images, check_image, load_square

DEFAULT_MODEL = "outputs/vit_gpt2_captioning"


class Captioner:
    def __init__(self, model_dir: str | Path = DEFAULT_MODEL, device: str | None = None):
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise UserError(f"no trained model in {model_dir}: run vit_gpt2_captioning/train.py first")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = VisionEncoderDecoderModel.from_pretrained(model_dir).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.image_size = self.model.config.encoder.image_size

    def load(self, path: str | Path):
        status = check_image(Path(path), min_size=1)
        if status not in ("ok", "converted"):
            raise UserError(f"{path}: cannot use this image ({status})")
        return load_square(Path(path), self.image_size)

    def caption(self, images: list, **generation) -> list[str]:
        """`images`: paths or uint8 arrays [S, S, 3] at the model's image size."""
        arrays = [image if isinstance(image, np.ndarray) else self.load(image) for image in images]
        return caption_images(self.model, self.tokenizer, torch.from_numpy(np.stack(arrays)), **generation)


@cli_main
def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="Image files.")
    parser.add_argument("--model", "--model_name_or_path", default=DEFAULT_MODEL, help="train.py's output_dir.")
    parser.add_argument("--num_beams", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--do_sample", action="store_true", help="Sample instead of searching.")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.num_beams < 1 or args.max_new_tokens < 1 or args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise UserError("need --num_beams >= 1, --max_new_tokens >= 1, --temperature > 0, --top_p in (0, 1]")
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.do_sample else {}
    captions = Captioner(args.model, args.device).caption(
        args.images, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, **sampling)
    for path, caption in zip(args.images, captions):
        print(f"{path}\t{caption}")
    return captions


if __name__ == "__main__":
    main()
