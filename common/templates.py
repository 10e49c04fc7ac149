"""Chat templates: one registry for training, inference and serving.

A model must be prompted at serving time exactly as it was trained, or it rambles and never
stops (the most common complaint about fine-tuning tools). So the same `encode_chat` turns a
conversation into token ids for both: training takes `input_ids` + `labels` of a finished
conversation; serving takes the `input_ids` of the conversation so far plus the opening of
the assistant's turn, which are, token for token, the training ids up to that reply.

Each template renders a conversation as segments of text. Segments are tokenised one by
one (never across a boundary, so a reply's first token does not depend on what precedes
it), and only the assistant's replies carry loss. How a reply ends:
- `assistant_suffix` is written after every reply, in history too, and carries loss
  (llama2-chinese's "\\n</s>");
- `end` (usually the tokenizer's eos) is what the model learns to emit after a reply. It
  is appended after the last reply; after an earlier reply the history shows the next turn
  instead, and only the label at that position is `end` (as Baichuan2's own fine-tuning
  code does), so prompts keep the official layout while every reply learns to stop.
`stop` lists what ends a generation besides eos; those that are single tokens of the
tokenizer (`<|user|>`) stop generation by id, the others by text.

Two kinds of template, one interface (`segments`, `render`, `jinja`, `stop`, `end`):
- a registry entry (`ChatTemplate`, below): formats without an official Jinja template
  (ChatGLM2/3, Baichuan2, base models) and entries mirroring official ones (ChatML / Qwen2.5,
  Qwen3, Llama-3, DeepSeek-R1-Distill, GLM-4 / GLM-4.5+), each compared with the official
  template by tests/test_templates.py;
- the model's own Jinja template (`JinjaTemplate`): a reply's span is found by rendering the
  conversation prefix by prefix (the prompt up to a reply is the render of the earlier
  messages with the generation prompt; the reply and its end markers are what the render
  with that reply adds). A template that is not prefix-consistent for a conversation is
  refused with the entry to use instead, never trained with a wrong mask.
`resolve_template` picks one (`--template auto|official|<entry>`); `save_chat_template` writes
into every tuned model a Jinja template that renders exactly what it was trained on (for a
registry entry, generated from the entry) and a generation_config.json whose eos ids include
the template's end tokens, so vLLM, SGLang, `transformers serve` or llama.cpp prompt it alike.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
TEMPLATE_FILE = "sft_template.json"  # older outputs: the name of the template they were trained with


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    user: str  # one user turn, with {content}; {round} is its 1-based number
    assistant_prefix: str  # opens a reply; a generation prompt ends with it
    assistant_suffix: str = ""  # closes every reply (trained)
    system: str = "{content}"  # a system message, with {content}
    prefix: str = ""  # opens every conversation
    end: str | None = "{eos}"  # what a reply learns to end with (see the module docstring)
    stop: tuple[str, ...] = ()
    special_tokens: tuple[str, ...] = ()  # markers that must be single tokens of the vocabulary
    default_system: str | None = None  # written when the conversation has no system message ("" too)
    # Replies after the last user turn ("final") and earlier ones ("history") may be written
    # differently: Qwen3 and DeepSeek-R1 show no reasoning scaffolding in history.
    history_assistant_prefix: str | None = None  # default: assistant_prefix
    reply_prefix: str = ""  # trained text before a final reply's content (an empty <think></think>)
    history_reply_prefix: str | None = None  # default: reply_prefix

    def _parts(self, final: bool) -> tuple[str, str]:
        if final:
            return self.assistant_prefix, self.reply_prefix
        return (self.assistant_prefix if self.history_assistant_prefix is None else self.history_assistant_prefix,
                self.reply_prefix if self.history_reply_prefix is None else self.history_reply_prefix)

    def segments(self, messages: list[dict], add_generation_prompt: bool, bos: str = "",
                 eos: str = "") -> list[tuple[str, str]]:
        """(text, kind) pieces; kind is "prompt", "reply" (trained) or "end" (trained, only
        after the last reply)."""
        check_messages(messages, for_generation=add_generation_prompt)

        def fill(text: str) -> str:
            return text.replace("{bos}", bos or "").replace("{eos}", eos or "")

        pieces = [(fill(self.prefix), "prompt")]
        if self.default_system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        round_ = 0
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "system":
                pieces.append((fill(self.system).replace("{content}", content), "prompt"))
            elif role == "user":
                round_ += 1
                pieces.append((fill(self.user).replace("{round}", str(round_)).replace("{content}", content),
                               "prompt"))
            else:
                assistant_prefix, reply_prefix = self._parts(final=i > last_user)
                pieces.append((fill(assistant_prefix), "prompt"))
                pieces.append((fill(reply_prefix) + content + fill(self.assistant_suffix), "reply"))
        if add_generation_prompt:
            pieces.append((fill(self.assistant_prefix), "prompt"))
        elif self.end:
            pieces.append((fill(self.end), "end"))
        return [(text, kind) for text, kind in pieces if text]

    def render(self, messages: list[dict], add_generation_prompt: bool = True, bos: str = "", eos: str = "") -> str:
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt, bos, eos))

    def jinja(self) -> str:
        """This entry as a Jinja chat template that renders the same text as `render` (with
        the tokenizer's bos / eos), generated from the fields, for other serving stacks."""
        def expr(fmt: str, content: str = "m.content") -> str:
            names = {"{content}": content, "{round}": "(ns.round | string)", "{bos}": "(bos_token or '')",
                     "{eos}": "(eos_token or '')"}
            parts = [names.get(p) or json.dumps(p, ensure_ascii=False)
                     for p in re.split(r"(\{content\}|\{round\}|\{bos\}|\{eos\})", fmt) if p]
            return " + ".join(parts) or "''"

        final, history = "".join(self._parts(final=True)), "".join(self._parts(final=False))
        reply = "{content}" + self.assistant_suffix
        lines = [
            f"{{#- {JINJA_MARK}{self.name}: generated from common/templates.py; training renders the same text -#}}",
            "{%- set ns = namespace(round=0, last_user=-1) -%}",
            "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
            "{%- endif -%}{%- endfor -%}",
        ]
        if self.prefix:
            lines.append(f"{{{{- {expr(self.prefix)} -}}}}")
        if self.default_system is not None:
            lines.append(f"{{%- if messages[0].role != 'system' -%}}"
                         f"{{{{- {expr(self.system, json.dumps(self.default_system, ensure_ascii=False))} -}}}}"
                         "{%- endif -%}")
        lines += [
            "{%- for m in messages -%}",
            f"{{%- if m.role == 'system' -%}}{{{{- {expr(self.system)} -}}}}",
            f"{{%- elif m.role == 'user' -%}}{{%- set ns.round = ns.round + 1 -%}}{{{{- {expr(self.user)} -}}}}",
            f"{{%- elif loop.index0 > ns.last_user -%}}{{{{- {expr(final + reply)} -}}}}",
            f"{{%- else -%}}{{{{- {expr(history + reply)} -}}}}",
            "{%- endif -%}",
            "{%- endfor -%}",
            f"{{%- if add_generation_prompt -%}}{{{{- {expr(self.assistant_prefix)} -}}}}",
        ]
        if self.end:
            lines.append(f"{{%- elif messages[-1].role == 'assistant' -%}}{{{{- {expr(self.end)} -}}}}")
        lines.append("{%- endif -%}")
        return "\n".join(lines) + "\n"


JINJA_MARK = "chinese-nlp-recipes template "  # opens a Jinja template generated from a registry entry
TEMPLATES: dict[str, ChatTemplate] = {}


def register(template: ChatTemplate) -> ChatTemplate:
    TEMPLATES[template.name] = template
    return template


# For base models trained on plain text (chinese_gpt2): a dialogue written as a transcript,
# which such a model can at least continue; it stops where it starts the user's next line.
register(ChatTemplate(
    name="plain", system="{content}\n", user="用户：{content}\n", assistant_prefix="助手：", assistant_suffix="\n",
    end=None, stop=("\n用户：", "用户："),
))
# ChatGLM2-6B: "[Round n]\n\n问：...\n\n答：...\n\n"; [gMASK]sop open every input.
register(ChatTemplate(
    name="chatglm2", prefix="[gMASK]sop", system="{content}\n\n", user="[Round {round}]\n\n问：{content}\n\n",
    assistant_prefix="答：", assistant_suffix="\n\n", special_tokens=("[gMASK]", "sop"),
))
# ChatGLM3-6B: role tokens, each followed by a metadata line ("\n" when empty).
_GLM_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
register(ChatTemplate(
    name="chatglm3", prefix="[gMASK]sop", system="<|system|>\n{content}", user="<|user|>\n{content}",
    assistant_prefix="<|assistant|>\n", stop=("<|user|>", "<|observation|>"),
    special_tokens=("[gMASK]", "sop", *_GLM_ROLES),
))
# GLM-4 (glm-4-9b-chat-hf, GLM-4-0414): as chatglm3 with "<sop>"; its eos is <|endoftext|>.
register(ChatTemplate(
    name="glm4", prefix="[gMASK]<sop>", system="<|system|>\n{content}", user="<|user|>\n{content}",
    assistant_prefix="<|assistant|>\n", stop=("<|user|>", "<|observation|>", "<|endoftext|>"),
    special_tokens=("[gMASK]", "<sop>", *_GLM_ROLES),
))
# Baichuan2-Chat: <reserved_106> (id 195) opens a user turn, <reserved_107> (id 196) a reply.
register(ChatTemplate(
    name="baichuan2", user="<reserved_106>{content}", assistant_prefix="<reserved_107>",
    stop=("<reserved_106>",), special_tokens=("<reserved_106>", "<reserved_107>"),
))
# Llama2-Chinese (FlagAlpha): every turn is its own "<s>...\n</s>"; the reply's "\n</s>" is trained.
register(ChatTemplate(
    name="llama2-chinese", system="<s>System: {content}\n</s>", user="<s>Human: {content}\n</s>",
    assistant_prefix="<s>Assistant: ", assistant_suffix="\n</s>", end=None,
    stop=("</s>", "Human:"), special_tokens=("<s>", "</s>"),
))
# Alpaca (Stanford, with a Chinese preamble): instruction / response sections.
register(ChatTemplate(
    name="alpaca", prefix="{bos}", system="{content}\n\n", user="### Instruction:\n{content}\n\n",
    assistant_prefix="### Response:\n", assistant_suffix="\n\n", stop=("### Instruction:",),
    default_system="下面是一条描述任务的指令。请写出恰当完成该指令的回答。",
))
# Dolly (databricks/dolly-v2-3b): its three markers are special tokens of its tokenizer; a reply
# ends with "### End". Dolly has no multi-turn layout: turns follow each other after a blank line.
register(ChatTemplate(
    name="dolly", system="{content}\n\n", user="### Instruction:\n{content}\n\n", assistant_prefix="### Response:\n",
    assistant_suffix="\n\n### End\n\n", end=None, stop=("### End",),
    special_tokens=("### End", "### Instruction:", "### Response:"),
    default_system="Below is an instruction that describes a task. Write a response that appropriately completes the "
                   "request.",
))

# The entries below mirror official Jinja templates; tests/test_templates.py renders a battery of
# conversations both ways (README of chatglm_lora: the parity table). Official templates also
# trim message contents in places; these entries write contents as given.
_CHATML = dict(system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
               assistant_prefix="<|im_start|>assistant\n", assistant_suffix="<|im_end|>\n", end=None,
               stop=("<|im_end|>",), special_tokens=("<|im_start|>", "<|im_end|>"))
# ChatML (Qwen2, Qwen2.5 without its default system prompt, Yi, InternLM2 layout).
register(ChatTemplate(name="chatml", **_CHATML))
# Qwen2.5-Instruct: ChatML with Qwen's default system prompt when none is given.
register(ChatTemplate(name="qwen2.5", default_system="You are Qwen, created by Alibaba Cloud. You are a helpful "
                                                     "assistant.", **_CHATML))
# Qwen3, thinking off (enable_thinking=False): the reply opens with an empty think block in the
# prompt; replies in history carry none (Qwen3's template drops them).
_QWEN3 = {**_CHATML, "special_tokens": (*_CHATML["special_tokens"], "<think>", "</think>")}
register(ChatTemplate(name="qwen3", **{**_QWEN3, "assistant_prefix": "<|im_start|>assistant\n<think>\n\n</think>\n\n"},
                      history_assistant_prefix="<|im_start|>assistant\n"))
# Qwen3, thinking on (its default): the model writes the think block itself, learned here empty.
register(ChatTemplate(name="qwen3-thinking", reply_prefix="<think>\n\n</think>\n\n", history_reply_prefix="",
                      **_QWEN3))
# Llama-3.1 / 3.2 / 3.3 Instruct: a system header always, with the knowledge-date lines. The date
# is Llama-3.1's fixed default; 3.2 / 3.3 write today's date, which would make training text
# change from day to day.
register(ChatTemplate(
    name="llama3", prefix="{bos}",
    system="<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
           "Today Date: 26 Jul 2024\n\n{content}<|eot_id|>", default_system="",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant_suffix="<|eot_id|>", end=None,
    stop=("<|eot_id|>", "<|eom_id|>"), special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
))
# DeepSeek-R1-Distill (Qwen / Llama): the generation prompt opens a think block; a reply without
# reasoning closes it at once. History replies are written without reasoning (as the official
# template does), so finished conversations differ from the official rendering on purpose: the
# last reply is trained as the model writes it after the official generation prompt.
register(ChatTemplate(
    name="deepseek-r1", prefix="{bos}", system="{content}", user="<｜User｜>{content}",
    assistant_prefix="<｜Assistant｜><think>\n", history_assistant_prefix="<｜Assistant｜>",
    reply_prefix="</think>\n\n", history_reply_prefix="", assistant_suffix="<｜end▁of▁sentence｜>", end=None,
    stop=("<｜end▁of▁sentence｜>", "<｜User｜>"),
    special_tokens=("<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>", "<think>", "</think>"),
))
# GLM-4.5 / 4.6 / 4.7: GLM-4's roles, and every reply opens with a think block (empty here). The
# official template writes no end marker (generation stops at <|user|>); a finished conversation
# here ends with the eos, which the model learns to emit.
register(ChatTemplate(
    name="glm4.5", prefix="[gMASK]<sop>", system="<|system|>\n{content}", user="<|user|>\n{content}",
    assistant_prefix="<|assistant|>", reply_prefix="\n<think></think>\n", stop=("<|user|>", "<|observation|>",
                                                                              "<|endoftext|>"),
    special_tokens=("[gMASK]", "<sop>", *_GLM_ROLES, "<think>", "</think>"),
))


# -------------------------------------------------------- the model's own template
# Which registry entry to name when a model's own template cannot be trained on.
_ENTRY_FOR_MARKER = (("<think>", "<|im_start|>", "qwen3"), ("<|im_start|>", "", "chatml"),
                     ("<think>", "<|assistant|>", "glm4.5"), ("<|assistant|>", "", "glm4"),
                     ("<｜Assistant｜>", "", "deepseek-r1"), ("<|start_header_id|>", "", "llama3"))
_PROBE = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好的"}]


class JinjaTemplate:
    """A tokenizer's own Jinja chat template, trained on by prefix rendering (module docstring).
    `stop` holds the special tokens written after a reply's content (<|im_end|>, <|eot_id|>):
    the end markers the model learns and generation stops on."""

    name = "official"
    end = None  # end markers are part of each reply's rendered text
    special_tokens: tuple[str, ...] = ()

    def __init__(self, tokenizer, source: str = "the tokenizer's chat_template"):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{source}: no Jinja chat_template to use: pick a registry entry with --template "
                            f"({', '.join(sorted(TEMPLATES))})")
        self.source = source
        self.chat_template = tokenizer.chat_template
        self._special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        markers = [t.content for t in tokenizer.added_tokens_decoder.values()] + list(tokenizer.all_special_tokens)
        user_only = _PROBE[:1]
        if self._render(user_only, True) == self._render(user_only, False):
            raise UserError(f"{source} has no generation prompt (add_generation_prompt changes nothing), so a "
                            f"reply's start cannot be found: use --template {self.suggestion()}")
        reply = next(text for text, kind in self.segments(_PROBE, False) if kind == "reply")
        after = reply.split(_PROBE[1]["content"], 1)[-1]
        self.stop = tuple(sorted({m for m in markers if m and m in after}, key=after.index))
        if not self.stop:
            raise UserError(f"{source} writes no special token of this tokenizer after a reply (it writes {after!r}), "
                            f"so the model would never learn to stop: use --template {self.suggestion()}")

    def suggestion(self) -> str:
        for marker, also, entry in _ENTRY_FOR_MARKER:
            if marker in self.chat_template and also in self.chat_template:
                return entry
        return f"<one of {', '.join(sorted(TEMPLATES))}>"

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        from jinja2.exceptions import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template([messages], chat_template=self.chat_template,
                                                add_generation_prompt=add_generation_prompt, **self._special)
        except TemplateError as err:
            raise UserError(f"{self.source} refuses this conversation: {err}") from None
        return rendered[0]

    def segments(self, messages: list[dict], add_generation_prompt: bool, bos: str = "",
                 eos: str = "") -> list[tuple[str, str]]:
        check_messages(messages, for_generation=add_generation_prompt)
        full = self._render(messages, add_generation_prompt)
        pieces, done = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, upto = self._render(messages[:i], True), self._render(messages[:i + 1], False)
            if not upto.startswith(prompt):
                problem = (f"its generation prompt ({prompt[done:][-40:]!r}) is not how it opens the reply of message "
                           f"{i} ({upto[done:][-60:]!r})")
            elif not (len(prompt) >= done and full.startswith(upto)):
                problem = f"it writes the reply of message {i} differently once later turns follow"
            else:
                problem = None
            if problem:
                raise UserError(f"{self.source} is not prefix-consistent for this conversation: {problem}; so its "
                                f"replies cannot be masked: use --template {self.suggestion()}")
            pieces += [(full[done:len(prompt)], "prompt"), (full[len(prompt):len(upto)], "reply")]
            done = len(upto)
        pieces.append((full[done:], "prompt"))
        return [(text, kind) for text, kind in pieces if text]

    def render(self, messages: list[dict], add_generation_prompt: bool = True, bos: str = "", eos: str = "") -> str:
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt))

    def jinja(self) -> str:
        return self.chat_template


