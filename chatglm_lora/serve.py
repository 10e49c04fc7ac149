"""OpenAI-compatible HTTP server for an instruction-tuned model (LoRA adapter or merged
checkpoint), bound to 127.0.0.1 by default.

    python chatglm_lora/serve.py --model outputs/chatglm_lora --port 8000
    python chatglm_lora/serve.py --model outputs/chatglm_lora --base_model /models/glm-4-9b-chat-hf

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    reply = client.chat.completions.create(model="chatglm_lora", temperature=0,
        messages=[{"role": "user", "content": "判断下面这条评论的情感是正面还是负面：\n质量很好"}])

Chat requests are rendered with the template the model was tuned with (the Jinja chat template it carries,
or --template), token for token as in training; the template's stop tokens end a reply. An
adapter is merged into its base at load. Endpoints and limits: see common/serving/api.py.
"""

from __future__ import annotations

from common.errors import cli_main
from common.serving.cli import run_server

DEFAULT_MODEL = "outputs/chatglm_lora"


@cli_main
def main(argv: list[str] | None = None) -> None:
    run_server(argv, DEFAULT_MODEL, __doc__)


if __name__ == "__main__":
    main()
