"""Try a trained Chinese CLIP in the browser (gradio), on http://127.0.0.1:7860.

    python chinese_clip/app.py --model outputs/chinese_clip --image_dir data/chinese_clip/source/images/test

Two tabs: "Rank texts" (upload an image, give candidate texts one per line: their
probabilities) and "Search images" (type a text: the best matches in --image_dir, whose
embeddings are computed once and cached).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from common.errors import UserError, cli_main
from common.images import to_rgb

from predict import DEFAULT_MODEL, CLIPSearcher

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def build_app(searcher: CLIPSearcher, image_dir: str | None):
    import gradio as gr
    from PIL import Image

    def rank(image, texts: str) -> dict:
        if image is None:
            raise gr.Error("Upload an image first.")
        candidates = [t.strip() for t in texts.splitlines() if t.strip()]
        if not candidates:
            raise gr.Error("Give at least one candidate text, one per line.")
        pixels = to_rgb(image).resize((searcher.image_size, searcher.image_size), Image.Resampling.BICUBIC)
        return dict(searcher.rank_texts(np.asarray(pixels, dtype=np.uint8), candidates))

    def search(text: str, top_k: float) -> list:
        if not image_dir:
            raise gr.Error("Start the app with --image_dir to search a folder.")
        try:
            results = searcher.search(text, image_dir, int(top_k))
        except UserError as err:
            raise gr.Error(str(err)) from None
        return [(str(path), f"{score:.3f}") for path, score in results]

    with gr.Blocks(title="Chinese CLIP") as app:
        gr.Markdown("# Chinese CLIP")
        with gr.Tab("Rank texts"):
            with gr.Row():
                image = gr.Image(type="pil", label="Image")
                texts = gr.Textbox(lines=6, label="Candidate texts, one per line",
                                   value="左上角有一个红色的圆形\n图中有两个蓝色的正方形\n右下角有一个绿色的三角形")
            ranked = gr.Label(label="Probabilities")
            gr.Button("Rank").click(rank, [image, texts], ranked, api_name="rank")
        with gr.Tab("Search images"):
            query = gr.Textbox(label="Text", value="左上角有一个红色的圆形")
            top_k = gr.Slider(1, 20, 6, step=1, label="Results")
            gallery = gr.Gallery(label=f"Best matches in {image_dir or '(no --image_dir)'}", columns=6)
            gr.Button("Search").click(search, [query, top_k], gallery, api_name="search")
    return app


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "--model_name_or_path", default=DEFAULT_MODEL, help="train.py's output_dir.")
    parser.add_argument("--image_dir", default=None, help="Folder searched by the second tab.")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines.")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    searcher = CLIPSearcher(args.model, args.device)
    print(f"Chinese CLIP app at http://{args.host}:{args.port}", flush=True)
    build_app(searcher, args.image_dir).launch(server_name=args.host, server_port=args.port, share=False,
                                               allowed_paths=[args.image_dir] if args.image_dir else None)


if __name__ == "__main__":
    main()
