"""Caption images in the browser (gradio), on http://127.0.0.1:7860.

    python vit_gpt2_captioning/app.py --model outputs/vit_gpt2_captioning

Upload an image: the caption comes back (beam search; the sliders set beams and length).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from common.errors import cli_main
from common.images import to_rgb

from predict import DEFAULT_MODEL, Captioner

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def build_app(captioner: Captioner):
    import gradio as gr
    from PIL import Image

    def caption(image, num_beams: float, max_new_tokens: float) -> str:
        if image is None:
            raise gr.Error("Upload an image first.")
        # the centre square, as prepare_data.py caches training images
        image = to_rgb(image)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.crop((left, top, left + side, top + side)).resize(
            (captioner.image_size, captioner.image_size), Image.Resampling.BICUBIC)
        return captioner.caption([np.asarray(square, dtype=np.uint8).copy()], num_beams=int(num_beams),
                                 max_new_tokens=int(max_new_tokens))[0]

    with gr.Blocks(title="Image captioning") as app:
        gr.Markdown("# Image -> Chinese caption (ViT + GPT-2)")
        with gr.Row():
            image = gr.Image(type="pil", label="Image")
            with gr.Column():
                beams = gr.Slider(1, 8, 4, step=1, label="Beams")
                length = gr.Slider(4, 32, 16, step=1, label="Max new tokens")
                text = gr.Textbox(label="Caption")
        gr.Button("Caption").click(caption, [image, beams, length], text, api_name="caption")
    return app


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "--model_name_or_path", default=DEFAULT_MODEL, help="train.py's output_dir.")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines.")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    captioner = Captioner(args.model, args.device)
    print(f"captioning app at http://{args.host}:{args.port}", flush=True)
    build_app(captioner).launch(server_name=args.host, server_port=args.port, share=False)


if __name__ == "__main__":
    main()