def registry_entry_of(chat_template: str | None) -> ChatTemplate | None:
    """The registry entry a Jinja template was generated from (unchanged since), if any."""
    found = re.match(r"\{#- " + re.escape(JINJA_MARK) + r"(\S+):", chat_template or "")
    entry = TEMPLATES.get(found.group(1)) if found else None
    return entry if entry is not None and entry.jinja() == chat_template else None


def resolve_template(choice: str | None, tokenizer, model_dir: str | Path | None = None):
    """The template to train / prompt with. `choice`: a registry entry; "official": the
    tokenizer's own Jinja template; "auto" or None: what the model was tuned with (a template
    generated from an entry, or an older output's sft_template.json), else the tokenizer's own
    template, else an error asking for an entry."""
    if choice not in (None, "auto", "official"):
        return get_template(choice)
    source = f"{model_dir}'s chat_template" if model_dir else "the tokenizer's chat_template"
    entry = registry_entry_of(getattr(tokenizer, "chat_template", None))
    if entry is not None:
        return entry
    if choice != "official" and model_dir is not None and saved_template_name(model_dir):
        return get_template(saved_template_name(model_dir))
    if choice is None and not getattr(tokenizer, "chat_template", None):
        return None  # the caller's default
    return JinjaTemplate(tokenizer, source)


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise UserError(f"unknown chat template '{name}' (known: {', '.join(sorted(TEMPLATES))})")
    return TEMPLATES[name]


