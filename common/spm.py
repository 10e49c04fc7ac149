"""sentencepiece models read and rebuilt as `tokenizers` tokenizers (no sentencepiece needed to
use the result): model_baichuan/convert.py (Baichuan's tokenizer.model) and
model_modify/expand_vocab.py (a Llama-style tokenizer.model with added pieces)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from common.errors import UserError

# sentencepiece ModelProto.SentencePiece.Type and TrainerSpec.ModelType
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED = 1, 2, 3, 4
SP_UNIGRAM, SP_BPE = 1, 2


def read_sp_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:
        raise UserError(f"reading {path} needs the protobuf package ({err}): pip install protobuf") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf's DecodeError
        raise UserError(f"{path}: not a sentencepiece model ({err})") from None
    return proto


def sentencepiece_to_tokenizers(proto, special_pieces: Sequence[str] = ()):
    """A `tokenizers.Tokenizer` that segments text as the sentencepiece model does.

    BPE: sentencepiece repeatedly merges the adjacent pair whose concatenation is the
    highest-scoring piece, so every split of a piece into two pieces becomes a merge, ranked
    by the merged piece's score. Characters outside the vocabulary fall back to <0xXX>
    byte pieces. Whitespace follows the proto: spaces become "▁"; a "▁" opens the text only
    with add_dummy_prefix (Baichuan's model has it off); extra whitespace is collapsed only
    with remove_extra_whitespaces; the precompiled character map (e.g. NFKC) is applied.
    """
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    pieces = list(proto.pieces)
    if trainer.treat_whitespace_as_suffix:
        raise UserError("the sentencepiece model puts whitespace at the end of pieces (treat_whitespace_as_suffix), "
                        "which this converter does not support")
    unk = pieces[trainer.unk_id].piece if 0 <= trainer.unk_id < len(pieces) else None
    if trainer.model_type == SP_BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        mergeable = {p.piece for p in pieces if p.type == SP_NORMAL}
        ranked = []
        for i, p in enumerate(pieces):
            if p.type != SP_NORMAL:
                continue
            text = p.piece
            for cut in range(1, len(text)):
                left, right = text[:cut], text[cut:]
                if left in mergeable and right in mergeable:
                    ranked.append((-p.score, i, vocab[left], left, right))
        ranked.sort()
        model = models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in ranked], unk_token=unk,
                           fuse_unk=True, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == SP_UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id,
                               byte_fallback=trainer.byte_fallback)
    else:
        raise UserError(f"sentencepiece model type {trainer.model_type} is not supported (only BPE and unigram)")
    tokenizer = Tokenizer(model)

    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # Leading spaces collapse to the one the dummy prefix would add anyway (so the
        # pre-tokenizer sees a leading space and does not add a second one).
        steps += [normalizers.Strip(left=False, right=True),
                  normalizers.Replace(Regex("^ +"), " " if spec.add_dummy_prefix else ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    tokenizer.normalizer = normalizers.Sequence(steps) if steps else None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if spec.add_dummy_prefix else "never", split=False)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(decode)

    # Control pieces (<s>, </s>), <unk> and `special_pieces` (chat markers) are special tokens;
    # other user-defined pieces stay atomic as in sentencepiece, and are decoded as text.
    special = [p.piece for p in pieces if p.type in (SP_CONTROL, SP_UNKNOWN) or p.piece in special_pieces]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                          for p in pieces if p.type == SP_USER_DEFINED and p.piece not in special_pieces])
    return tokenizer
