"""Chat templates against real artefacts: official Jinja templates of released models and a
real tokenizer (Qwen2's, validated against llama.cpp's expected ids), from the pinned
llama-cpp-python sdist that `make real-artefacts` caches (tests/real_artefacts.py).

- every registry entry that mirrors an official template renders a battery of conversations
  as the official template does: equal token ids with the real tokenizer where the fixtures
  have it (Qwen2), equal text otherwise; differences on purpose are spelled out here;
- the Jinja generated from each entry renders exactly what the entry renders;
- the model's own template is trained by prefix rendering: the mask holds replies and end
  markers only, and templates that cannot be masked are refused with the entry to use.
"""

import copy

import pytest
import real_artefacts
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from common.errors import UserError
from common.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    JinjaTemplate,
    encode_chat,
    ensure_template_tokens,
    get_template,
    resolve_template,
    save_chat_template,
    stop_criteria,
)

SYSTEM = {"role": "system", "content": "你是一个乐于助人的助手。"}
TURNS = [
    {"role": "user", "content": "判断下面这条评论的情感：质量很好，物流也快"},
    {"role": "assistant", "content": "正面"},
    {"role": "user", "content": "Translate “你好” into English, please."},
    {"role": "assistant", "content": "Hello! 也可以说 Hi。"},
    {"role": "user", "content": "请给下面的句子分词：\n新华社北京一月一日电。"},
    {"role": "assistant", "content": "新华社/北京/一月/一日/电/。"},
]
# (messages, add_generation_prompt): one and several turns, with and without a system message,
# prompts (ending with a user turn) and finished conversations; Chinese and mixed text.
BATTERY = [(system + TURNS[:n], n % 2 == 1) for system in ([], [SYSTEM]) for n in (1, 2, 3, 4, 6)]

BOS = {"llama3": "<|begin_of_text|>", "deepseek-r1": "<｜begin▁of▁sentence｜>"}
EOS = {"llama3": "<|eot_id|>", "deepseek-r1": "<｜end▁of▁sentence｜>", "glm4.5": "<|endoftext|>"}


def glm_ends_with_eos(official: str, messages: list[dict], generation: bool) -> str:
    """glm4.5 on purpose: a finished conversation ends with the eos the model learns to emit
    (GLM's template writes nothing after a reply and stops generation at <|user|>)."""
    return official if generation else official + EOS["glm4.5"]


def r1_last_reply_as_generated(official: str, messages: list[dict], generation: bool) -> str:
    """deepseek-r1 on purpose: the last reply of a finished conversation is trained as the
    model writes it after the official generation prompt ("<think>\\n"), with an empty
    reasoning block; the official template renders it without."""
    if generation:
        return official
    head, _, tail = official.rpartition("<｜Assistant｜>")
    return head + "<｜Assistant｜><think>\n</think>\n\n" + tail


# entry -> [(official template, extra render arguments, which conversations, expected difference)]
PARITY = {
    "qwen2.5": [("Qwen-Qwen2.5-7B-Instruct", {}, "all", None)],
    "chatml": [("Qwen-Qwen2.5-7B-Instruct", {}, "with system", None)],  # ChatML = Qwen2.5 less its default system
    "qwen3": [("Qwen-Qwen3-0.6B", {"enable_thinking": False}, "all", None)],
    "qwen3-thinking": [("Qwen-Qwen3-0.6B", {}, "all", None)],
    "llama3": [("meta-llama-Llama-3.1-8B-Instruct", {}, "all", None),
               ("meta-llama-Llama-3.2-3B-Instruct", {"date_string": "26 Jul 2024"}, "all", None),
               ("meta-llama-Llama-3.3-70B-Instruct", {"date_string": "26 Jul 2024"}, "all", None)],
    "deepseek-r1": [("deepseek-ai-DeepSeek-R1-Distill-Llama-8B", {}, "all", r1_last_reply_as_generated),
                    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", {"enable_thinking": True}, "all",
                     r1_last_reply_as_generated)],
    "glm4.5": [("GLM-4.6", {}, "all", glm_ends_with_eos)],
}
REAL_TOKENIZER = {"qwen2.5": "qwen2", "chatml": "qwen2", "qwen3": "qwen2", "qwen3-thinking": "qwen2"}


@pytest.fixture(scope="session")
def artefacts():
    if not real_artefacts.available():
        pytest.fail("the real tokenizers and templates are missing: run `make real-artefacts`")
    return real_artefacts


@pytest.fixture(scope="session")
def qwen2(artefacts):
    path = artefacts.tokenizer_dir("qwen2")
    assert path is not None, "the Qwen2 tokenizer must reproduce llama.cpp's ids (validation.json)"
    return AutoTokenizer.from_pretrained(path)


def official_text(template: str, messages, generation: bool, bos: str, eos: str, **extra) -> str:
    rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=generation,
                                        bos_token=bos, eos_token=eos, **extra)
    return rendered[0]


def test_fixture_tokenizers_are_validated_against_llama_cpp(artefacts):
    import json

    results = json.loads(artefacts.VALIDATION.read_text())
    assert results["qwen2"]["usable"] and results["qwen2"]["matching"] == results["qwen2"]["cases"] == 46
    for result in results.values():  # used only when every expected id list is reproduced
        assert result["usable"] == (result["loaded"] and result["cases"] > 0 and result["matching"] == result["cases"])


