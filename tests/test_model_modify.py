"""model_modify/prune_vocab.py: merge closure, identical tokenisation, exact logits, reload."""

import json

import pytest
import torch

from conftest import load_recipe_module, run_script


@pytest.fixture(scope="module")
def prune():
    return load_recipe_module("model_modify", "prune_vocab")


def byte_bpe(texts, vocab_size: int):
    """A byte-level BPE trained here, standing in for BLOOM's / GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def bpe_model(request, tmp_path_factory):
    """A tiny model (GPT-2: tied head; Llama: untied) whose tokenizer learned Chinese news and
    English text, to be pruned to what Chinese reviews use."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from common.corpora import load_peoples_daily

    english = [f"the {w} of {v} is {n} and it was {w}ing" for w in ("run", "read", "walk", "talk")
               for v in ("city", "river", "garden") for n in range(40)]
    tokenizer = byte_bpe(load_peoples_daily()[:3000] + english * 3, vocab_size=3000)
    torch.manual_seed(0)
    if request.param == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                           bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=256, tie_word_embeddings=False,
                                             eos_token_id=tokenizer.eos_token_id))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_merge_closure_adds_every_part_recursively(prune):
    merges = [["a", "b"], ["ab", "c"], ["x", "y"], ["a", "bc"], ["b", "c"]]
    assert prune.merge_closure({"abc"}, merges) == {"abc", "ab", "a", "b", "c", "bc"}
    assert prune.merge_closure({"xy", "q"}, merges) == {"xy", "x", "y", "q"}


