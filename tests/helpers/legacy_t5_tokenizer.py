"""The reference's T5 tokenization, independently: bytedance/USO encodes prompts with the slow,
sentencepiece-based `T5Tokenizer` (legacy behaviour) of the xflux / FLUX.1-dev `spiece.model`.

ComfyUI ships only the fast tokenizer (`tokenizer.json`, `legacy: false`), not `spiece.model`.
The fast file was converted from `spiece.model` and keeps all of it that tokenizing needs: the
Unigram pieces with their scores and the normalizer's precompiled NFKC character map. This module
writes those back into a sentencepiece ModelProto (the T5 settings: ids pad 0, eos 1, unk 2, no
bos; NFKC with the map; dummy prefix; extra whitespace removed) and tokenizes with the
sentencepiece library itself, as the slow tokenizer does: `sp.encode(text)`, then `</s>`,
truncated to the length with `</s>` kept, padded with `<pad>`.
"""
from __future__ import annotations

import base64
import json
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def comfyui_t5_tokenizer_dir(dest: Path) -> Path | None:
    """ComfyUI's comfy/text_encoders/t5_tokenizer, unpacked from the vendored ComfyUI release
    (../shared/vendor/comfyui-*.tar.gz beside the checkout); None where that archive is absent."""
    archives = sorted((REPO.parent / "shared" / "vendor").glob("comfyui-*.tar.gz"))
    if not archives:
        return None
    out = dest / "t5_tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archives[-1]) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and parts[-2:-1] == ("t5_tokenizer",) and "text_encoders" in parts:
                (out / parts[-1]).write_bytes(tar.extractfile(member).read())
    return out


def sentencepiece_model(tokenizer_json: Path) -> bytes:
    """A serialized sentencepiece ModelProto rebuilt from a fast T5 tokenizer.json."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model = data["model"]
    assert model["type"] == "Unigram" and not model.get("byte_fallback")
    charsmap = next(n["precompiled_charsmap"] for n in data["normalizer"]["normalizers"]
                    if n["type"] == "Precompiled")
    proto = spm.ModelProto()
    proto.trainer_spec.model_type = spm.TrainerSpec.UNIGRAM
    proto.trainer_spec.unk_id, proto.trainer_spec.pad_id = 2, 0
    proto.trainer_spec.eos_id, proto.trainer_spec.bos_id = 1, -1
    proto.normalizer_spec.name = "nmt_nfkc"
    proto.normalizer_spec.precompiled_charsmap = base64.b64decode(charsmap)
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    proto.normalizer_spec.escape_whitespaces = True
    for index, (piece, score) in enumerate(model["vocab"]):
        if piece.startswith("<extra_id_"):
            break  # the 100 sentinels are added tokens of the tokenizer, not sentencepiece pieces
        entry = proto.pieces.add()
        entry.piece, entry.score = piece, score
        entry.type = {0: spm.ModelProto.SentencePiece.CONTROL, 1: spm.ModelProto.SentencePiece.CONTROL,
                      2: spm.ModelProto.SentencePiece.UNKNOWN}.get(index, spm.ModelProto.SentencePiece.NORMAL)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString()


class LegacyT5Tokenizer:
    """Token ids as the reference's slow T5Tokenizer(legacy) gives them for a prompt."""

    PAD, EOS = 0, 1

    def __init__(self, tokenizer_json: Path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model(tokenizer_json))

    def ids(self, text: str, length: int = 512) -> list[int]:
        ids = []
        for chunk in self._split_special(text):
            # A special token's own text is its id; every other chunk is encoded on its own, so
            # it gets sentencepiece's dummy prefix "▁" even right after a special token (what
            # "legacy" means for T5).
            ids.extend([self.special[chunk]] if chunk in self.special else self.sp.encode(chunk))
        ids = ids[: length - 1] + [self.EOS]
        return ids + [self.PAD] * (length - len(ids))

    @property
    def special(self) -> dict[str, int]:
        specials = {"<pad>": 0, "</s>": 1, "<unk>": 2}
        specials.update({f"<extra_id_{i}>": self.sp.get_piece_size() + 99 - i for i in range(100)})
        return specials

    def _split_special(self, text: str) -> list[str]:
        """The text split at special tokens' text, as the slow tokenizer's added-token trie does
        (longest match first; the spaces around them are kept in the neighbouring chunks)."""
        import re

        pattern = "(" + "|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)) + ")"
        return [chunk for chunk in re.split(pattern, text) if chunk]