def check_messages(messages: list[dict], for_generation: bool = True) -> None:
    """A conversation: an optional system message, then user and assistant turns in turn,
    ending with a user turn (to generate the reply) or an assistant turn (to train on)."""
    if not messages:
        raise UserError("no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise UserError(f"message {i}: role must be one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise UserError(f"message {i}: content must be a string")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise UserError(f"message {i + len(messages) - len(turns)}: expected {_a(expected)} turn "
                            f"(after an optional system message, user and assistant alternate), got {message['role']}")
    if not for_generation:
        empty = next((i for i, m in enumerate(messages) if m["role"] == "assistant" and not m["content"].strip()), None)
        if empty is not None:
            raise UserError(f"message {empty}: an empty assistant reply (nothing to learn)")
    last = "user" if for_generation else "assistant"
    if not turns or turns[-1]["role"] != last:
        raise UserError(f"the conversation must end with {_a(last)} turn"
                        + (" to generate a reply to" if for_generation else " to train on"))


def _a(role: str) -> str:
    return "an assistant" if role == "assistant" else f"a {role}"


# ------------------------------------------------------------------ token level
@dataclass
class EncodedChat:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss
    reply_starts: list[int]  # index in input_ids of the first token of each reply


def ensure_template_tokens(tokenizer, template: ChatTemplate) -> list[str]:
    """Add the template's markers the tokenizer lacks as special tokens; returns them (the
    model's embeddings must then be resized and the new rows trained)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in template.special_tokens if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return missing


def encode_chat(tokenizer, template: ChatTemplate, messages: list[dict],
                add_generation_prompt: bool = False) -> EncodedChat:
    """Token ids of a conversation, segment by segment. Finished conversations (last turn
    an assistant's) get labels on every reply; with `add_generation_prompt` the ids end with
    the opening of the next reply: exactly what training saw before that reply."""
    segments = template.segments(messages, add_generation_prompt, tokenizer.bos_token, tokenizer.eos_token)
    input_ids: list[int] = []
    labels: list[int] = []
    reply_starts: list[int] = []
    end_ids = (tokenizer(template.end.replace("{eos}", tokenizer.eos_token or ""), add_special_tokens=False)
               ["input_ids"] if template.end else [])
    if template.end and len(end_ids) != 1:
        raise UserError(f"template {template.name}: its end marker must be one token of the tokenizer")
    pending_end = False  # the label of the next position is the end token
    for text, kind in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        if kind == "reply":
            reply_starts.append(len(input_ids))
        segment_labels = list(ids) if kind != "prompt" else [IGNORE_INDEX] * len(ids)
        if pending_end and kind == "prompt":
            segment_labels[0] = end_ids[0]
        pending_end = kind == "reply" and bool(end_ids)
        input_ids += ids
        labels += segment_labels
    return EncodedChat(input_ids, labels, reply_starts)


def stop_criteria(tokenizer, template) -> tuple[list[int], tuple[str, ...]]:
    """(token ids that end a generation, stop strings matched in the text)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    texts = []
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()}
    for stop in template.stop if template else ():
        if stop in vocab and stop in special:
            ids.append(vocab[stop])
        else:
            texts.append(stop)
    return list(dict.fromkeys(ids)), tuple(texts)


def save_chat_template(output_dir: str | Path, tokenizer, template) -> None:
    """The tokenizer (with, as its chat_template, the Jinja that renders exactly what training
    saw) and generation_config.json's eos ids (eos + the template's end tokens) in output_dir,
    so that any serving stack prompts and stops the model as it was trained."""
    from transformers import GenerationConfig

    tokenizer.chat_template = template.jinja()
    tokenizer.save_pretrained(output_dir)
    stale = Path(output_dir, TEMPLATE_FILE)
    if stale.is_file():  # the Jinja template says it now; an old name would override it
        stale.unlink()
    try:
        config = GenerationConfig.from_pretrained(output_dir)
    except OSError:
        config = GenerationConfig()
    ids, _ = stop_criteria(tokenizer, template)
    config.eos_token_id = ids
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(output_dir)


def save_template_name(output_dir: str | Path, name: str) -> None:
    """Older outputs' record of the template's name (model_baichuan/convert.py still writes it
    when it converts no tokenizer to carry the Jinja template)."""
    Path(output_dir, TEMPLATE_FILE).write_text(json.dumps({"template": name}) + "\n", encoding="utf-8")


def saved_template_name(model_dir: str | Path) -> str | None:
    path = Path(model_dir, TEMPLATE_FILE)
    return json.loads(path.read_text(encoding="utf-8"))["template"] if path.is_file() else None
