"""Chat templates: one registry for training, inference and serving.

A model must be prompted at serving time exactly as it was trained, or it rambles and never
stops. A template turns a list of `{"role", "content"}` messages into one prompt string and
knows the strings that end an assistant turn (`stop`), which generation stops on.

Models whose tokenizer carries a `chat_template` (Jinja) use that instead, through
`render_chat` below; the registry covers models without one.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str  # format of a system message, with {content}
    user: str  # format of a user turn, with {content}
    assistant_prefix: str  # what opens an assistant turn; a generation prompt ends with it
    assistant_suffix: str  # what closes a finished assistant turn
    stop: tuple[str, ...] = ()  # text that means the assistant's turn is over

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        check_messages(messages)
        parts = []
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system":
                parts.append(self.system.format(content=content))
            elif role == "user":
                parts.append(self.user.format(content=content))
            else:
                parts.append(self.assistant_prefix + content + self.assistant_suffix)
        if add_generation_prompt:
            parts.append(self.assistant_prefix)
        return "".join(parts)


TEMPLATES: dict[str, ChatTemplate] = {}


def register(template: ChatTemplate) -> ChatTemplate:
    TEMPLATES[template.name] = template
    return template


# For base models trained on plain text (chinese_gpt2): a dialogue written as a transcript,
# which such a model can at least continue; it stops where it starts the user's next line.
register(ChatTemplate(
    name="plain",
    system="{content}\n",
    user="用户：{content}\n",
    assistant_prefix="助手：",
    assistant_suffix="\n",
    stop=("\n用户：", "用户："),
))


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise UserError(f"unknown chat template '{name}' (known: {', '.join(sorted(TEMPLATES))})")
    return TEMPLATES[name]


def check_messages(messages: list[dict]) -> None:
    if not messages:
        raise UserError("no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise UserError(f"message {i}: role must be one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise UserError(f"message {i}: content must be a string")


def render_chat(tokenizer, messages: list[dict], template: str | None = None) -> tuple[str, tuple[str, ...]]:
    """The generation prompt for `messages` and the stop strings that go with it.

    `template` names a registry entry; without one the tokenizer's own chat template is
    used when it has one, else "plain".
    """
    if template is None and getattr(tokenizer, "chat_template", None):
        check_messages(messages)
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt, ()
    chosen = get_template(template or "plain")
    return chosen.render(messages), chosen.stop
