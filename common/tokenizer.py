"""A BERT-style Chinese tokenizer built from a corpus, or a local tokenizer with the
special tokens the recipes need.

Built tokenizers behave like `bert-base-chinese`: every CJK character is its own token,
other text (Latin words, digits) is split into WordPiece sub-words learnt from the corpus.
Besides BERT's [PAD] [UNK] [CLS] [SEP] [MASK] they carry [BOS] and [EOS], which the
generative recipes need (the original GPT-2 recipe added them to bert-base-chinese).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, BertTokenizer, PreTrainedTokenizerBase

from common.errors import UserError

logger = logging.getLogger(__name__)

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "[BOS]", "[EOS]", "[PAD]"


def build_chinese_tokenizer(
    texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2
) -> PreTrainedTokenizerBase:
    """Learn a WordPiece vocabulary over `texts`; CJK characters stay single tokens.

    Every character seen at least `min_frequency` times gets a token; `vocab_size` bounds
    the total, characters first (WordPiece fills the alphabet before learning merges).
    """
    special = BERT_SPECIAL_TOKENS + [BOS_TOKEN, EOS_TOKEN]
    # The same normaliser and pre-tokeniser as BertTokenizer, so the learnt vocabulary
    # matches how the saved BertTokenizer will split text.
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    vocab = backend.get_vocab()
    if len(vocab) <= len(special):
        raise UserError("cannot build a tokenizer: the corpus is empty")
    tokenizer = BertTokenizer(
        vocab=vocab,
        do_lower_case=True,
        tokenize_chinese_chars=True,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
    )
    logger.info("built a Chinese WordPiece tokenizer with %d tokens", len(tokenizer))
    return tokenizer


def load_tokenizer(path: str | Path, add_special_tokens: bool = True, made_by: str | None = None) -> PreTrainedTokenizerBase:
    """Load a local tokenizer directory; optionally add missing pad / bos / eos tokens.
    `made_by`: the command that writes the directory, named when it is missing.

    After adding tokens, resize the model's embeddings to `len(tokenizer)`.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"tokenizer directory not found: {path} " + (f"(run {made_by} first)" if made_by else
                                                                      "(recipes never download)"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {path}: {err}") from None
    if add_special_tokens:
        add_missing_special_tokens(tokenizer)
    return tokenizer


def reuse_or_build(previous: Path, build: Callable[[], PreTrainedTokenizerBase]) -> PreTrainedTokenizerBase:
    """The tokenizer an earlier run built and saved in `previous`, else `build()`. Building is
    not deterministic (the WordPiece trainer breaks ties differently run to run), so a rerun
    that built anew would find its own token shards made with another vocabulary."""
    if (Path(previous) / "tokenizer.json").is_file():
        logger.info("reusing the tokenizer built by an earlier run: %s", previous)
        return load_tokenizer(previous)
    return build()


def add_missing_special_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Give the tokenizer a pad, bos and eos token where it lacks one; returns how many
    new tokens entered the vocabulary."""
    missing = {}
    if tokenizer.bos_token is None:
        missing["bos_token"] = BOS_TOKEN
    if tokenizer.eos_token is None:
        # A BERT vocabulary has [SEP] as its end marker, but generation needs a token
        # that means only "end of text".
        missing["eos_token"] = EOS_TOKEN
    if tokenizer.pad_token is None:
        missing["pad_token"] = PAD_TOKEN
    if not missing:
        return 0
    added = tokenizer.add_special_tokens(missing)
    logger.info("added special tokens %s (%d new ids)", missing, added)
    return added


# ------------------------------------------------------------------ decoded text
# A WordPiece decode puts a space between every two tokens, so Chinese comes back as
# "中 国 人". A space next to a CJK character or full-width punctuation is such an artefact.
_CJK = r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]"
_SPACE_NEXT_TO_CJK = re.compile(rf"(?<={_CJK})\s+|\s+(?={_CJK})")


def join_chinese(text: str) -> str:
    return _SPACE_NEXT_TO_CJK.sub("", text).strip()


def display_cleaner(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], str]:
    """What to apply to decoded text before showing it: `join_chinese` for WordPiece
    tokenizers; nothing for byte-level BPE or sentencepiece, whose decode is already exact
    (and where "我爱 Python" keeps its spaces)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "WordPiece":
        return join_chinese
    return lambda text: text
