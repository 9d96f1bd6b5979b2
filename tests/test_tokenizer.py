"""The tokenizer rebuilt from the SmolLM2 GGUF against transformers' reading of the same file."""

from __future__ import annotations

import pytest

from edgert.paths import default_model_gguf
from edgert.tokenizer import load_tokenizer

STRINGS = [
    "Hello world", "", " leading space", "trailing space ", "Ünïcödé àéîõü façade naïve",
    "東京は日本の首都です。", "مرحبا بالعالم", "emoji 🚀🔥 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "def f(x):\n\treturn x ** 2  # comment\n", "digits 12345678 and 3.14159",
    "   lots   of\n\n\n spaces \t\t tabs", "<|im_start|>user\nhi<|im_end|>\n", "a\r\nb",
]


@pytest.fixture(scope="module")
def tokenizers_pair(smollm_package):
    import transformers

    g = default_model_gguf()
    ref = transformers.AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    return load_tokenizer(smollm_package), ref


@pytest.mark.parametrize("text", STRINGS)
def test_ids_match_transformers(tokenizers_pair, text):
    ours, ref = tokenizers_pair
    assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye 👋"}],
])
def test_chat_template_matches_transformers(tokenizers_pair, messages):
    ours, ref = tokenizers_pair
    for gen in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == \
            ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_stop_tokens(tokenizers_pair):
    ours, _ = tokenizers_pair
    assert ours.encode("<|im_end|>", add_special_tokens=False)[0] in ours.eos_token_ids


@pytest.mark.parametrize("text", STRINGS)
def test_streaming_detokenizer_never_splits_characters(tokenizers_pair, text):
    ours, _ = tokenizers_pair
    ids = ours.encode(text, add_special_tokens=False)
    detok = ours.detokenizer()
    pieces = []
    for i in ids:
        detok.add_token(i)
        seg = detok.last_segment
        assert "\ufffd" not in seg
        pieces.append(seg)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == ours.decode(ids)
