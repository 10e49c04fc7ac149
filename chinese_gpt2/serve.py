"""OpenAI-compatible HTTP server for a trained Chinese GPT-2 (or any local causal LM),
bound to 127.0.0.1 by default.

    python chinese_gpt2/serve.py --model outputs/chinese_gpt2 --port 8000

    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "chinese_gpt2", "prompt": "新华社北京电", "max_tokens": 40, "temperature": 0.8}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    for chunk in client.completions.create(model="chinese_gpt2", prompt="今天", max_tokens=40, stream=True):
        print(chunk.choices[0].text, end="", flush=True)

Endpoints: POST /v1/completions, POST /v1/chat/completions (`stream: true` for server-sent
events), GET /v1/models, GET /health. Beyond the OpenAI fields, requests take top_k,
repetition_penalty and ignore_eos. A base GPT-2 knows no chat format: chat requests use the
"plain" transcript template (用户：… / 助手：…) unless --template says otherwise.
"""

from __future__ import annotations

from common.errors import cli_main
from common.serving.cli import run_server

DEFAULT_MODEL = "outputs/chinese_gpt2"


@cli_main
def main(argv: list[str] | None = None) -> None:
    run_server(argv, DEFAULT_MODEL, __doc__)


if __name__ == "__main__":
    main()