@pytest.mark.parametrize("entry", sorted(PARITY))
def test_registry_entry_renders_as_the_official_template(artefacts, qwen2, entry):
    template = get_template(entry)
    bos, eos = BOS.get(entry, qwen2.bos_token), EOS.get(entry, "<|im_end|>")
    tokenizer = None
    if entry in REAL_TOKENIZER:  # Qwen2's vocabulary; Qwen3's <think> markers as the added tokens they are there
        tokenizer = copy.deepcopy(qwen2)
        ensure_template_tokens(tokenizer, template)
    checked = 0
    for official_name, extra, which, difference in PARITY[entry]:
        official = artefacts.official_template(official_name)
        for messages, generation in BATTERY:
            if which == "with system" and messages[0]["role"] != "system":
                continue
            expected = official_text(official, messages, generation, bos, eos, **extra)
            if difference:
                expected = difference(expected, messages, generation)
            ours = template.render(messages, generation, bos=bos, eos=eos)
            assert ours == expected, f"{entry} vs {official_name}, {len(messages)} messages, generation {generation}"
            if tokenizer is not None:  # the real tokenizer: training / serving ids equal the official text's ids
                ids = encode_chat(tokenizer, template, messages, add_generation_prompt=generation).input_ids
                assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("entry", sorted(TEMPLATES))
def test_generated_jinja_renders_what_the_entry_renders(entry):
    template = get_template(entry)
    for messages, generation in BATTERY:
        ours = template.render(messages, generation, bos="<bos>", eos="<eos>")
        assert official_text(template.jinja(), messages, generation, "<bos>", "<eos>") == ours


def test_official_template_masks_replies_and_end_markers_only(artefacts, qwen2):
    tokenizer = copy.deepcopy(qwen2)
    tokenizer.chat_template = artefacts.official_template("Qwen-Qwen2.5-7B-Instruct")
    template = resolve_template("auto", tokenizer)
    assert isinstance(template, JinjaTemplate) and template.stop == ("<|im_end|>",)
    for messages, generation in BATTERY:
        encoded = encode_chat(tokenizer, template, messages, add_generation_prompt=generation)
        # the ids are the official rendering's, tokenized as any serving stack does
        assert encoded.input_ids == tokenizer.apply_chat_template(messages, add_generation_prompt=generation,
                                                                  tokenize=True, return_dict=True)["input_ids"]
        if generation:
            continue
        trained = tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])
        assert trained == "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert len(encoded.reply_starts) == len(replies)
        for start, at in zip(encoded.reply_starts, replies):
            prompt = encode_chat(tokenizer, template, messages[:at], add_generation_prompt=True).input_ids
            assert encoded.input_ids[:start] == prompt  # serving prompts exactly what training saw


@pytest.mark.parametrize("official,entry,message", [
    ("Qwen-Qwen3-0.6B", "qwen3", "writes the reply of message 1 differently once later turns follow"),
    ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B", "deepseek-r1", "its generation prompt .* is not how it opens"),
    ("GLM-4.6", "glm4.5", "writes no special token of this tokenizer after a reply"),
])
def test_templates_that_cannot_be_masked_are_refused_with_the_entry_to_use(artefacts, qwen2, official, entry, message):
    tokenizer = copy.deepcopy(qwen2)
    tokenizer.chat_template = artefacts.official_template(official)
    with pytest.raises(UserError, match=f"{message}.*use --template {entry}"):
        encode_chat(tokenizer, JinjaTemplate(tokenizer, official), BATTERY[3][0])  # two turns


def test_a_template_without_generation_prompt_or_allowing_no_system_is_refused(artefacts, qwen2):
    tokenizer = copy.deepcopy(qwen2)
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"
    with pytest.raises(UserError, match="has no generation prompt"):
        JinjaTemplate(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = artefacts.official_template("google-gemma-2-2b-it")
    with pytest.raises(UserError, match="refuses this conversation: System role not supported"):
        encode_chat(tokenizer, JinjaTemplate(tokenizer, "gemma-2"), [SYSTEM, *TURNS[:2]])


@pytest.mark.parametrize("entry", ["qwen2.5", "qwen3", "glm4", "baichuan2", "chatglm3"])
def test_a_saved_model_carries_its_template_and_end_tokens(qwen2, tmp_path, entry):
    from transformers import GenerationConfig

    tokenizer = copy.deepcopy(qwen2)
    tokenizer.chat_template = real_artefacts.official_template("Qwen-Qwen2.5-7B-Instruct")  # to be replaced
    template = get_template(entry)
    ensure_template_tokens(tokenizer, template)
    save_chat_template(tmp_path, tokenizer, template)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert resolve_template("auto", loaded, tmp_path) is template  # recognised as generated from the entry
    for messages, generation in BATTERY:
        ids = loaded.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True,
                                         return_dict=True)["input_ids"]
        assert ids == encode_chat(tokenizer, template, messages, add_generation_prompt=generation).input_ids
    eos_ids = GenerationConfig.from_pretrained(tmp_path).eos_token_id
    assert eos_ids == stop_criteria(loaded, template)[0]
    assert set(loaded.convert_tokens_to_ids([s for s in template.stop if s in loaded.get_vocab()])) <= set(eos_ids)
