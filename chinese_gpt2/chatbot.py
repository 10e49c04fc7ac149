"""Chat with a trained Chinese GPT-2 in the browser (gradio), on http://127.0.0.1:7860.

    python chinese_gpt2/chatbot.py --model outputs/chinese_gpt2

Replies stream token by token; the conversation is kept (the oldest turns are dropped when
it outgrows the model's context); sampling settings sit under "Generation settings"; the stop
button ends the generation itself. A base GPT-2 trained on news continues text rather than
following instructions: treat the reply as a continuation of your message.
"""

from __future__ import annotations

from common.errors import cli_main
from common.serving.cli import run_chatbot
from common.serving.sampling import SamplingParams

DEFAULT_MODEL = "outputs/chinese_gpt2"


@cli_main
def main(argv: list[str] | None = None) -> None:
    run_chatbot(
        argv, DEFAULT_MODEL, __doc__, title="Chinese GPT-2",
        defaults=SamplingParams(max_new_tokens=64, temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.2),
        examples=["新华社北京电", "今年以来，我国经济"],
    )


if __name__ == "__main__":
    main()
