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

Models whose tokenizer carries its own Jinja `chat_template` can be served with that
instead (common/serving.py); the registry covers the formats our recipes train.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
TEMPLATE_FILE = "sft_template.json"  # written next to a tuned model: which template it was trained with


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
    default_system: str | None = None

    def segments(self, messages: list[dict], add_generation_prompt: bool, bos: str = "",
                 eos: str = "") -> list[tuple[str, str]]:
        """(text, kind) pieces; kind is "prompt", "reply" (trained) or "end" (trained, only
        after the last reply)."""
        check_messages(messages, for_generation=add_generation_prompt)

        def fill(text: str) -> str:
            return text.replace("{bos}", bos or "").replace("{eos}", eos or "")

        pieces = [(fill(self.prefix), "prompt")]
        if self.default_system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        round_ = 0
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system":
                pieces.append((fill(self.system).replace("{content}", content), "prompt"))
            elif role == "user":
                round_ += 1
                pieces.append((fill(self.user).replace("{round}", str(round_)).replace("{content}", content),
                               "prompt"))
            else:
                pieces.append((fill(self.assistant_prefix), "prompt"))
                pieces.append((content + fill(self.assistant_suffix), "reply"))
        if add_generation_prompt:
            pieces.append((fill(self.assistant_prefix), "prompt"))
        elif self.end:
            pieces.append((fill(self.end), "end"))
        return [(text, kind) for text, kind in pieces if text]

    def render(self, messages: list[dict], add_generation_prompt: bool = True, bos: str = "", eos: str = "") -> str:
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt, bos, eos))


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


def stop_criteria(tokenizer, template: ChatTemplate | None) -> tuple[list[int], tuple[str, ...]]:
    """(token ids that end a generation, stop strings matched in the text)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    texts = []
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens)
    for stop in template.stop if template else ():
        if stop in vocab and stop in special:
            ids.append(vocab[stop])
        else:
            texts.append(stop)
    return list(dict.fromkeys(ids)), tuple(texts)


def save_template_name(output_dir: str | Path, name: str) -> None:
    Path(output_dir, TEMPLATE_FILE).write_text(json.dumps({"template": name}) + "\n", encoding="utf-8")


def saved_template_name(model_dir: str | Path) -> str | None:
    path = Path(model_dir, TEMPLATE_FILE)
    return json.loads(path.read_text(encoding="utf-8"))["template"] if path.is_file() else None
