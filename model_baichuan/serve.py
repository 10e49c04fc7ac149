"""OpenAI-compatible HTTP server for a Baichuan model (convert.py's output, a tuned adapter or
a merged checkpoint), bound to 127.0.0.1 by default.

    python model_baichuan/serve.py --model outputs/baichuan2_7b_chat --port 8000
    python model_baichuan/serve.py --model outputs/model_baichuan --max_concurrent 16

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    stream = client.chat.completions.create(model="baichuan2_7b_chat", stream=True,
        messages=[{"role": "user", "content": "解释一下“温故而知新”"}])

Chat requests are rendered with the baichuan2 template (`<reserved_106>` user,
`<reserved_107>` reply); a request that leaves sampling out gets Baichuan2-Chat's defaults
(temperature 0.3, top_k 5, top_p 0.85, repetition_penalty 1.05). Concurrent requests are
decoded together (continuous batching, up to --max_concurrent); on a GPU the decode step
runs as CUDA graphs (the first request at each batch size compiles for about a minute).
Endpoints and limits: see common/serving/api.py; speed: benchmarks/RESULTS.md.
"""

from __future__ import annotations

from common.errors import cli_main
from common.serving.cli import run_server
from common.serving.sampling import SamplingParams

DEFAULT_MODEL = "outputs/model_baichuan"
# Baichuan2-Chat's generation_config.json
BAICHUAN2_SAMPLING = SamplingParams(max_new_tokens=2048, temperature=0.3, top_p=0.85, top_k=5, repetition_penalty=1.05)


@cli_main
def main(argv: list[str] | None = None) -> None:
    run_server(argv, DEFAULT_MODEL, __doc__, defaults=BAICHUAN2_SAMPLING)


if __name__ == "__main__":
    main()
