"""Chat with a Baichuan model in the browser (gradio), on http://127.0.0.1:7860.

    python model_baichuan/chatbot.py --model outputs/baichuan2_7b_chat
    python model_baichuan/chatbot.py --model outputs/model_baichuan --temperature 0

Multi-turn, streamed, with Baichuan2-Chat's sampling defaults (temperature 0.3, top_k 5,
top_p 0.85, repetition_penalty 1.05; the sliders under "Generation settings" change them);
the history is rendered with the baichuan2 template as in training, oldest turns dropped
when it outgrows the context; the stop button ends the generation itself.
"""

from __future__ import annotations

from common.errors import cli_main
from common.instructions import SEGMENT_PROMPT, SENTIMENT_PROMPT
from common.serving.cli import run_chatbot
from common.serving.sampling import SamplingParams

DEFAULT_MODEL = "outputs/model_baichuan"
# Baichuan2-Chat's generation_config.json; replies up to 512 tokens by default in the UI
BAICHUAN2_SAMPLING = SamplingParams(max_new_tokens=512, temperature=0.3, top_p=0.85, top_k=5, repetition_penalty=1.05)


@cli_main
def main(argv: list[str] | None = None) -> None:
    run_chatbot(argv, DEFAULT_MODEL, __doc__, title="Baichuan", defaults=BAICHUAN2_SAMPLING,
                examples=[SENTIMENT_PROMPT.format(text="质量很好，物流也快，推荐购买"),
                          SEGMENT_PROMPT.format(text="新华社北京一月一日电。")])


if __name__ == "__main__":
    main()
