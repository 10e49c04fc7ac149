"""The gradio chat UI over an Engine: streamed replies, history, sampling sliders, a stop button."""

from __future__ import annotations

import os

from common.errors import UserError
from common.serving.engine import Engine
from common.serving.sampling import SamplingParams

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported


def _history_text(content) -> str:
    """gradio hands message content over as a string or as a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    if isinstance(content, list):
        return "".join(_history_text(part) for part in content)
    return ""


def fit_conversation(engine: Engine, messages: list[dict], max_new_tokens: int) -> tuple[list[int], tuple[str, ...]]:
    """Prompt ids for the conversation, dropping the oldest turns (never the system message
    or the last user message) until prompt and reply fit in the context."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        ids, stop = engine.chat_ids(system + turns)
        if len(ids) + max_new_tokens <= engine.context_length:
            return ids, stop
        if len(turns) <= 1:
            raise UserError(f"the message is {len(ids)} tokens long; with {max_new_tokens} new tokens it does "
                            f"not fit the model's context of {engine.context_length}: shorten it or lower max tokens")
        turns = turns[2:]  # the oldest exchange


def build_chat_ui(engine: Engine, title: str, description: str = "", defaults: SamplingParams | None = None,
                  system_prompt: str = "", examples: list[str] | None = None):
    """A gradio ChatInterface over `engine`: streamed replies, multi-turn history, sampling
    sliders, and a stop button that stops the generation itself, not only the display."""
    import gradio as gr

    defaults = defaults or SamplingParams()
    max_new = max(1, engine.context_length // 2)

    def reply(message: str, history: list[dict], system: str, max_new_tokens: float, temperature: float,
              top_p: float, top_k: float, repetition_penalty: float):
        messages = [{"role": "system", "content": system}] if system.strip() else []
        messages += [{"role": m["role"], "content": _history_text(m["content"])} for m in history
                     if m.get("role") in ("user", "assistant")]
        messages.append({"role": "user", "content": message})
        if not message.strip():
            raise gr.Error("Type a message first.")
        params = SamplingParams(int(max_new_tokens), temperature, top_p, int(top_k), repetition_penalty)
        try:
            prompt_ids, stop = fit_conversation(engine, messages, params.max_new_tokens)
            params.stop = stop
            generation = engine.stream(prompt_ids, params)
        except UserError as err:
            raise gr.Error(str(err)) from None
        text = ""
        try:  # gradio closes this generator when the user presses stop: the finally cancels
            for delta in generation:
                text += delta
                yield text
        finally:
            generation.cancel()
        if not text:
            yield "（模型没有生成内容 / the model produced no text）"

    inputs = [
        gr.Textbox(system_prompt, label="System prompt"),
        gr.Slider(1, max_new, min(defaults.max_new_tokens, max_new), step=1, label="Max new tokens"),
        gr.Slider(0.0, 2.0, defaults.temperature, step=0.05, label="Temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, defaults.top_p, step=0.05, label="Top-p"),
        gr.Slider(0, 200, defaults.top_k, step=1, label="Top-k (0 = off)"),
        gr.Slider(1.0, 2.0, defaults.repetition_penalty, step=0.01, label="Repetition penalty"),
    ]
    return gr.ChatInterface(
        reply, title=title, description=description, additional_inputs=inputs,
        additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
        examples=[[e, system_prompt, *[i.value for i in inputs[1:]]] for e in examples or []] or None,
        fill_height=True, api_name="chat",
    )
