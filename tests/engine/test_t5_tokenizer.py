"""T5 prompt ids from ComfyUI's tokenizer files equal the reference's.

bytedance/USO tokenizes with the slow, sentencepiece `T5Tokenizer` (legacy). ComfyUI ships only
the fast `tokenizer.json` (`legacy: false`) and no `spiece.model`, so the slow tokenizer cannot be
loaded from what ComfyUI ships; `tests/helpers/legacy_t5_tokenizer.py` rebuilds the sentencepiece
model from the pieces, scores and NFKC map in that tokenizer.json and tokenizes with the
sentencepiece library itself. ComfyUI's files come from the vendored ComfyUI release
(../shared/vendor/comfyui-*.tar.gz), never from an installed ComfyUI.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from legacy_t5_tokenizer import LegacyT5Tokenizer, comfyui_t5_tokenizer_dir
from nodes.engine.text import T5_LENGTH, _token_ids
from nodes.engine.tokenizers import load_tokenizer

CORPUS = [
    "a red fox in a snowy forest",
    "A cat, a dog; and... a bird?! (maybe) [yes] {no} \"quoted\" 'single' — dash – en-dash / slash \\ back",
    "3 cats, 12 dogs, 1,000,000 birds, 3.14159, -42, 1e10, 50% off, $9.99, #1, 2024-05-01 10:30",
    "two  spaces,   three   spaces,\ttab,\nnewline,   trailing   ",
    "   leading spaces",
    "café naïve résumé Zoë Ångström façade jalapeño Straße İstanbul ÆØÅ",
    "e\u0301 combining accent, ﬁ ligature, x² superscript, ｆｕｌｌｗｉｄｔｈ, ½ fraction, ℃, №",
    "emoji 🦊🌲❄️ 👩‍👩‍👧 👍🏽 ✨ and 中文字符 日本語 한국어 Русский текст العربية",
    "",
    " ",
    "UPPER lower MiXeD CamelCase snake_case kebab-case http://example.com/a?b=c&d=e user@mail.org",
    "▁ a sentencepiece space sign, and ~!@#%^&*()_+=`|<>",
    # Special tokens' text in a prompt: the legacy tokenizer prefixes the text after them with ▁.
    "a </s>word then <extra_id_0>. and <pad> end",
    "no space before</s>after and <unk>.",
    "oil painting, 8k, ultra-detailed, (masterpiece:1.2), [[art station]], by Greg Rutkowski",
    # Longer than 512 tokens: truncated to 511 + </s>.
    ("a very long prompt about a watercolor painting of a fox, " * 60).strip(),
]
SPECIAL_CASES = CORPUS[12:14]


@pytest.fixture(scope="module")
def comfy_t5_dir(tmp_path_factory) -> Path:
    folder = comfyui_t5_tokenizer_dir(tmp_path_factory.mktemp("comfy_t5"))
    if folder is None:
        pytest.skip("the vendored ComfyUI release (../shared/vendor/comfyui-*.tar.gz) is not beside this checkout")
    return folder


@pytest.fixture(scope="module")
def reference(comfy_t5_dir) -> LegacyT5Tokenizer:
    return LegacyT5Tokenizer(comfy_t5_dir / "tokenizer.json")


def test_comfyui_ships_no_sentencepiece_model(comfy_t5_dir):
    assert (comfy_t5_dir / "tokenizer.json").is_file() and not (comfy_t5_dir / "spiece.model").exists()


def test_reference_tokenizer_yardstick(reference):
    # Known ids of the T5 v1.1 vocabulary: "▁Hello" 8774, "▁world" 296, "." 5, "</s>" 1.
    assert reference.ids("Hello world.", 6) == [8774, 296, 5, 1, 0, 0]
    assert len(reference.ids(CORPUS[-1])) == T5_LENGTH and reference.ids(CORPUS[-1])[-1] == 1


def test_comfyui_t5_files_give_the_reference_ids(comfy_t5_dir, reference):
    tok = load_tokenizer("t5", [str(comfy_t5_dir)])
    for text in CORPUS:
        assert _token_ids(tok, text, T5_LENGTH)[0].tolist() == reference.ids(text), text


def test_the_file_taken_as_written_is_tokenized_like_the_reference(monkeypatch, comfy_t5_dir, reference):
    """transformers 4.x loads tokenizer.json as it is written (Metaspace prepend_scheme "first",
    `legacy: false`), which drops the ▁ after a special token's text; the loader makes it legacy."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    def as_written(folder, **kwargs):
        return PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"),
                                       eos_token="</s>", pad_token="<pad>", unk_token="<unk>")

    raw = as_written(comfy_t5_dir)
    assert any(_token_ids(raw, t, T5_LENGTH)[0].tolist() != reference.ids(t) for t in SPECIAL_CASES)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", as_written)
    tok = load_tokenizer("t5", [str(comfy_t5_dir)])
    for text in CORPUS:
        assert _token_ids(tok, text, T5_LENGTH)[0].tolist() == reference.ids(text), text