def test_pruned_model_tokenises_and_predicts_like_the_original(prune, bpe_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.corpora import load_reviews

    corpus = tmp_path / "reviews.txt"
    corpus.write_text("\n".join(text for text, _ in load_reviews()[:3000]), encoding="utf-8")
    out = tmp_path / "pruned"
    run_script("model_modify/prune_vocab.py", "--model", bpe_model, "--corpus", corpus, "--output_dir", out,
               "--held_out_ratio", "0.1", "--verify_texts", "40")
    report = json.loads((out / "prune_report.json").read_text())
    before, after = report["vocabulary"]["before"], report["vocabulary"]["after"]
    assert 256 < after < before and report["parameters"]["after"] < report["parameters"]["before"]
    assert report["file_bytes"]["after"] < report["file_bytes"]["before"]

    old_tok = AutoTokenizer.from_pretrained(bpe_model)
    new_tok = AutoTokenizer.from_pretrained(out)
    new_spec = json.loads(new_tok.backend_tokenizer.to_str())["model"]
    kept = new_spec["vocab"].keys()
    # a consistent tokenizer: every merge's parts and result are in the vocabulary; every kept
    # multi-byte token can still be built by some merge; ids are 0..n-1; specials mapped
    assert sorted(new_spec["vocab"].values()) == list(range(after))
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in new_spec["merges"]]
    assert all(a in kept and b in kept and a + b in kept for a, b in merges)
    from tokenizers import pre_tokenizers

    built = {a + b for a, b in merges} | set(pre_tokenizers.ByteLevel.alphabet()) | {"<|endoftext|>"}
    assert set(kept) <= built
    assert new_tok.convert_ids_to_tokens(new_tok.eos_token_id) == "<|endoftext|>"

    # held-out reviews: the same token strings, and (the script's own check) the same logits
    held = report["held_out"]
    assert held["same_tokens_where_all_seen"] == held["all_tokens_seen_in_counting"] > 0
    assert held["same_tokens"] >= 0.9 * held["texts"]
    assert held["max_logit_diff"] is not None and held["max_logit_diff"] < 1e-5
    text = "这家酒店的服务很好，房间也干净。"
    assert new_tok.tokenize(text) == old_tok.tokenize(text)
    # English, never in the counting corpus: still encodable (byte tokens kept), round trip intact
    english = "the river is quiet"
    assert new_tok.decode(new_tok.encode(english, add_special_tokens=False)) == english

    # independently: the reloaded pruned model's logits == the original's restricted to the kept tokens
    original = AutoModelForCausalLM.from_pretrained(bpe_model).eval()
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    keep = [old_tok.convert_tokens_to_ids(t) for t in new_tok.convert_ids_to_tokens(list(range(after)))]
    with torch.no_grad():
        a = original(input_ids=torch.tensor([old_tok.encode(text, add_special_tokens=False)])).logits[0][:, keep]
        b = pruned(input_ids=torch.tensor([new_tok.encode(text, add_special_tokens=False)])).logits[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert pruned.config.vocab_size == after and pruned.config.eos_token_id == new_tok.eos_token_id


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A tiny Llama with a Llama-style sentencepiece tokenizer (BPE, byte fallback) trained here
    mostly on English, so Chinese text falls apart into single characters and bytes."""
    import io

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from common.corpora import load_peoples_daily
    from common.spm import sentencepiece_to_tokenizers

    english = [f"the {w} of the {v} was {n} and then it {w}ed again" for w in ("walk", "talk", "jump", "look")
               for v in ("city", "river", "garden", "station") for n in range(30)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(english + load_peoples_daily()[:15]), model_writer=buffer,
                                   vocab_size=1200, model_type="bpe", byte_fallback=True, character_coverage=0.98,
                                   minloglevel=2, num_threads=1)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    path = tmp_path_factory.mktemp("spm_llama")
    (path / "tokenizer.model").write_bytes(buffer.getvalue())
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=sentencepiece_to_tokenizers(proto), bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(proto.pieces), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=512, tie_word_embeddings=False)).save_pretrained(path)
    return path


def test_expansion_shortens_chinese_and_leaves_the_old_vocabulary_alone(spm_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.corpora import load_reviews

    corpus = tmp_path / "reviews.txt"
    corpus.write_text("\n".join(text for text, _ in load_reviews()[:3000]) + "\n" + "\n".join(
        f"the {w} of the {v}" for w in ("walk", "talk", "look") for v in ("river", "city", "garden")
        for _ in range(10)), encoding="utf-8")  # words the base vocabulary has whole: split as before
    out = tmp_path / "expanded"
    run_script("model_modify/expand_vocab.py", "--model", spm_model, "--corpus", corpus, "--output_dir", out,
               "--sp_vocab_size", "3000", "--character_coverage", "0.98", "--held_out_ratio", "0.1")
    report = json.loads((out / "expand_report.json").read_text())
    before, after = report["vocabulary"]["before"], report["vocabulary"]["after"]
    assert after > before and report["vocabulary"]["added"] == after - before
    per_char = report["tokens_per_chinese_char"]
    assert per_char["after"] < 0.8 * per_char["before"]  # multi-character pieces now
    assert report["unchanged"]["compared"] > 0 and report["unchanged"]["max_logit_diff_old_vocabulary"] < 1e-5

    # reloads; the old pieces keep their ids; a new piece is one token and starts at its spelling's mean
    old_tok, new_tok = AutoTokenizer.from_pretrained(spm_model), AutoTokenizer.from_pretrained(out)
    assert len(new_tok) == after and new_tok.convert_ids_to_tokens(list(range(before))) == \
        old_tok.convert_ids_to_tokens(list(range(before)))
    piece = next(p for p in new_tok.convert_ids_to_tokens(list(range(before, after)))
                 if p.startswith("▁") and len(p) >= 3)
    assert new_tok.tokenize(piece[1:]) == [piece] and len(old_tok.tokenize(piece[1:])) > 1
    original = AutoModelForCausalLM.from_pretrained(spm_model)
    expanded = AutoModelForCausalLM.from_pretrained(out)
    assert expanded.get_input_embeddings().num_embeddings == after
    new_id = new_tok.convert_tokens_to_ids(piece)
    spelling = old_tok(piece.replace("▁", " "), add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(expanded.get_input_embeddings().weight[new_id],
                               original.get_input_embeddings().weight[spelling].mean(0))
    torch.testing.assert_close(expanded.lm_head.weight[:before], original.lm_head.weight)


def test_expansion_of_a_fast_tokenizer_adds_tokens(bpe_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.corpora import load_reviews

    corpus = tmp_path / "reviews.txt"
    corpus.write_text("\n".join(text for text, _ in load_reviews()[:3000]), encoding="utf-8")
    out = tmp_path / "expanded"
    run_script("model_modify/expand_vocab.py", "--model", bpe_model, "--corpus", corpus, "--output_dir", out,
               "--sp_vocab_size", "3000", "--character_coverage", "0.98", "--held_out_ratio", "0.1")
    report = json.loads((out / "expand_report.json").read_text())
    assert report["vocabulary"]["how"] == "added tokens" and report["vocabulary"]["added"] > 0
    assert report["tokens_per_chinese_char"]["after"] < report["tokens_per_chinese_char"]["before"]
    new_tok, old_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(bpe_model)
    word = report["vocabulary"]["examples"][0]
    assert new_tok.tokenize(word) == [word] and len(old_tok.tokenize(word)) > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().num_embeddings == report["vocabulary"]["after"] == len(new_tok)
    # the old vocabulary's rows are untouched (same logits on old tokens); a new token starts at its spelling's mean
    assert report["unchanged"]["compared"] > 0 and report["unchanged"]["max_logit_diff_old_vocabulary"] < 1e-5
    original, before = AutoModelForCausalLM.from_pretrained(bpe_model), report["vocabulary"]["before"]
    old_rows = original.get_input_embeddings().weight
    torch.testing.assert_close(model.get_input_embeddings().weight[:before], old_rows)
    spelling = old_tok(word, add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(model.get_input_embeddings().weight[new_tok.convert_tokens_to_ids(word)],
                               old_rows[spelling].mean(0))
