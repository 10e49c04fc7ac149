"""Serve any local causal LM: streamed generation, an OpenAI-compatible HTTP API and a
gradio chat UI. Every generative recipe's `serve.py` and `chatbot.py` are thin callers.

    python chinese_gpt2/serve.py --model outputs/chinese_gpt2           # http://127.0.0.1:8000/v1
    python chinese_gpt2/chatbot.py --model outputs/chinese_gpt2         # http://127.0.0.1:7860

The modules, from the bottom up (import the one you need: this file imports none, so a
training script that needs `loading` does not load FastAPI or gradio):
- `loading`: model + tokenizer from a local directory (never downloads), LoRA adapters.
- `runtime`: the process-wide settings serving changes, applied in one place when an Engine starts.
- `sampling`: one request's decoding settings (`SamplingParams`).
- `batcher`: `Batcher`, the background thread that decodes every running request together
  (continuous batching; CUDA graphs on CUDA), and `SequentialDecoder`, the correct fallback for
  models the batcher cannot drive (BLOOM's ALiBi, custom caches).
- `text`: `GenerationStream`, one generation read as text deltas: stop strings, a
  WordPiece-aware detokenizer, cancellation (a client that goes away stops its generation).
- `engine`: `Engine`, a model with its tokenizer, chat template and decoder.
- `api`: `create_app`, the FastAPI app (`/v1/completions`, `/v1/chat/completions`,
  `/v1/models`, `/health`) with its request limits.
- `ui`: `build_chat_ui`, the gradio chat.
- `cli`: `run_server` / `run_chatbot`, the command lines of the recipes' serve.py / chatbot.py.
"""
