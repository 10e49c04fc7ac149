"""common/serving/ and chinese_gpt2's serve.py / chatbot.py: streamed generation, the
OpenAI-compatible server over a real uvicorn (driven by the official `openai` client), its
limits, and the gradio chatbot in a real headless Chromium."""

import asyncio
import copy
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from common.corpora import load_peoples_daily
from common.errors import UserError
from common.serving.api import ApiError, Limiter
from common.serving.batcher import batch_widths
from common.serving.engine import Engine
from common.serving.fusing import fuse_projections
from common.serving.sampling import SamplingParams
from common.serving.text import _partial_stop_length
from common.serving.ui import fit_conversation
from common.templates import get_template
from common.tokenizer import build_chinese_tokenizer, display_cleaner, join_chinese

from conftest import REPO, free_port, wait_until_up

CONTEXT = 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 4 x 256 GPT-2 with a 1024-token context: a few ms per token on a CPU, so a
    long generation lasts long enough to be interrupted."""
    path = tmp_path_factory.mktemp("serving_lm")
    tokenizer = build_chinese_tokenizer(load_peoples_daily()[:2000], vocab_size=3000)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=CONTEXT, n_layer=4, n_head=4, n_embd=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_pretrained(model_dir, name="tiny", device="cpu")


# ------------------------------------------------------------------ templates
def test_plain_template_renders_turns_and_ends_with_the_assistant_prefix():
    messages = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "今天几号？"}]
    template = get_template("plain")
    assert template.render(messages) == "你是助手。\n用户：你好\n助手：你好！\n用户：今天几号？\n助手："
    # the serving prompt of a conversation is the training text of that conversation up to the reply
    finished = messages + [{"role": "assistant", "content": "三号。"}]
    training_text = template.render(finished, add_generation_prompt=False)
    assert training_text.startswith(template.render(messages))
    with pytest.raises(UserError, match="role"):
        template.render([{"role": "robot", "content": "x"}])
    with pytest.raises(UserError, match="unknown chat template"):
        get_template("nope")


def test_the_engine_prefers_the_tokenizers_own_template(engine):
    tokenizer = engine.tokenizer
    messages = [{"role": "user", "content": "你好"}]
    ids, stop = engine.chat_ids(messages)
    assert join_chinese(tokenizer.decode(ids)) == "用户：你好助手：" and stop == ("\n用户：", "用户：")
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    try:
        own = Engine(engine.model, tokenizer, "own")
        assert own.chat_ids(messages) == (own.encode("<user>你好<assistant>"), ())
        assert Engine(engine.model, tokenizer, "plain", template="plain").chat_ids(messages) == (ids, stop)
    finally:
        tokenizer.chat_template = None


def test_display_cleaner_only_joins_wordpiece_output(engine):
    assert join_chinese(" 新 华 社 北 京 电 ， 记 者 abc def ") == "新华社北京电，记者abc def"
    assert display_cleaner(engine.tokenizer)("中 国") == "中国"
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    byte_level = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    assert display_cleaner(byte_level)("我爱 Python") == "我爱 Python"


# ----------------------------------------------------------------- generation
def test_streamed_text_equals_the_full_text_and_stop_strings_cut_it(engine):
    greedy = SamplingParams(max_new_tokens=40, temperature=0)
    prompt = engine.encode("新华社北京电")
    pieces = list(engine.stream(prompt, greedy))
    full = "".join(pieces)
    assert len(pieces) > 5 and len(full) > 10
    assert engine.complete("新华社北京电", greedy) == full  # deterministic
    stop = full[8:10]
    cut = engine.stream(prompt, SamplingParams(max_new_tokens=40, temperature=0, stop=(stop,)))
    assert "".join(cut) == full[:full.index(stop)]
    assert cut.finish_reason == "stop"
    whole = engine.stream(prompt, greedy)
    assert "".join(whole) == full and whole.finish_reason == "length" and whole.completion_tokens == 40


@pytest.mark.parametrize("vocab", ["wordpiece", "qwen2", "llama-spm"])
def test_incremental_text_equals_decoding_everything(engine, vocab):
    """WordPiece (the built-in tokenizers), byte-level BPE (Qwen2's real one: Chinese characters
    split over byte tokens) and SentencePiece (Llama-2's real one: a word's leading space)."""
    import random as stdlib_random

    import real_artefacts
    from transformers import AutoTokenizer

    from common.serving.text import IncrementalText

    if vocab == "wordpiece":
        tokenizer = engine.tokenizer
    else:
        if not (real_artefacts.TOKENIZERS / vocab).is_dir():
            pytest.fail(f"the real {vocab} tokenizer is missing: run `make real-artefacts`")
        tokenizer = AutoTokenizer.from_pretrained(real_artefacts.TOKENIZERS / vocab)
    clean = display_cleaner(tokenizer)

    def decode(ids):
        return clean(tokenizer.decode(ids, skip_special_tokens=True))

    text = "新华社北京一月一日电 Hello world, 我爱 Python 3.12！今年以来，经济平稳发展😀。" * 3
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = stdlib_random.Random(0)
    for sizes in ([1] * len(ids), [chunks.randint(1, 4) for _ in ids]):
        incremental, position = IncrementalText(decode), 0
        for size in sizes:
            if position >= len(ids):
                break
            shown = incremental.extend(ids[position:position + size])
            position += size
            full = decode(ids[:position])
            if not full.endswith("\ufffd"):
                assert shown == full
        assert shown == decode(ids)


def _reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _read_all(streams) -> list[list[int]]:
    """Read every stream in a thread of its own, as the server's requests do."""
    def read(stream):
        for _ in stream:
            pass
    threads = [threading.Thread(target=read, args=(s,)) for s in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [s.token_ids for s in streams]


@pytest.fixture(scope="module")
def llama_engine(engine):
    """A tiny Llama with grouped-query attention (2 kv heads for 4) on the GPT-2 fixture's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(engine.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)).eval()
    llama = Engine(model, engine.tokenizer, "llama", max_batch=4)
    yield llama
    llama.close()


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_served_greedy_equals_generate_alone_batched_and_joining_midway(which, engine, llama_engine):
    served = engine if which == "gpt2" else llama_engine
    texts = ["新华社北京电", "今年以来，我国经济平稳发展，人民生活", "记者", "人民日报社论：迈向充满希望的新世纪。"]
    prompts = [served.encode(t) for t in texts]
    n = 24
    expected = [_reference_greedy(served.model, p, n) for p in prompts]
    greedy = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
    alone = [_read_all([served.stream(p, greedy)])[0] for p in prompts]
    with served.decoder.condition:  # the batcher takes all four at once: one padded prefill
        streams = [served.stream(p, greedy) for p in prompts]
    together = _read_all(streams)
    # one long generation running; the others join it after a few of its tokens, and a sampled
    # request makes the steps unpipelined for a while
    first = served.stream(prompts[3], SamplingParams(max_new_tokens=2 * n, temperature=0, ignore_eos=True))
    pieces = iter(first)
    for _ in range(4):
        next(pieces)
    sampled = served.stream(prompts[1], SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, ignore_eos=True))
    joined = _read_all([served.stream(p, greedy) for p in prompts[:3]] + [sampled])
    for _ in pieces:
        pass
    assert alone == expected and together == expected
    assert joined[:3] == expected[:3] and first.token_ids[:n] == expected[3]
    assert len(joined[3]) == 8
    assert served.decoder.width == 1  # back to the one-row cache once the batch drained


def test_a_request_joins_at_the_next_step_whatever_its_prompt_length(llama_engine):
    """Each row holds its request from slot 0: a newcomer whose prompt is longer than what the
    running row has written, and which with it needs more than the whole cache, still starts
    at the next step, and every row decodes exactly what it would alone."""
    served = Engine(llama_engine.model, llama_engine.tokenizer, "llama", max_batch=4, max_cache_len=64)
    try:
        def greedy(n):
            return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)

        together, step = [], served.decoder._step

        def recording_step():
            together.append(sum(g is not None for g in served.decoder.rows))
            step()

        served.decoder._step = recording_step
        short, long = served.encode("记者"), served.encode("人民日报社论：迈向充满希望的新世纪。")
        assert len(short) < 4 < len(long) < 30
        first = served.stream(short, greedy(60))  # 62 of the 64 slots
        pieces = iter(first)
        next(pieces)
        joined = _read_all([served.stream(long, greedy(64 - len(long)))])[0]  # the whole cache too
        assert len(first.token_ids) < 60  # it joined the running request instead of waiting for it to end
        for _ in pieces:
            pass
        assert first.token_ids == _reference_greedy(served.model, short, 60)
        assert joined == _reference_greedy(served.model, long, 64 - len(long))
        assert max(together) == 2
    finally:
        served.close()


def test_one_prompts_prefill_is_compiled_once_for_every_length(llama_engine):
    """A compiled engine prefills a prompt that arrives alone through one compiled graph whatever
    its length (eagerly, a 7B model's short prefill waits on Python launching kernels): prompts of
    2 to 40 tokens give the plain forward's last logits and write its keys into their row, with
    one compile; one-token prompts and prompts that join together stay eager, and so do all once
    the compiled prefill has failed at its first call. (Through dynamo
    with a counting backend: inductor's own kernels are the GPU tests' and the warm-up's.)"""
    from torch._dynamo.testing import CompileCounter

    from common.serving.batcher import Batcher

    model = llama_engine.model
    decoder = Batcher(model, [], max_batch=4, cache_length=64, compile_decode=False)
    try:
        counter = CompileCounter()
        decoder.compiled = True  # (decode steps stay eager: only the prefill's routing is under test)
        decoder.prefill_one = torch.compile(decoder.prefill_eager, backend=counter)
        for row, length in [(0, 2), (2, 9), (1, 40), (3, 17)]:
            prompt = torch.randint(0, model.config.vocab_size, (length,)).tolist()
            with torch.no_grad():
                plain = model(torch.tensor([prompt]), use_cache=True)
            logits = decoder._prefill([row], [prompt])
            torch.testing.assert_close(logits[0], plain.logits[0, -1], rtol=1e-4, atol=1e-4)
            written = decoder.largest.keys[1][row, :, :length]
            torch.testing.assert_close(written, plain.past_key_values.layers[1].keys[0], rtol=1e-5, atol=1e-5)
        assert counter.frame_count == 1
        decoder._prefill([0], [[5]])
        decoder._prefill([0, 1], [[5, 6, 7], [8, 9]])
        assert counter.frame_count == 1

        def failing(*args):
            raise RuntimeError("inductor could not compile it")

        decoder.prefill_one = failing  # once the compiled prefill has run, its errors are the request's
        with pytest.raises(RuntimeError, match="could not compile"):
            decoder._prefill([0], [[5, 6, 7]])
        # one that fails at its first call (the warm-up's: compiling) is left for the eager one
        decoder.prefill_ran = False
        with torch.no_grad():
            plain = model(torch.tensor([[5, 6, 7]])).logits[0, -1]
        torch.testing.assert_close(decoder._prefill([0], [[5, 6, 7]])[0], plain, rtol=1e-4, atol=1e-4)
        assert decoder.prefill_one is decoder.prefill_eager
    finally:
        decoder.close()


def test_batch_widths_add_a_quarter_of_the_largest_when_it_is_8_or_more():
    assert [batch_widths(n) for n in (1, 4, 8, 31, 32, 64)] == [[1], [1, 4], [1, 8], [1, 31], [1, 8, 32], [1, 16, 64]]


def test_rows_move_between_three_widths_of_one_cache_and_decode_as_alone(llama_engine):
    """10 requests of different lengths: the batch runs 32 rows wide, then 8 once 8 are left (the
    running rows move to the first rows of the same cache, over the rows they leave), then 1, and
    every request decodes what it would alone."""
    served = Engine(llama_engine.model, llama_engine.tokenizer, "llama", max_batch=32, max_cache_len=64)
    try:
        decoder = served.decoder
        ptr = decoder.caches[32].keys[0].data_ptr()
        assert decoder.widths == [1, 8, 32]
        assert all(decoder.caches[w].keys[0].data_ptr() == ptr for w in (1, 8))  # no memory of their own
        widths, step = [], decoder._step

        def recording_step():
            widths.append(decoder.width)
            step()

        decoder._step = recording_step
        prompts = [served.encode(t) for t in ("新华社北京电", "记者", "今年以来，我国经济平稳发展", "人民日报")] * 3
        lengths = [2 + 2 * i for i in range(10)]  # the first rows end first: the others move down
        expected = [_reference_greedy(served.model, p, n) for p, n in zip(prompts, lengths)]
        with decoder.condition:  # all join at once
            streams = [served.stream(p, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
                       for p, n in zip(prompts, lengths)]
        assert _read_all(streams) == expected
        assert [w for i, w in enumerate(widths) if i == 0 or w != widths[i - 1]] == [32, 8, 1]
    finally:
        served.close()


def test_warm_up_runs_every_width_and_attention_span_once(model_dir):
    """What the server compiles before it opens its port: each cache width x span bucket."""
    served = Engine.from_pretrained(model_dir, name="tiny", device="cpu", max_batch=32)
    try:
        seen = []
        decoder = served.decoder
        for width, step in list(decoder.decode.items()):
            def recording(cache, *args, width=width, step=step):
                seen.append((width, cache.span))
                return step(cache, *args)
            decoder.decode[width] = recording
        assert served.warm_up() > 0
        assert sorted(set(seen)) == [(w, s) for w in (1, 8, 32) for s in (256, 512, 1024)]
        # one step each (1, 2 and 9 requests: the fewest that need the width), nothing left running
        assert len(seen) == 9 and served.tokens_generated == 3 * 2 * (1 + 2 + 9)
    finally:
        served.close()


def test_a_seeded_sample_is_the_same_alone_and_in_a_batch(engine):
    prompt = engine.encode("今天")
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=40, repetition_penalty=1.2,
                            seed=11, ignore_eos=True)
    alone = _read_all([engine.stream(prompt, params)])[0]
    others = [engine.stream(engine.encode(t), SamplingParams(max_new_tokens=16, temperature=0.7, seed=i))
              for i, t in enumerate(["新华社", "记者从教育部获悉"])]
    batched = _read_all([engine.stream(prompt, params), *others])[0]
    assert alone == batched and len(alone) == 16


def test_a_cancelled_generation_leaves_the_others_intact(engine):
    prompts = [engine.encode(t) for t in ("新华社北京电", "记者")]
    n = 30
    expected = [_reference_greedy(engine.model, p, n) for p in prompts]
    greedy = SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
    keep, drop = engine.stream(prompts[0], greedy), engine.stream(prompts[1], greedy)
    pieces = iter(drop)
    next(pieces)
    drop.close()  # returns once the batcher has let it go
    assert len(drop.token_ids) < n
    assert _read_all([keep])[0] == expected[0]


def test_a_partial_stop_string_is_held_back():
    assert _partial_stop_length("今天用", ("用户：",)) == 1
    assert _partial_stop_length("今天用户", ("用户：", "X")) == 2
    assert _partial_stop_length("今天", ("用户：",)) == 0


def test_sampling_is_seeded_and_checked(engine):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=50, seed=7)
    assert engine.complete("今天", params) == engine.complete("今天", params)
    for bad, message in [({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"),
                         ({"max_new_tokens": 0}, "max_tokens"), ({"top_k": -1}, "top_k")]:
        with pytest.raises(UserError, match=message):
            engine.stream(engine.encode("今天"), SamplingParams(**{"max_new_tokens": 5, **bad}))
    with pytest.raises(UserError, match="context"):
        engine.stream(engine.encode("今天"), SamplingParams(max_new_tokens=CONTEXT))


def test_fit_conversation_drops_the_oldest_turns_first(engine):
    old = "人民日报社论" * 60  # about 360 tokens per turn
    messages = [{"role": "system", "content": "系统"}]
    for mark in "甲乙丙丁":
        messages += [{"role": "user", "content": f"问题{mark}{old}"}, {"role": "assistant", "content": f"回答{mark}{old}"}]
    messages.append({"role": "user", "content": "最后的问题"})
    ids, stop = fit_conversation(engine, messages, max_new_tokens=100)
    prompt = engine.tokenizer.decode(ids)
    assert len(ids) + 100 <= CONTEXT and stop == get_template("plain").stop
    assert "系 统" in prompt and "最 后 的 问 题" in prompt and "问 题 甲" not in prompt and "回 答 丁" in prompt
    with pytest.raises(UserError, match="does not fit"):
        fit_conversation(engine, [{"role": "user", "content": old * 4}], max_new_tokens=10)


def test_limiter_queues_then_refuses_with_429_and_times_out_with_503():
    async def scenario():
        limiter = Limiter(max_concurrent=1, max_waiting=1, timeout=0.3)
        await limiter.acquire()  # the one running generation
        waiter = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.05)
        assert limiter.waiting == 1
        with pytest.raises(ApiError) as busy:
            await limiter.acquire()
        with pytest.raises(ApiError) as timed_out:
            await waiter
        limiter.release()
        await limiter.acquire()  # free again
        return busy.value.status, timed_out.value.status, limiter.active, limiter.waiting

    assert asyncio.run(scenario()) == (429, 503, 1, 0)


# ------------------------------------------------------------ the real server
@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "chinese_gpt2/serve.py"), "--model", str(model_dir), "--port", str(port),
         "--device", "cpu", "--served_model_name", "tiny", "--max_concurrent", "1", "--max_waiting", "1",
         "--queue_timeout", "1.0", "--max_request_bytes", "20000"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/health", process)
    yield url
    process.terminate()
    process.wait(timeout=20)
    log.seek(0)
    print(log.read()[-3000:])


@pytest.fixture
def client(server):
    import openai  # (here, not at the top: the GPU image lacks it, and the GPU tests need none)

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


def test_openai_client_completions_and_chat(client, server, engine):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="新华社北京电", max_tokens=12, temperature=0)
    assert done.object == "text_completion" and done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.prompt_tokens == 6 and done.usage.completion_tokens <= 12
    text = done.choices[0].text
    assert text and " " not in text
    streamed = client.completions.create(model="tiny", prompt="新华社北京电", max_tokens=12, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == text  # the stream spells the same greedy text
    assert text == engine.complete("新华社北京电", SamplingParams(max_new_tokens=12, temperature=0))  # the engine's
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason

    messages = [{"role": "user", "content": "你好"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    reply = chat.choices[0].message.content
    ids, stop = engine.chat_ids(messages)  # the server prompts as the engine's template does
    assert reply and reply == "".join(engine.stream(ids, SamplingParams(max_new_tokens=10, temperature=0, stop=stop)))
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_the_event_stream_ends_with_done(server):
    body = {"prompt": "今天", "max_tokens": 5, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "   "}, 400, "empty"),
    ({"prompt": "今天", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "今天", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ({"prompt": "今天", "temperature": 2.5}, 400, "temperature"),
    ({"prompt": "今天", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "今天", "n": 2}, 400, "n=1"),
    ({"prompt": "今天", "model": "gpt-4"}, 404, "not found"),
    ({"prompt": ["a", "b"]}, 400, "one prompt"),
    ({"max_tokens": 5}, 400, "prompt"),
    ({"prompt": "人民日报" * 300}, 400, "context"),
    ({"prompt": "今" * 8000}, 413, "bytes"),
    ({"prompt": "今天", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "今天", "logprobs": -1}, 400, "logprobs"),
    ({"prompt": "今天", "logprobs": 1, "stream": True}, 400, "logprobs"),
    ({"prompt": "今天", "echo": True, "stream": True}, 400, "echo"),
    ({"prompt": [[5, 10 ** 6]]}, 400, "token ids"),
    ({"prompt": "今天", "max_tokens": -1, "echo": True}, 400, "max_tokens"),
])
def test_bad_requests_get_4xx(server, body, status, message):
    response = httpx.post(f"{server}/v1/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_openai_client_sees_bad_requests_as_errors(client):
    import openai

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="今天")


def test_disconnect_stops_generation_and_a_full_server_answers_429_then_503(server):
    before = health(server)["tokens_generated"]
    long_request = {"prompt": "今天", "max_tokens": 1020, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as first:
        with first.stream("POST", f"{server}/v1/completions", json=long_request) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # generating now, in the only slot

            # a second request queues (max_waiting 1) and gives up after queue_timeout (1 s) ...
            waited = {}
            second = threading.Thread(target=lambda: waited.update(response=httpx.post(
                f"{server}/v1/completions", json={"prompt": "今天", "max_tokens": 5}, timeout=30)))
            second.start()
            for _ in range(50):
                if health(server)["waiting"] == 1:
                    break
                time.sleep(0.02)
            # ... while it waits, a third finds the queue full
            third = httpx.post(f"{server}/v1/completions", json={"prompt": "今天", "max_tokens": 5}, timeout=30)
            assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
            second.join()
            assert waited["response"].status_code == 503
        # leaving the block closes the connection mid-stream
    for _ in range(100):
        if health(server)["active"] == 0:
            break
        time.sleep(0.05)
    state = health(server)
    assert state["active"] == 0 and state["waiting"] == 0
    generated = state["tokens_generated"] - before
    time.sleep(0.5)
    assert health(server)["tokens_generated"] - before == generated  # nothing runs on
    assert generated < 600, f"{generated} of 1020 tokens generated after the client left"
    after = httpx.post(f"{server}/v1/completions", json={"prompt": "今天", "max_tokens": 3}, timeout=30)
    assert after.status_code == 200  # the slot came back


def test_64_streaming_clients_a_quarter_leaving_all_others_complete(model_dir, tmp_path):
    """Load on the CPU: 64 concurrent streaming clients over 16 slots, every fourth one closing its
    connection after the first chunk. Every other client gets all its tokens, nobody a 5xx, and
    the server ends idle."""
    port = free_port()
    log = (tmp_path / "server.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "chinese_gpt2/serve.py"), "--model", str(model_dir), "--port", str(port),
         "--device", "cpu", "--max_concurrent", "16", "--max_waiting", "64", "--queue_timeout", "120"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    n_tokens = 24

    async def one(index: int, client: httpx.AsyncClient) -> dict:
        body = {"prompt": "新华社北京电" * (1 + index % 5), "max_tokens": n_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.8, "seed": index}
        events = []
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
                    if index % 4 == 0:
                        break  # leaving: the connection closes mid-stream
            return {"status": response.status_code, "events": events}

    async def crowd():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*(one(i, client) for i in range(64)))

    try:
        wait_until_up(f"{url}/health", process)
        before = health(url)["tokens_generated"]
        results = asyncio.run(crowd())
        assert all(r["status"] == 200 for r in results), [r["status"] for r in results]
        stayed = [r["events"] for i, r in enumerate(results) if i % 4]
        assert len(stayed) == 48
        for events in stayed:
            assert not any("error" in e for e in events)
            assert events[-1]["usage"]["completion_tokens"] == n_tokens
            assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["length"]
        for _ in range(100):  # the leavers' generations stop; nothing stays queued or running
            state = health(url)
            if state["active"] == 0 and state["waiting"] == 0:
                break
            time.sleep(0.05)
        assert state["active"] == 0 and state["waiting"] == 0
        leavers = state["tokens_generated"] - before - 48 * n_tokens
        assert 0 < leavers < 16 * n_tokens // 2  # the leavers' generations stopped early
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.seek(0)
        print(log.read()[-3000:])


@pytest.mark.parametrize("flag", ["--model", "--model_name_or_path"])  # the second as train.py names it
def test_serve_cli_refuses_a_missing_model(tmp_path, flag):
    result = subprocess.run([sys.executable, str(REPO / "chinese_gpt2/serve.py"), flag, str(tmp_path),
                             "--port", str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"no model in {tmp_path}" in result.stderr


@pytest.mark.parametrize("script", ["serve.py", "chatbot.py"])
def test_a_taken_port_is_refused_before_the_model_loads(tmp_path, script):
    """(not after minutes of loading and compiling: the missing model would be named first otherwise)"""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = subprocess.run([sys.executable, str(REPO / "chinese_gpt2" / script), "--model", str(tmp_path),
                                 "--port", str(port)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use (another program listens there" in result.stderr


# ------------------------------------------------------------ chatbot in a browser
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

# Records every text the last bot message shows, as the page changes.
WATCH_REPLIES = """
window.botTexts = [];
new MutationObserver(() => {
  const bots = document.querySelectorAll("[data-testid='bot']");
  if (!bots.length) return;
  const text = bots[bots.length - 1].innerText.trim();
  if (text && window.botTexts[window.botTexts.length - 1] !== text) window.botTexts.push(text);
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""


@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (make setup installs them)")
def test_chatbot_streams_a_reply_in_headless_chromium(model_dir, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    log = (tmp_path / "chatbot.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "chinese_gpt2/chatbot.py"), "--model", str(model_dir), "--port", str(port),
         "--device", "cpu", "--max_new_tokens", "300"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, process)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.get(url)
        box = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "textarea"))
        driver.execute_script(WATCH_REPLIES)
        box.send_keys("新华社北京电")
        box.send_keys(Keys.ENTER)
        user = WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid='user']"))
        assert user[-1].text.strip() == "新华社北京电"
        page = driver.find_element(By.TAG_NAME, "body").text
        assert f"http://127.0.0.1:{port}" in page and ":7860" not in page  # the real address, not the default

        def settled(d):  # the reply stopped changing for a second
            texts = d.execute_script("return window.botTexts")
            time.sleep(1)
            return texts and texts == d.execute_script("return window.botTexts") and texts
        texts = WebDriverWait(driver, 120, poll_frequency=0.1).until(settled)
        final = driver.find_elements(By.CSS_SELECTOR, "[data-testid='bot']")[-1].text.strip()
        assert final and final == texts[-1]
        assert len(texts) >= 3, f"the reply appeared at once, not streamed: {texts}"
        assert all(final.startswith(t) for t in texts)  # it grew piece by piece
        # Chinese renders in a CJK font (make browser installs fonts-noto-cjk), not as empty boxes:
        # the page's Chinese is drawn by a font that has its characters
        assert subprocess.run(["fc-list", f":charset={ord('新'):x}"], capture_output=True,
                              text=True).stdout.strip(), "no installed font draws 新: run make browser"
        shot = REPO / "outputs" / "chatbot_screenshot.png"  # for people to look at
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.set_window_size(1200, 1400)
        driver.execute_script("window.scrollTo(0, 0)")  # the title and the address first
        assert driver.save_screenshot(str(shot))
    finally:
        if driver is not None:
            driver.quit()
        process.terminate()
        process.wait(timeout=20)
        log.seek(0)
        print(log.read()[-3000:])


# ------------------------------------------------------- the sequential decoder
@pytest.fixture(scope="module")
def bloom_engine(engine):
    """A tiny BLOOM (ALiBi, no position_ids) on the GPT-2 fixture's tokenizer."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=engine.vocab_size, hidden_size=64, n_layer=2, n_head=4,
                                         bos_token_id=1, eos_token_id=engine.tokenizer.eos_token_id)).eval()
    served = Engine(model, engine.tokenizer, "bloom")
    yield served
    served.close()


def test_bloom_is_served_by_the_sequential_decoder_equal_to_generate(bloom_engine):
    assert not bloom_engine.batched
    with pytest.raises(UserError, match="position_ids"):
        Engine(bloom_engine.model, bloom_engine.tokenizer, "bloom", decoder="batch")
    prompts = [bloom_engine.encode(text) for text in ("新华社北京电", "今天", "人民日报社论指出")]
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    streams = [bloom_engine.stream(p, params) for p in prompts]  # queued together, decoded in turn
    assert _read_all(streams) == [_reference_greedy(bloom_engine.model, p, 12) for p in prompts]
    seeded = SamplingParams(max_new_tokens=12, temperature=0.9, seed=3, ignore_eos=True)
    first, second = (bloom_engine.stream(prompts[0], seeded) for _ in range(2))
    assert _read_all([first]) == _read_all([second])
    long = bloom_engine.stream(prompts[1], SamplingParams(max_new_tokens=500, temperature=0, ignore_eos=True))
    for _ in zip(range(2), long):
        pass
    long.close()  # leaving the loop cancels: the decoder moves on to the next request
    assert len(long.token_ids) < 500
    assert _read_all([bloom_engine.stream(prompts[2], params)]) == [_reference_greedy(bloom_engine.model, prompts[2], 12)]


def test_the_sequential_decoder_equals_the_batcher_on_a_batchable_model(engine):
    sequential = Engine(engine.model, engine.tokenizer, "tiny", decoder="sequential")
    try:
        prompt = engine.encode("新华社北京电")
        params = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
        batched_stream, sequential_stream = engine.stream(prompt, params), sequential.stream(prompt, params)
        assert _read_all([batched_stream]) == _read_all([sequential_stream])
        for (value, top), (other, other_top) in zip(batched_stream.logprobs, sequential_stream.logprobs):
            assert value == pytest.approx(other, abs=1e-4) and [t for t, _ in top] == [t for t, _ in other_top]
    finally:
        sequential.close()


# ------------------------------------------------------------- log-probabilities
def _reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of one plain forward over `ids`: row i predicts token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_logprobs_of_generated_and_prompt_tokens_are_the_models_own(engine):
    prompt = engine.encode("新华社北京电")
    stream = engine.stream(prompt, SamplingParams(max_new_tokens=8, temperature=0.7, seed=1, ignore_eos=True,
                                                  logprobs=3))
    generated = _read_all([stream])[0]
    reference = _reference_logprobs(engine.model, prompt + generated)
    assert len(stream.logprobs) == 8
    for i, (token, (value, top)) in enumerate(zip(generated, stream.logprobs)):
        row = reference[len(prompt) - 1 + i]  # not the temperature's distribution: the model's
        assert value == pytest.approx(row[token].item(), abs=1e-4)
        assert [t for t, _ in top] == row.topk(3).indices.tolist()
        assert [v for _, v in top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    scored = engine.prompt_logprobs(prompt, 1)
    assert [v for v, _ in scored] == pytest.approx(
        [reference[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)], abs=1e-4)
    with pytest.raises(UserError, match="logprobs"):
        SamplingParams(logprobs=21).check()


def test_completions_report_logprobs_and_echo_as_openais_legacy_api(client, engine):
    prompt = "新华社北京电"
    ids = engine.encode(prompt)
    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=2,
                                     echo=True, extra_body={"ignore_eos": True})
    choice = done.choices[0]
    logprobs = choice.logprobs
    assert choice.text.startswith(prompt) and "".join(logprobs.tokens) == choice.text
    assert len(logprobs.tokens) == len(ids) + 4 and logprobs.token_logprobs[0] is None
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    generated = engine.encode(choice.text[len(prompt):])
    reference = _reference_logprobs(engine.model, ids + generated)  # the server's model, in this process
    expected = [reference[i - 1, token].item() for i, token in enumerate(ids + generated) if i]
    assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    for i, top in enumerate(logprobs.top_logprobs[1:], start=1):
        assert max(top.values()) == pytest.approx(reference[i - 1].max().item(), abs=1e-4)
        assert logprobs.tokens[i] in top and 2 <= len(top) <= 3  # the two likeliest and the token itself
    for value, top in zip(logprobs.token_logprobs[len(ids):], logprobs.top_logprobs[len(ids):]):
        assert value == max(top.values())  # greedy: each generated token is exactly the likeliest

    # the prompt as token ids, nothing generated (max_tokens 0): the same numbers for the prompt
    scored = httpx.post(f"{client.base_url}completions", json={"prompt": [ids], "max_tokens": 0, "echo": True,
                                                                "logprobs": 2}, timeout=30)
    assert scored.status_code == 200, scored.text
    scored = scored.json()
    assert scored["usage"]["completion_tokens"] == 0 and scored["choices"][0]["text"] == prompt
    assert scored["choices"][0]["logprobs"]["token_logprobs"] == logprobs.token_logprobs[:len(ids)]
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True})
    assert plain.choices[0].logprobs.token_logprobs == logprobs.token_logprobs[len(ids):]


def test_chat_reports_logprobs_of_each_reply_token(client):
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert "".join(t.token for t in content).startswith(chat.choices[0].message.content)
    for token in content:
        assert len(token.top_logprobs) == 2 and token.logprob == token.top_logprobs[0].logprob <= 0
        assert token.bytes == list(token.token.encode())


def test_lm_evaluation_harness_scores_the_same_through_the_server_as_on_the_model(server, model_dir, tmp_path,
                                                                               monkeypatch):
    """lm-evaluation-harness's `local-completions` model runs a multiple-choice task (built-in
    reviews: positive or negative?) against serve.py; its `hf` model runs the same task on the
    same weights. Every choice's log-likelihood and greedy flag, and so the accuracy, agree."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from common.corpora import load_reviews

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reviews = load_reviews()[::1000][:16]
    (tmp_path / "reviews.jsonl").write_text("".join(
        json.dumps({"text": text[:40], "label": label}, ensure_ascii=False) + "\n" for text, label in reviews),
        encoding="utf-8")
    (tmp_path / "review_sentiment.yaml").write_text(f"""task: review_sentiment_zh
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "reviews.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "评论：{{{{text}}}}\\n情感："
doc_to_choice: ["负面", "正面"]
doc_to_target: label
metric_list:
  - metric: acc
""", encoding="utf-8")
    tasks = TaskManager(include_path=str(tmp_path))

    def run(model: str, model_args: str) -> dict:
        return simple_evaluate(model=model, model_args=model_args, tasks=["review_sentiment_zh"], task_manager=tasks,
                               log_samples=True, batch_size=1, bootstrap_iters=0)

    served = run("local-completions", f"model=tiny,base_url={server}/v1/completions,tokenizer={model_dir},"
                                      "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1")
    # add_bos_token=False: as local-completions encodes (else this WordPiece tokenizer adds [CLS] ... [SEP])
    direct = run("hf", f"pretrained={model_dir},dtype=float32,device=cpu,add_bos_token=False")

    def likelihoods(result: dict) -> list[tuple[float, bool]]:
        samples = sorted(result["samples"]["review_sentiment_zh"], key=lambda s: s["doc_id"])
        return [tuple(resp[0]) for sample in samples for resp in sample["resps"]]

    assert len(likelihoods(served)) == 2 * len(reviews)
    for (served_ll, served_greedy), (direct_ll, direct_greedy) in zip(likelihoods(served), likelihoods(direct)):
        assert served_ll == pytest.approx(direct_ll, abs=1e-3) and served_greedy == direct_greedy
    accuracy = served["results"]["review_sentiment_zh"]["acc,none"]
    assert accuracy == direct["results"]["review_sentiment_zh"]["acc,none"]


# ------------------------------------------------------------------ quantised weights
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_a_row_scaled_linear_multiplies_by_its_8_bit_weight_times_the_row_scale_for_one_row_and_many(dtype):
    """RowScaledLinear's forms all compute x @ (stored weight x row scale)^T + bias, the stored
    weight being the original one within the 8-bit format's rounding: one row under torch.compile
    (a float32 product scaled after), and many rows on the 8-bit tensor cores' products, the
    activations rounded to the weight's format with a scale per row: torch._scaled_mm for fp8
    weights (sizes multiples of 16; others are scaled first for a plain product), torch._int_mm for
    int8 ones (int32 sums; one row, eagerly, padded to the 17 rows cuBLAS takes)."""
    from common.serving.loading import RowScaledLinear

    torch.manual_seed(0)
    x = torch.randn(3, 2, 64)
    for out_features in (48, 40):
        linear = torch.nn.Linear(64, out_features)
        scaled = RowScaledLinear(linear, dtype)
        assert scaled.weight.dtype == dtype and scaled.scale.shape == (out_features, 1)
        assert scaled.tensor_core_products == (dtype == torch.int8 or out_features == 48)
        dequantised = scaled.weight.double() * scaled.scale.double()
        error = (dequantised - linear.weight.double()).abs()
        if dtype == torch.int8:
            assert (error <= scaled.scale.double() / 2 + 1e-9).all()
        else:  # e4m3: 3 mantissa bits
            assert (error <= linear.weight.double().abs() / 16 + scaled.scale.double() * 2 ** -9).all()
        expected = x.double() @ dequantised.T + linear.bias.double()
        many_rows = x
        if scaled.tensor_core_products:
            largest = 127 if dtype == torch.int8 else torch.finfo(torch.float8_e4m3fn).max
            row_scale = x.abs().amax(dim=-1, keepdim=True) / largest
            rounded = (x / row_scale).round().to(dtype) if dtype == torch.int8 else (x / row_scale).to(dtype)
            many_rows = rounded.double() * row_scale.double()
            assert (many_rows - x).abs().max() > 1e-3  # the rounding shows
        expected_many = many_rows.double() @ dequantised.T + linear.bias.double()
        traced = torch.compile(scaled, backend="eager", fullgraph=True)  # the form the compiled decode step takes
        with torch.no_grad():
            for module in (scaled, traced):
                many, one = module(x), module(x[:1, :1])
                assert torch.allclose(many.double(), expected_many, atol=1e-5)
                # one row: the float32 product when compiled, else the many-row form
                assert torch.allclose(one.double(), (expected if module is traced else expected_many)[:1, :1], atol=1e-5)


def test_gemlite_kinds_say_they_need_a_gpu(llama_engine):
    from common.serving.loading import GEMLITE, quantize_weights

    for kind in GEMLITE:
        with pytest.raises(UserError, match=f"--quantize {kind} needs a CUDA GPU"):
            quantize_weights(copy.deepcopy(llama_engine.model), kind)


def test_int4_groups_round_each_group_of_a_row_to_16_levels_between_its_extremes():
    """int4_gemlite's quantiser: every group of 64 columns of a row keeps its minimum and maximum
    (levels 0 and 15; a group that does not span 0 is stretched to it) and every weight is within
    half a step of its level, weight ~ (W_q - zero) x scale, the zero point in 0..15."""
    from common.serving.loading import int4_groups

    torch.manual_seed(0)
    weight = torch.randn(8, 256) * torch.linspace(0.1, 2, 8)[:, None]  # rows of different ranges
    weight[3, 64:128] = 0.5  # a constant group: levels from 0 to 0.5
    w_q, scales, zeros = int4_groups(weight, 64)
    assert w_q.dtype == torch.uint8 and w_q.shape == (8, 256) and int(w_q.max()) <= 15
    assert scales.shape == zeros.shape == (8, 4)
    step = scales.repeat_interleave(64, dim=1)
    restored = (w_q.float() - zeros.repeat_interleave(64, dim=1)) * step
    assert ((restored - weight).abs() <= step / 2 + 1e-5).all()
    assert (zeros >= 0).all() and (zeros <= 15).all() and torch.allclose(restored[3, 64:128], weight[3, 64:128])
    groups = w_q.reshape(8, 4, 64)
    assert (groups.amin(-1)[torch.arange(8) != 3] == 0).all() and (groups.amax(-1)[torch.arange(8) != 3] == 15).all()
    assert torch.allclose(scales[:, 0], (weight[:, :64].amax(1) - weight[:, :64].amin(1)) / 15)
    with pytest.raises(UserError, match="not a multiple"):
        int4_groups(torch.randn(4, 96), 64)


# bytes each kind saves per weight of a bf16 linear layer at least, and the logits' relative error at most
# (the names as the benchmarks give them: loading.weights_variant)
GPU_KINDS = {"fp8_rowwise": (0.9, 0.1), "int8_gemlite": (0.9, 0.1), "fp8_gemlite": (0.9, 0.1),
             "int4_gemlite": (1.3, 0.3), "bf16_gemlite": (0.0, 0.01), "none+triton": (0.0, 0.01),
             "none+fused+triton": (0.0, 0.01), "fp8_rowwise+fused+triton": (0.9, 0.1), "int8_rowwise+triton": (0.9, 0.1),
             "none+fused+triton+attn": (0.0, 0.01), "none+fused+triton+glu": (0.0, 0.01),
             "fp8_rowwise+fused+triton+glu": (0.9, 0.1), "int8_rowwise+fused+triton+attn+glu": (0.9, 0.1)}


@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(GPU_KINDS))
def test_gpu_weight_kinds_save_their_bytes_and_decode_their_own_greedy_path(engine, kind):
    """--quantize fp8_rowwise / int8_gemlite / fp8_gemlite / int4_gemlite / bf16_gemlite on a GPU,
    and --matvec triton (with --fuse_projections for some; with --decode_attention triton for two,
    which --decode_attention auto picks for this Llama model on a GPU; the test model groups two
    query heads per key/value head; with SiLU(gate) x up in the gate/up kernel, the benchmarks'
    '+glu', for three): every linear layer is replaced, the
    weights take the bytes their format says (about half of bf16's for 8 bits, under a third for
    4; bf16's for bf16_gemlite and bf16 through the Triton kernel), the logits stay close to bf16's,
    and the engine's compiled decode step, with one request and with three together (fp8_rowwise's
    FP8 tensor-core form for many rows; the one prompt prefilled through its compiled graph), follows
    the model's own greedy path (each streamed token the argmax of one plain forward over prompt +
    stream, up to near-ties)."""
    saved_per_weight, error = GPU_KINDS[kind]
    if "gemlite" in kind:
        # One launch configuration per gemlite kernel: this test is about what the kernels compute, and
        # gemlite tuning every shape and row count of this model at its first call took minutes per kind
        # on an H100 (benchmarks/RESULTS.md, fourteenth session). Serving keeps gemlite's own tuning.
        pytest.importorskip("gemlite").set_autotune("default")
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.serving.loading import (
        MatvecLinear,
        RowScaledLinear,
        attention_wanted,
        kernel_takes,
        prepare_weights,
        weight_bytes,
        weights_variant,
    )

    torch.manual_seed(3)
    plain = LlamaForCausalLM(LlamaConfig(  # (an even vocabulary: the Triton kernel takes an even number of rows)
        vocab_size=(len(engine.tokenizer) + 7) // 8 * 8, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, pad_token_id=0))
    plain = plain.to("cuda", torch.bfloat16).eval()
    assert attention_wanted(plain, "auto")
    quantize, fused, matvec, attention, glu = weights_variant(kind)
    quantised = prepare_weights(copy.deepcopy(plain), quantize, fused, matvec, attention, glu)
    assert all(type(layer.mlp).__name__ == "GluMatvecMLP" for layer in quantised.model.layers) == (glu == "on")
    assert not any(type(m) is torch.nn.Linear for m in quantised.modules())
    assert (quantised.config._attn_implementation == "serving_decode") == (attention == "triton")
    if quantize in ("fp8_rowwise", "int8_rowwise"):  # many rows on the 8-bit tensor cores (H100 / H200)
        assert quantised.model.layers[0].mlp.down_proj.tensor_core_products
    if matvec == "triton":  # every product of one row goes through the kernel
        assert all(kernel_takes(m) for m in quantised.modules() if isinstance(m, (MatvecLinear, RowScaledLinear)))
        assert sum(isinstance(m, (MatvecLinear, RowScaledLinear)) for m in quantised.modules()) == (4 if fused == "on" else 7) * 2 + 1
    linear = sum(m.weight.numel() for m in plain.modules() if type(m) is torch.nn.Linear)
    saved = weight_bytes(plain) - weight_bytes(quantised)
    assert saved >= saved_per_weight * linear if saved_per_weight else abs(saved) <= 0.01 * linear
    prompts = [engine.encode(text) for text in ("新华社北京电", "今年以来，我国经济平稳发展", "记者")]
    ids = torch.tensor([prompts[0]], device="cuda")
    with torch.no_grad():
        exact, approx = plain(ids).logits.float(), quantised(ids).logits.float()
        if matvec == "triton":  # one row: the 8-bit kernels' products (bf16's eager ones are cuBLAS's)
            exact_one, approx_one = plain(ids[:, :1]).logits.float(), quantised(ids[:, :1]).logits.float()
            assert (approx_one - exact_one).norm() / exact_one.norm() < error
    assert (approx - exact).norm() / exact.norm() < error
    greedy = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
    # The kinds' engines share one recompile limit in this process (runtime.RECOMPILE_LIMIT): past it dynamo
    # would run a decode width eagerly with only a warning; here that fails the test instead.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        served = Engine(quantised, engine.tokenizer, kind, max_batch=4, max_cache_len=256, compile=True)  # 2 widths
        try:
            served.warm_up()
            assert served.decoder.prefill_one is not served.decoder.prefill_eager  # compiled (not given up on)
            streams = _read_all([served.stream(prompts[0], greedy)])
            with served.decoder.condition:  # the three join together: the 4-row step
                together = [served.stream(prompt, greedy) for prompt in prompts]
            streams += _read_all(together)
        finally:
            served.close()
    for prompt, tokens in zip([prompts[0], *prompts], streams):
        with torch.no_grad():
            logits = quantised(torch.tensor([prompt + tokens[:-1]], device="cuda")).logits[0, len(prompt) - 1:].float()
        gaps = logits.max(dim=-1).values - logits.gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
        assert len(tokens) == 16 and gaps.max().item() < 0.25


def _reran_in_triton_interpreter(request) -> bool:
    """For a CPU test of our Triton kernels: False when this process runs them through Triton's
    interpreter already; else the test is run again in a process of its own that does (the
    interpreter is chosen as triton is imported), it must pass there, and True."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                         cwd=REPO, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-5000:] + run.stderr[-2000:]
    return True


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_triton_matvec_multiplies_one_row_as_float64_does(device, request, monkeypatch):
    """matvec.py's kernel on shapes its blocks do not divide (rows not a multiple of 4 or 8,
    columns not of the loop's step), with and without a scale per row and a bias, 16- and 8-bit
    weights, alone and with SiLU(gate) x up taken from its sums (`glu`). On the GPU also inside
    torch.compile (a CUDA-graphed step's form); on the CPU through Triton's interpreter (the
    kernel's arithmetic, masks and launch parameters, not its compiled form or speed). An odd number of rows is refused (prepare_weights leaves it to inductor)."""
    pytest.importorskip("common.serving.matvec", reason="needs triton")
    if device == "cpu" and _reran_in_triton_interpreter(request):
        return
    functions = [torch.ops.serving.matvec]
    shapes = ((16, 4096), (1030, 1000), (6, 4100), (38, 64))
    if device == "cuda":
        functions.append(torch.compile(lambda *args: torch.ops.serving.matvec(*args), fullgraph=True, dynamic=False))
        monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 256)  # (each shape, dtype and form compiles)
        shapes = ((4096, 4096), *shapes[1:])
    torch.manual_seed(0)
    for n, k in shapes:
        x = torch.randn(1, 1, k, device=device, dtype=torch.bfloat16)
        for dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.int8):
            weight = torch.randn(n, k, device=device) * 2
            weight = weight.round().clamp(-127, 127).to(dtype) if dtype == torch.int8 else weight.to(dtype)
            scale = None if dtype == torch.bfloat16 else torch.rand(n, device=device, dtype=torch.bfloat16) + 0.5
            bias = torch.randn(n, device=device, dtype=torch.bfloat16)
            for b in (None, bias):
                expected = x.double().view(-1) @ weight.double().T
                expected = (expected if scale is None else expected * scale.double()) + (0 if b is None else b.double())
                # glu: the first half of the rows a SwiGLU MLP's gate, the rest its up
                swiglu = torch.nn.functional.silu(expected[:n // 2]) * expected[n // 2:]
                for fn in functions:
                    out = fn(x, weight, scale, b)
                    assert out.shape == (1, 1, n) and out.dtype == torch.bfloat16
                    # the float32 sums rounded once to bf16 (8 bits of mantissa)
                    assert ((out.double().view(-1) - expected).abs() <= expected.abs() / 128 + 1e-2).all(), (n, k, dtype)
                    out = fn(x, weight, scale, b, True)
                    assert out.shape == (1, 1, n // 2) and out.dtype == torch.bfloat16
                    assert ((out.double().view(-1) - swiglu).abs() <= swiglu.abs() / 128 + 1e-2).all(), (n, k, dtype)
    with pytest.raises(ValueError, match="not a multiple of 2"):
        functions[0](x, torch.randn(37, x.shape[-1], device=device, dtype=torch.bfloat16))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_decode_attention_kernel_attends_as_float64_sdpa_does(device, request, monkeypatch):
    """decode_attention.py's kernels: one query per row over the first `span` slots of a longer
    cache (the views SlotCache gives), each row masked after its own position, grouped-query
    heads, spans that are not a multiple of the kernel's block, with and without a mask, in one
    piece or split (2 pieces for one row of 32 heads; 4 for one row of 4 heads, the last past a
    260-slot span) and combined; against SDPA in float64. The kernel does not read the keys and
    values of a block that the mask hides wholly: NaN there changes nothing. A row whose mask
    hides every slot gets zeros. On the GPU also inside torch.compile; on the CPU through
    Triton's interpreter. Calls it does not take (two queries, a head size not a power of 2, a
    boolean mask) are left to SDPA."""
    pytest.importorskip("common.serving.decode_attention", reason="needs triton")
    if device == "cpu" and _reran_in_triton_interpreter(request):
        return
    from common.serving.decode_attention import BLOCK_S, split_count, takes

    functions = [torch.ops.serving.decode_attention]
    if device == "cuda":
        functions.append(torch.compile(lambda *args: torch.ops.serving.decode_attention(*args),
                                       fullgraph=True, dynamic=False))
        monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 256)  # (each shape and mask compiles)
    torch.manual_seed(0)
    # rows, heads, key / value heads, span, head size, the first row's position: the pieces a span is cut into
    cases = {(1, 32, 32, 256, 128, 255): 2, (1, 32, 8, 256, 128, 70): 2, (1, 4, 2, 260, 64, 259): 4,
             (6, 32, 8, 290, 64, 289): 1, (2, 4, 1, 1, 32, 0): 1}
    if device == "cpu":  # (on a GPU the pieces depend on its multiprocessors)
        assert {case: split_count(case[0], case[1], case[3], torch.device("cpu")) for case in cases} == cases
    hidden_blocks = 0
    for rows, heads, kv_heads, span, dims, first in cases:
        keys, values = (torch.randn(rows, kv_heads, 300, dims, device=device, dtype=torch.bfloat16) for _ in "kv")
        k, v = keys[:, :, :span], values[:, :, :span]
        q = torch.randn(rows, heads, 1, dims, device=device, dtype=torch.bfloat16)
        position = torch.randint(0, span, (rows, 1), device=device)
        position[0] = first
        visible = torch.arange(span, device=device) <= position
        mask = torch.zeros(visible.shape, dtype=torch.bfloat16, device=device)
        mask = mask.masked_fill_(~visible, torch.finfo(torch.bfloat16).min)[:, None, None, :]
        assert takes(q, k, v, mask)
        group = heads // kv_heads
        for m in (mask, None):
            expected = torch.nn.functional.scaled_dot_product_attention(
                q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1),
                attn_mask=None if m is None else m.double(), scale=dims ** -0.5).transpose(1, 2)
            for fn in functions:
                out = fn(q, k, v, m, dims ** -0.5)
                assert out.shape == (rows, 1, heads, dims) and out.dtype == torch.bfloat16
                # float32 sums rounded once to bf16
                assert ((out.double() - expected).abs() <= expected.abs() / 128 + 2e-3).all(), (rows, heads, span, m is None)
        clean = [fn(q, k, v, mask, dims ** -0.5) for fn in functions]
        for row, last in enumerate(position[:, 0].tolist()):  # NaN in the blocks wholly after each row's position
            start = (last // BLOCK_S + 1) * BLOCK_S
            keys[row, :, start:span] = values[row, :, start:span] = float("nan")
            hidden_blocks += -(-max(0, span - start) // BLOCK_S)
        hidden = torch.full_like(mask, torch.finfo(torch.bfloat16).min)
        for fn, before in zip(functions, clean):
            assert torch.equal(fn(q, k, v, mask, dims ** -0.5), before), (rows, heads, span)
            assert (fn(q, k, v, hidden, dims ** -0.5) == 0).all(), (rows, heads, span)
    assert hidden_blocks >= 3  # (the 70-slot row's second block, and some of the 290-slot rows')
    assert not takes(q.expand(-1, -1, 2, -1), k, v, mask)
    assert not takes(q[..., :24], k[..., :24], v[..., :24], mask)
    assert not takes(q, k, v, mask > 0)


@pytest.mark.gpu
def test_on_cuda_the_defaults_merge_the_products_and_take_the_kernel():
    """serve.py's defaults (--fuse_projections auto, --matvec auto) on a CUDA Llama in bf16: q/k/v
    and gate/up merged, every product of one row through the Triton kernel, the gate/up kernel
    taking SiLU(gate) x up (GluMatvecMLP); int8_rowwise /
    fp8_rowwise merged too, torchao's quantisations (merged speed not measured) not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.serving.loading import MatvecLinear, fuse_wanted, prepare_weights

    plain = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).to("cuda", torch.bfloat16)
    served = prepare_weights(copy.deepcopy(plain))
    layer = served.model.layers[1]
    assert type(layer.self_attn).__name__ == "Phi3Attention" and type(layer.mlp).__name__ == "GluMatvecMLP"
    assert all(isinstance(m, MatvecLinear) for m in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, served.lm_head))
    assert fuse_wanted(plain, "fp8_rowwise", "auto") and not fuse_wanted(plain, "int8", "auto")
    assert not fuse_wanted(plain, "none", "off")


@pytest.mark.parametrize("kind", ["int8", "int8_rowwise"])
def test_a_quantised_adapter_model_is_served_close_to_the_unquantised_one(llama_engine, tmp_path, kind):
    """serve.py --quantize int8 / int8_rowwise over a LoRA adapter: merged first, then every linear
    layer's weight stored as int8 with a scale per row (torchao's tensor subclass, or
    loading.RowScaledLinear)."""
    from peft import LoraConfig, get_peft_model

    from common.serving.loading import weight_bytes

    base = tmp_path / "base"
    llama_engine.model.save_pretrained(base)
    llama_engine.tokenizer.save_pretrained(base)
    torch.manual_seed(2)
    adapted = get_peft_model(copy.deepcopy(llama_engine.model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                           init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    llama_engine.tokenizer.save_pretrained(tmp_path / "adapter")
    with pytest.raises(UserError, match="names no base model"):
        Engine.from_pretrained(tmp_path / "adapter", device="cpu")
    plain = Engine.from_pretrained(tmp_path / "adapter", device="cpu", base_model=base, max_batch=2)
    int8 = Engine.from_pretrained(tmp_path / "adapter", device="cpu", base_model=base, max_batch=2, quantize=kind)
    try:
        linear = sum(m.weight.numel() for m in plain.model.modules() if isinstance(m, torch.nn.Linear))
        if kind == "int8_rowwise":
            assert not any(type(m) is torch.nn.Linear for m in int8.model.modules())
            assert {m.weight.dtype for m in int8.model.modules() if type(m).__name__ == "RowScaledLinear"} == {torch.int8}
        saved = weight_bytes(plain.model) - weight_bytes(int8.model)
        assert saved >= 0.7 * linear * 3  # 4-byte floats -> 1 byte (+ a scale per row)
        prompt = plain.encode("新华社北京电")
        with torch.no_grad():
            ids = torch.tensor([prompt])
            exact, quantised = plain.model(ids).logits, int8.model(ids).logits
            without_adapter = llama_engine.model(ids).logits
        assert (quantised - exact).norm() / exact.norm() < 0.02
        assert not torch.allclose(exact, without_adapter, atol=1e-3)  # the adapter was merged into what is served
        greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
        # the batcher decodes the quantised model as generate does (random weights: greedy text itself is
        # at the mercy of near-ties, so the closeness is the logits' above)
        assert _read_all([int8.stream(prompt, greedy)])[0] == _reference_greedy(int8.model, prompt, 12)
    finally:
        plain.close()
        int8.close()
    with pytest.raises(UserError, match="unknown quantisation"):
        Engine.from_pretrained(tmp_path / "adapter", device="cpu", base_model=base, quantize="int3")


def test_a_sliding_window_model_is_served_its_own_tokens(engine):
    """A Mistral whose tokens see only the last 4 (transformers' sliding_window) decodes in the
    batcher what its own `generate` does, alone and beside a request with a shorter prompt (the
    padded prefill); without the window its greedy tokens differ, so the window is what this
    checks. A Qwen2 whose layers mix windowed and full attention is served one request at a
    time (the batcher's one mask cannot be both), with its own tokens too."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(5)
    shape = dict(vocab_size=len(engine.tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    mistral = MistralForCausalLM(MistralConfig(sliding_window=4, **shape)).eval()
    prompts = [engine.encode("今年以来，我国经济平稳发展"), engine.encode("记者")]
    greedy = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    expected = [_reference_greedy(mistral, prompt, 10) for prompt in prompts]
    unwindowed = copy.deepcopy(mistral)
    unwindowed.config.sliding_window = None
    assert _reference_greedy(unwindowed, prompts[0], 10) != expected[0]
    served = Engine(mistral, engine.tokenizer, "mistral", max_batch=2, compile=False)
    try:
        assert served.batched
        assert _read_all([served.stream(prompts[0], greedy)]) == expected[:1]
        with served.decoder.condition:  # the two join together: one padded prefill
            together = [served.stream(prompt, greedy) for prompt in prompts]
        assert _read_all(together) == expected
    finally:
        served.close()
    mixed = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1, **shape)).eval()
    served = Engine(mixed, engine.tokenizer, "qwen2", max_batch=2, compile=False)
    try:
        assert not served.batched
        assert _read_all([served.stream(prompts[0], greedy)]) == [_reference_greedy(mixed, prompts[0], 10)]
    finally:
        served.close()


def test_merged_projections_serve_the_models_own_logits_and_tokens(engine, llama_engine, model_dir, tmp_path):
    """serve.py --fuse_projections: each decoder layer's q/k/v and gate/up products become one
    each (transformers' Phi3 modules) in a Llama (grouped-query attention) and a Qwen2 (q/k/v
    biases, random here so that dropping or misplacing them shows): the same logits, the same
    served greedy tokens as the unmerged model's `generate`, and --quantize then quantises the
    merged products. Other families, and a Qwen2 whose layers differ in sliding window, are refused."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(4)
    qwen2 = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(engine.tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)).eval()
    with torch.no_grad():
        for module in qwen2.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_()
    prompt = engine.encode("今年以来，我国经济平稳发展")
    greedy = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    for name, original in (("llama", llama_engine.model), ("qwen2", qwen2)):
        path = tmp_path / name
        original.save_pretrained(path)
        engine.tokenizer.save_pretrained(path)
        for quantize in ("none", "int8_rowwise"):
            fused = Engine.from_pretrained(path, device="cpu", max_batch=2, fuse_projections="on", quantize=quantize)
            try:
                products = [type(m).__name__ for m in fused.model.model.layers[0].modules()
                            if type(m).__name__ in ("Linear", "RowScaledLinear")]
                assert products == [{"none": "Linear", "int8_rowwise": "RowScaledLinear"}[quantize]] * 4
                if quantize == "none":
                    attention = fused.model.model.layers[0].self_attn
                    assert (attention.qkv_proj.bias is not None) == (name == "qwen2")
                    with torch.no_grad():
                        ids = torch.tensor([prompt])
                        torch.testing.assert_close(fused.model(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)
                    assert _read_all([fused.stream(prompt, greedy)])[0] == _reference_greedy(original, prompt, 12)
            finally:
                fused.close()
    with pytest.raises(UserError, match="implemented for Llama, Mistral, Qwen2 models only"):
        Engine.from_pretrained(model_dir, device="cpu", fuse_projections="on")  # GPT-2
    windowed = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=16, max_window_layers=1))
    with pytest.raises(UserError, match="with and without a sliding window"):
        fuse_projections(windowed)


def _python_json(script: str, *args, **env) -> dict:
    """What `script` prints last (a JSON line), run by a fresh Python from the repository root:
    dynamo's and inductor's caches and settings are the process's, so these runs get their own."""
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env}, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


WARM_START = """
import gc, json, sys
import torch
from torch._dynamo.utils import counters
from common.serving.engine import Engine
from common.serving.sampling import SamplingParams
engine = Engine.from_pretrained(sys.argv[1], device="cpu", max_batch=1, max_cache_len=256, compile=True)
engine.warm_up(sys.argv[2])
frozen, tracked = gc.get_freeze_count(), len(gc.get_objects())
stream = engine.stream(engine.encode("新华社北京电"), SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
"".join(stream)
engine.close()
print(json.dumps({"tokens": stream.token_ids, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"], "frozen": frozen, "tracked": tracked}))
"""


def test_a_compile_cache_file_spares_another_machine_the_compiling(model_dir, tmp_path):
    """serve.py --compile_cache FILE: the warm-up writes what it compiled to FILE; a process with
    empty torch.compile caches of its own (another machine, here another cache folder) that
    loads FILE finds every compiled graph there (no miss) and decodes the same tokens. Both warm-ups
    end with what compiling left frozen (out of the garbage collector's full passes: a few objects
    still tracked against the many frozen)."""
    cache = tmp_path / "kernels.bin"
    runs = []
    for machine in ("first", "second"):
        runs.append(_python_json(WARM_START, model_dir, cache, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / machine)))
        if machine == "first":
            assert cache.stat().st_size > 0
    first, second = runs
    assert first["misses"] >= 1 and first["hits"] == 0
    assert second["hits"] == first["misses"] and second["misses"] == 0
    assert second["tokens"] == first["tokens"] and len(first["tokens"]) == 8
    for run in runs:
        assert run["frozen"] > 10 * run["tracked"], run


COMPILED_KINDS = """
import json, sys
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
seen = []
def recording(graph, example_inputs):  # each graph dynamo hands over, with the settings of the thread compiling it
    seen.append((torch._dynamo.config.recompile_limit, torch._inductor.config.coordinate_descent_tuning))
    return graph.forward
compile = torch.compile
torch.compile = lambda fn, mode=None, **options: compile(fn, backend=recording, **options)
from common.serving.engine import Engine
from common.serving.loading import prepare_weights
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
graphs = []
for kind in ("none", "int8_rowwise", "fp8_rowwise"):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)).eval()
    engine = Engine(prepare_weights(model, kind), tokenizer, kind, max_batch=4, compile=True)
    before = len(seen)
    engine.warm_up()
    graphs.append(len(seen) - before)
    engine.close()
frames = torch._dynamo.utils.counters["frames"]  # a frame given up on (the limit hit) counts in total only
print(json.dumps({"graphs": graphs, "settings": sorted(set(seen)), "given_up": frames["total"] - frames["ok"]}))
"""


def test_several_weight_kinds_in_one_process_each_compile_with_the_serving_settings(model_dir):
    """Every engine's prefill and decode widths are compiled through one wrapper function of
    dynamo's, so their graphs share one recompile limit; past it dynamo runs the step eagerly
    without an error. Three weight kinds in one process (as the benchmark and the GPU tests run them)
    each compile their shapes (widths 1 and 4 x spans 256 and 512, and the prefill; a later kind
    needs fewer graphs, dims already found dynamic) and none is given up on, and every
    graph is compiled under the serving settings (runtime.apply_serving_settings), which torch 2.12+
    keeps per thread while the batcher's thread compiles. (A recording backend stands in for
    inductor: the graphs dynamo hands over are the subject, not their kernels.)"""
    from common.serving.runtime import RECOMPILE_LIMIT

    run = _python_json(COMPILED_KINDS, model_dir)
    assert min(run["graphs"]) >= 3 and sum(run["graphs"]) > 8 and run["given_up"] == 0, run  # (8: the default limit)
    assert run["settings"] == [[RECOMPILE_LIMIT, True]], run


def test_kernel_options_parse_as_their_help_says():
    """serve.py / chatbot.py: --fuse_projections is auto unless given, "on" as a bare flag (its
    form before auto existed), or one of its choices; --matvec auto and --decode_attention auto
    unless given."""
    import argparse

    from common.serving.cli import _model_arguments

    parser = argparse.ArgumentParser()
    _model_arguments(parser, "model")
    defaults = parser.parse_args([])
    assert (defaults.fuse_projections, defaults.matvec, defaults.decode_attention) == ("auto", "auto", "auto")
    assert parser.parse_args(["--fuse_projections"]).fuse_projections == "on"
    assert parser.parse_args(["--fuse_projections", "off", "--matvec", "inductor"]).fuse_projections == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["--fuse_projections", "yes"])


def test_kernel_choices_are_checked_and_auto_keeps_the_cpu_on_inductor(llama_engine, monkeypatch):
    """--matvec and --fuse_projections: auto leaves a CPU model's linear layers as they are (the
    Triton kernel is CUDA's, merging is measured there); --matvec triton and --decode_attention
    triton on the CPU are refused with the reason; --decode_attention auto keeps SDPA on the CPU,
    and where Triton can run takes the kernel for Llama-family layers only (not GPT-2's); the
    benchmarks' names map to prepare_weights' arguments; '+glu' needs the kernel and merged
    products, and its MLP outside a compiled step
    computes what Phi3MLP does. decode_attention.py's attention function leaves what its kernel
    does not compute (here: anything outside a compiled CUDA step) to SDPA: the same logits."""
    from common.serving.loading import GluMatvecMLP, fuse_wanted, prepare_weights, weights_variant

    model = prepare_weights(copy.deepcopy(llama_engine.model), "none")  # serve.py's defaults: auto, auto, auto
    assert model.config._attn_implementation == llama_engine.model.config._attn_implementation == "sdpa"
    assert sum(type(m) is torch.nn.Linear for m in model.modules()) == 7 * 2 + 1
    assert fuse_wanted(model, "none", "on") and not fuse_wanted(model, "none", "auto")
    with pytest.raises(UserError, match="unknown fuse_projections"):
        fuse_wanted(model, "none", "yes")
    with pytest.raises(UserError, match="--matvec triton: it needs a CUDA GPU"):
        prepare_weights(copy.deepcopy(llama_engine.model), "int8_rowwise", "off", "triton")
    with pytest.raises(UserError, match="unknown matvec"):
        prepare_weights(copy.deepcopy(llama_engine.model), "none", "off", "cublas")
    with pytest.raises(UserError, match="--decode_attention triton: it needs a CUDA GPU"):
        prepare_weights(copy.deepcopy(llama_engine.model), "none", "off", "inductor", "triton")
    with pytest.raises(UserError, match="unknown decode attention"):
        prepare_weights(copy.deepcopy(llama_engine.model), "none", "off", "inductor", "flash")
    from transformers import GPT2Config, GPT2LMHeadModel

    from common.serving import loading

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert not any(loading.attention_wanted(m, "auto") for m in (llama_engine.model, gpt2))  # the CPU
    monkeypatch.setattr(loading, "triton_refusal", lambda model: None)  # as where Triton can run
    assert loading.attention_wanted(llama_engine.model, "auto") and not loading.attention_wanted(gpt2, "auto")
    assert loading.attention_wanted(gpt2, "triton") and not loading.attention_wanted(llama_engine.model, "sdpa")
    monkeypatch.undo()
    assert weights_variant("fp8_rowwise+fused+triton+attn") == ("fp8_rowwise", "on", "triton", "triton", "off")
    assert weights_variant("none+fused+triton+glu") == ("none", "on", "triton", "sdpa", "on")
    assert weights_variant("none") == ("none", "off", "inductor", "sdpa", "off")
    with pytest.raises(UserError, match="glu: it needs the Triton kernel and merged gate/up products"):
        prepare_weights(copy.deepcopy(llama_engine.model), "none", "on", "auto", "sdpa", "on")
    with pytest.raises(UserError, match="unknown glu"):
        prepare_weights(copy.deepcopy(llama_engine.model), "none", "on", "auto", "sdpa", True)
    merged = prepare_weights(copy.deepcopy(llama_engine.model), "none", "on", "inductor")
    assert type(merged.model.layers[0].mlp).__name__ == "Phi3MLP"  # glu auto: not without the kernel
    glu_mlp = GluMatvecMLP(merged.model.layers[0].mlp)  # outside a compiled step: what Phi3MLP computes
    hidden = torch.randn(2, 3, merged.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(glu_mlp(hidden), merged.model.layers[0].mlp(hidden), atol=0, rtol=0)
    decode_attention = pytest.importorskip("common.serving.decode_attention", reason="needs triton")
    model = copy.deepcopy(llama_engine.model)
    model.set_attn_implementation(decode_attention.NAME)
    assert model.config._attn_implementation == decode_attention.NAME
    ids = torch.tensor([llama_engine.encode("今年以来，我国经济平稳发展")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama_engine.model(ids).logits, atol=0, rtol=0)
    with pytest.raises(UserError, match="unknown weights"):
        weights_variant("none+cublas")
