"""Chat with an instruction-tuned model in the browser (gradio), on http://127.0.0.1:7860.

    python chatglm_lora/chatbot.py --model outputs/chatglm_lora
    python chatglm_lora/chatbot.py --model outputs/chatglm_lora_merged --system_prompt "你是一个乐于助人的助手。"

Multi-turn: the history is rendered with the model's template exactly as in training (the
oldest turns are dropped when it outgrows the context); replies stream token by token; the
system prompt and sampling settings sit under "Generation settings"; the stop button ends
the generation itself.
"""

from __future__ import annotations

from common.errors import cli_main
from common.instructions import SEGMENT_PROMPT, SENTIMENT_PROMPT
from common.serving.cli import run_chatbot
from common.serving.sampling import SamplingParams

DEFAULT_MODEL = "outputs/chatglm_lora"


@cli_main
def main(argv: list[str] | None = None) -> None:
    run_chatbot(
        argv, DEFAULT_MODEL, __doc__, title="Instruction-tuned GLM",
        defaults=SamplingParams(max_new_tokens=128, temperature=0.0),
        examples=[SENTIMENT_PROMPT.format(text="质量很好，物流也快，推荐购买"),
                  SEGMENT_PROMPT.format(text="新华社北京一月一日电。")],
    )


if __name__ == "__main__":
    main()
