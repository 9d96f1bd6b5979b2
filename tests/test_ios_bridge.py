"""ios_bridge: the Swift package compiles and its core passes `swift test` here (Linux, no
Core ML), against fixtures written during the run from outside oracles and from edgert's
Python side:

    package/      SmolLM2-135M-Instruct (its first 4 blocks) exported as a Core ML package
    generation/   two chat turns of edgert's Core ML engine (numpy interpreter) over that
                  package: every (position, tokens) it fed, the logits it got (logits.bin),
                  the greedy tokens and text of each turn
    tokenizers/   SmolLM2 (byte-level BPE, the package's own files), llama.cpp's llama-spm
                  vocabulary and Mistral's v3 tokenizer.model (SentencePiece, rebuilt as BPE),
                  and SmolLM2 with transformers' cleanup: ids and decodes from edgert's Python
                  tokenizer / transformers, and llama.cpp's own expected tokenizations
    chat.json     conversations rendered by jinja2 with several templates, and their reductions

Missing Swift is a failure, never a skip. The Swift build folder (ios_bridge/.build) is kept
between runs, so only the first run compiles everything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgert.convert.chat_format import (derive, reduce_chat_template, render_reduced,
                                        sample_conversations)
from edgert.convert.coreml_writer import package_tokenizer_files, write_coreml
from edgert.coreml_manifest import manifest_path, read_manifest, weights_sha256
from edgert.tokenizer import compile_chat_template, load_tokenizer, render_chat_template

from test_tokenizer import STRINGS, write_gguf_tokenizer
from testdata import data_file

SWIFT_ROOT = Path(__file__).resolve().parents[1] / "ios_bridge"
CONTEXT = 192
N_LAYERS = 4
TURNS = ["What is the capital of France?", "And of Italy? Answer in one word."]
MAX_TOKENS = 12
EXTRA_STRINGS = ["Hello . world , don 't I 'm ok ' yes ' ? n't", "tab\tand\u000bvtab\u0085nel",
                 "ίάόέή ί ά", "<s> x </s>", "[INST] hi [/INST]"]

# Templates in the shapes models use (written here), and ones that cannot be reduced.
TEMPLATES = {
    "llama3": "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + "
              "message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
              "'<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- "
              "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}",
    "mistral": "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') "
               "!= (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
               "alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role']"
               " == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif "
               "message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
               "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
               "{% endfor %}",
    # Gemma's shape: a system message goes inside the first user turn (no system role)
    "gemma": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = "
             "messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}"
             "{% set first = '' %}{% set loop_messages = messages %}{% endif %}{% for message in "
             "loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else "
             "message['role'] %}{{ '<start_of_turn>' + role + '\n' + (first if loop.first else "
             "'') + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if "
             "add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
    # conditions on content: not reducible
    "conditional": "{% for m in messages %}{% if '?' in m.content %}[Q]{% endif %}<{{ m.role }}>"
                   "{{ m.content }}</{{ m.role }}>{% endfor %}",
    "last_user_differs": "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m.role }}:"
                         " {{ m.content }}\n{% endfor %}",
    # Llama 3.2's shape: today's date in the system turn
    "dated": "{{ bos_token }}{% set date = strftime_now('%d %b %Y') %}<|system|>Today: {{ date }}"
             "<|end|>{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}",
}
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}
CONVERSATIONS = [
    [{"role": "user", "content": "Bonjour, ça va ?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "x = {'a': 1}\nprint(x)"},
     {"role": "assistant", "content": " It prints {'a': 1}. 🐍 "},
     {"role": "user", "content": "Thanks!\n\n"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
     {"role": "system", "content": "Switch to French."}, {"role": "user", "content": "bye"}],
]


def first_layers(model, n: int):
    from edgert.convert.canonical import CanonicalModel

    def tensors():
        for rec in model.tensors():
            block = re.match(r"model\.layers\.(\d+)\.", rec.name)
            if block is None or int(block[1]) < n:
                yield rec

    return CanonicalModel(dict(model.config, num_hidden_layers=n), tensors, model.tensor_count,
                          model.tokenizer_files, model.source)


# -------------------------------------------------------------------------------------------
# Fixtures
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package(smollm_gguf, tmp_path_factory) -> Path:
    from edgert.convert.gguf_reader import read_gguf

    out = tmp_path_factory.mktemp("bridge") / "SmolLM2.mlpackage"
    write_coreml(first_layers(read_gguf(smollm_gguf), N_LAYERS), out, context=CONTEXT)
    return out


class Recorder:
    """A Core ML runner that keeps every call: (position, input ids, logits)."""

    def __init__(self, runner):
        self.runner, self.name, self.calls = runner, runner.name, []

    def make_state(self):
        return self.runner.make_state()

    def predict(self, function: str, inputs: dict, state) -> np.ndarray:
        logits = self.runner.predict(function, inputs, state)
        self.calls.append((int(inputs["position"][0]), inputs["input_ids"][0].tolist(),
                           np.asarray(logits, np.float32).reshape(-1)))
        return logits


def chat_turns(pkg: Path, stops: set[int]) -> tuple[list[dict], list]:
    """Two greedy turns of edgert's ChatSession over the package (interpreter)."""
    from edgert.chat import ChatSession
    from edgert.coreml_engine import load_coreml

    model, tok = load_coreml(pkg, backend="interpreter")
    tok.eos_token_ids |= stops
    model.runner = Recorder(model.runner)
    session = ChatSession(model, tok)
    turns = []
    for user in TURNS:
        responses = list(session.reply(user, MAX_TOKENS, {}))
        tokens = [r.token for r in responses[:-1]]
        turns.append({"user": user, "tokens": tokens, "text": "".join(r.text for r in responses),
                      "finish_reason": responses[-1].finish_reason})
    return turns, model.runner.calls


@pytest.fixture(scope="module")
def generation(package, tmp_path_factory) -> Path:
    """Record the turns; a token of the second reply that the first lacks is made a stop
    token, so that the second turn ends on a stop token and the first by its length."""
    dry, _ = chat_turns(package, set())
    stop = next((t for t in dry[1]["tokens"][1:] if t not in dry[0]["tokens"]), None)
    assert stop is not None, dry
    turns, calls = chat_turns(package, {stop})
    assert turns[0]["finish_reason"] == "length" and turns[1]["finish_reason"] == "stop", turns
    folder = tmp_path_factory.mktemp("generation")
    steps = []
    with open(folder / "logits.bin", "wb") as f:
        for i, (position, ids, logits) in enumerate(calls):
            steps.append({"position": position, "tokens": ids, "logits": i})
            f.write(logits.astype("<f4").tobytes())
    manifest = read_manifest(package)
    (folder / "replay.json").write_text(json.dumps({
        "vocab_size": manifest["vocab_size"], "context_length": manifest["context_length"],
        "max_tokens": MAX_TOKENS, "stop_token_ids": sorted(set(manifest["stop_token_ids"]) |
                                                            {stop}),
        "turns": [{k: t[k] for k in ("user", "tokens", "text", "finish_reason")} for t in turns],
        "calls": steps}, ensure_ascii=False))
    return folder


def tokenizer_cases(tok, folder: Path, vocab: int, seed: int) -> None:
    strings = []
    for text in STRINGS + EXTRA_STRINGS:
        plain = tok.encode(text, add_special_tokens=False)
        strings.append({"text": text, "ids": tok.encode(text), "ids_plain": plain,
                        "decoded": tok.decode(plain),
                        "decoded_skip": tok.decode(plain, skip_special_tokens=True)})
    rng = np.random.default_rng(seed)
    random = []
    for n in rng.integers(1, 40, 24):
        ids = rng.integers(0, vocab, n).tolist()
        if len(random) % 3 == 0:  # byte tokens and specials, where byte fallback lives
            ids = rng.integers(0, min(vocab, 300), n).tolist()
        random.append({"ids": ids, "decoded": tok.decode(ids),
                       "decoded_skip": tok.decode(ids, skip_special_tokens=True)})
    (folder / "cases.json").write_text(json.dumps({"strings": strings, "random": random},
                                                  ensure_ascii=False))


@pytest.fixture(scope="module")
def tokenizers(package, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tokenizers")
    # SmolLM2: the package's own files, read as edgert's Core ML engine reads them
    from edgert.coreml_engine import load_tokenizer_from_package

    smollm = Path(shutil.copytree(manifest_path(package).parent / "tokenizer", root / "smollm"))
    tok = load_tokenizer_from_package(package, read_manifest(package))
    tokenizer_cases(tok, smollm, tok.vocab_size, 1)

    spm = write_gguf_tokenizer(data_file("vocab/ggml-vocab-llama-spm.gguf"), root / "llama-spm")
    tok = load_tokenizer(spm)
    tokenizer_cases(tok, spm, tok.vocab_size, 2)
    gguf_path = data_file("vocab/ggml-vocab-llama-spm.gguf")
    with open(gguf_path.with_name(gguf_path.name + ".inp"), encoding="utf-8", newline="") as f:
        inputs = f.read().split("\n__ggml_vocab_test__\n")[:-1]
    outputs = gguf_path.with_name(gguf_path.name + ".out").read_text().split("\n")[:-1]
    (spm / "llama_cpp.json").write_text(json.dumps(
        [{"text": t, "ids": [int(x) for x in o.split()]} for t, o in zip(inputs, outputs)],
        ensure_ascii=False))

    # Mistral v3: a tokenizer.model as a package holds it (tokenizer.json rebuilt at export)
    mistral = root / "mistral-v3"
    mistral.mkdir()
    files = package_tokenizer_files(
        {"tokenizer.model": data_file("spm/mistral_instruct_tokenizer_240323.model.v3").read_bytes()})
    for name, data in files.items():
        (mistral / name).write_bytes(data)
    tok = load_tokenizer(mistral)
    tokenizer_cases(tok, mistral, tok.vocab_size, 3)

    # transformers' cleanup (" ." -> "."), forced for BPE as transformers 5 requires
    from transformers import PreTrainedTokenizerFast

    cleanup = root / "smollm-cleanup"
    cleanup.mkdir()
    shutil.copy(smollm / "tokenizer.json", cleanup / "tokenizer.json")
    flags = {"clean_up_tokenization_spaces": True,
             "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True}
    (cleanup / "tokenizer_config.json").write_text(json.dumps(flags))
    ref = PreTrainedTokenizerFast(tokenizer_file=str(cleanup / "tokenizer.json"), **flags)
    cases = []
    for text in EXTRA_STRINGS[:1] + ["a . b .. c , , d !", "I 'm sure it 's fine , isn 't it ?",
                                     "x ' y ' z", "end ."]:
        ids = ref(text, add_special_tokens=False).input_ids
        cases.append({"text": text, "ids": ids, "decoded": ref.decode(ids)})
    assert cases[-1]["decoded"] == "end.", cases[-1]  # the cleanup does bite
    (cleanup / "cases.json").write_text(json.dumps({"cleanup": cases}, ensure_ascii=False))
    return root


@pytest.fixture(scope="module")
def chat(package, tmp_path_factory) -> Path:
    """Each template's reduction and jinja2's rendering of CONVERSATIONS (null where the
    template refuses one)."""
    manifest = read_manifest(package)
    templates = {"package": (manifest["chat_template"], {"bos_token": "<|im_start|>",
                                                         "eos_token": "<|im_end|>"})}
    templates.update({k: (v, SPECIALS) for k, v in TEMPLATES.items()})
    out = []
    for name, (template, specials) in templates.items():
        fmt = manifest["chat_format"] if name == "package" else reduce_chat_template(template,
                                                                                     specials)
        compiled = compile_chat_template(template)
        rendered = []
        for messages in CONVERSATIONS:
            for gen in (True, False):
                try:
                    text = render_chat_template(compiled, messages, gen, specials)
                except Exception:
                    text = None
                rendered.append({"messages": messages, "add_generation_prompt": gen,
                                 "rendered": text})
        out.append({"name": name, "chat_format": fmt, "conversations": rendered})
    path = tmp_path_factory.mktemp("chat") / "chat.json"
    path.write_text(json.dumps(out, ensure_ascii=False))
    return path


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    """Embedding tables written by the Core ML exporter's file writer (quantized 3 / 4 / 6
    bits with fp16 or fp32 scales, and float), and the rows edgert's Python lookup reads
    from them (float32, and as the fp16 the program takes)."""
    import mlx.core as mx

    from edgert.convert.canonical import FLOAT, TensorRecord
    from edgert.convert.coreml_writer import PackageFiles
    from edgert.mapped_rows import MappedRows
    from edgert.quant import QuantTensor

    folder = tmp_path_factory.mktemp("rows")
    R, C = 37, 192
    w = mx.random.normal((R, C), key=mx.random.key(7)) * 0.05
    cases = []
    for name, bits, group, scale_dtype in [("q4", 4, 32, np.float16), ("q3", 3, 64, np.float16),
                                           ("q6f32", 6, 64, np.float32), ("f16", 0, 0, None)]:
        tensor = "model.embed_tokens_per_layer"
        if bits:
            w_q, s, b = mx.quantize(w, group, bits)
            value = QuantTensor(np.array(w_q), np.array(s).astype(scale_dtype),
                                np.array(b).astype(scale_dtype), bits, group)
        else:
            value = np.array(w)
        files = PackageFiles(folder, {tensor: f"{name}.safetensors"})
        files.add(f"{tensor}.weight", TensorRecord(f"{tensor}.weight", value, "t", "t", FLOAT))
        layout = files.close()[tensor]
        table = MappedRows.open(folder / layout["path"], tensor, (R, C), layout["quantization"])
        tokens = [0, 7, R - 1, 3, 7]
        got = np.array(table(mx.array([tokens]), mx.float32))[0]  # (L, C)
        (folder / f"{name}.f32").write_bytes(got.astype("<f4").tobytes())
        (folder / f"{name}.f16").write_bytes(got.astype("<f2").tobytes())
        cases.append({"file": layout["path"], "tensor": tensor, "rows": R, "columns": C,
                      "quantization": layout["quantization"], "tokens": tokens,
                      "floats": f"{name}.f32", "halves": f"{name}.f16"})
    (folder / "cases.json").write_text(json.dumps(cases))
    return folder


# -------------------------------------------------------------------------------------------
# Python side of the contract
# -------------------------------------------------------------------------------------------


def test_manifest_v2(package):
    m = read_manifest(package)
    assert m["format_version"] == 2
    assert m["weights_sha256"] == weights_sha256(package)
    assert all(s["kind"] == "kv_cache" for f in m["functions"].values() for s in f["states"])
    assert m["chat_format"]["type"] == "role_affixes"
    assert "tokenizer/tokenizer.json" in m["tokenizer_files"]


@pytest.mark.parametrize("name", ["llama3", "mistral", "gemma"])
def test_chat_format_reduces_and_renders_as_jinja(name):
    template = TEMPLATES[name]
    fmt = reduce_chat_template(template, SPECIALS)
    assert fmt["type"] == "role_affixes", fmt
    compiled = compile_chat_template(template)
    for messages, gen in sample_conversations(fmt):
        if messages[0]["role"] != "assistant":
            assert render_reduced(fmt, messages, gen) == render_chat_template(
                compiled, messages, gen, SPECIALS)
    roles = {r["role"] for r in fmt["roles"]}
    assert ("system" in roles) == (name == "llama3")  # mistral refuses it, gemma moves it
    assert fmt["trim_content"] == (name in ("llama3", "gemma"))


@pytest.mark.parametrize("name", ["conditional", "last_user_differs", "dated"])
def test_chat_format_refuses_what_it_cannot_reduce(name):
    fmt = reduce_chat_template(TEMPLATES[name], SPECIALS)
    assert fmt["type"] == "unsupported" and fmt["reason"], fmt
    assert reduce_chat_template(None, {})["type"] == "unsupported"
    assert reduce_chat_template("{% for %}", {})["type"] == "unsupported"


def test_derive_cuts_at_the_marks():
    fmt = derive(lambda msgs, gen: "".join(f"<{m['role']}>{m['content']}</{m['role']}>"
                                           for m in msgs) + ("<assistant>" if gen else ""))
    assert fmt["generation_prompt"] == "<assistant>" and fmt["begin"] == ""
    assert {r["role"]: r["prefix"] for r in fmt["roles"]} == {
        "user": "<user>", "assistant": "<assistant>", "system": "<system>"}


def test_sentencepiece_package_files_keep_bos():
    files = package_tokenizer_files(
        {"tokenizer.model": data_file("spm/tokenizer.model.v1").read_bytes()})
    config = json.loads(files["tokenizer_config.json"])
    assert config["add_bos_token"] is True and config["bos_token"] == "<s>"
    assert json.loads(files["tokenizer.json"])["model"]["byte_fallback"] is True


# -------------------------------------------------------------------------------------------
# swift test
# -------------------------------------------------------------------------------------------


def test_swift_test_passes(package, generation, tokenizers, chat, rows):
    swift = shutil.which("swift")
    if swift is None:
        pytest.fail("swift is not on PATH: the iOS bridge's tests need the Swift toolchain")
    env = dict(os.environ, EDGERT_TEST_PACKAGE=str(package), EDGERT_TEST_GENERATION=str(generation),
               EDGERT_TEST_TOKENIZERS=str(tokenizers), EDGERT_TEST_CHAT=str(chat),
               EDGERT_TEST_ROWS=str(rows))
    run = subprocess.run([swift, "test", "--package-path", str(SWIFT_ROOT)], env=env,
                         capture_output=True, text=True, timeout=3600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    # "Executed 24 tests, with 0 failures" or "..., with 2 tests skipped and 0 failures"
    summary = re.findall(r"Executed (\d+) tests?, with (?:(\d+) tests? skipped and )?(\d+) "
                         r"failures?", out)
    assert summary, out[-3000:]
    executed, skipped, failures = (int(x or 0) for x in summary[-1])
    assert executed >= 10 and skipped == 0 and failures == 0, out[-3000:]


def test_core_ml_target_typechecks_against_the_api_it_uses():
    """The Core ML target and its Mac-only test cannot be built here (no CoreML); they are
    compiled against stubs of the Core ML / CryptoKit signatures they call (tests/swift_stubs,
    bodies empty), in Swift 6 mode, which catches type and concurrency errors. Whether Apple's SDK agrees is for a Mac
    (docs/coreml-on-a-mac.md); tree-sitter also parses the sources (tests/test_coreml.py)."""
    swift = shutil.which("swift")
    if swift is None:
        pytest.fail("swift is not on PATH: the iOS bridge's tests need the Swift toolchain")
    root = SWIFT_ROOT / ".build" / "stubcheck"  # kept between runs, like the package's build
    stubs = Path(__file__).parent / "swift_stubs"
    for part in ("Sources/EdgertCore", "Sources/EdgertBridge", "Tests/EdgertBridgeTests"):
        shutil.rmtree(root / part, ignore_errors=True)
        shutil.copytree(SWIFT_ROOT / part, root / part)
    for name in ("CoreML", "CryptoKit"):
        (root / "Sources" / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(stubs / f"{name}.swift", root / "Sources" / name / f"{name}.swift")
    (root / "Package.swift").write_text(
        '// swift-tools-version:6.0\nimport PackageDescription\nlet package = Package(\n'
        '    name: "StubCheck", targets: [.target(name: "CoreML"), .target(name: "CryptoKit"),\n'
        '    .target(name: "EdgertCore"), .target(name: "EdgertBridge",\n'
        '    dependencies: ["EdgertCore", "CoreML", "CryptoKit"]),\n'
        '    .testTarget(name: "EdgertBridgeTests", dependencies: ["EdgertBridge", "CoreML"])],\n'
        '    swiftLanguageModes: [.v6])\n')
    run = subprocess.run([swift, "build", "--build-tests", "--package-path", str(root)],
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "warning:" not in run.stdout + run.stderr, (run.stdout + run.stderr)[-4000:]
    # the Core ML sources were compiled, not left out by #if canImport(CoreML)
    for source in ("CoreMLLanguageModel", "CoreMLPackageTests"):
        assert list((root / ".build").rglob(f"{source}.swift.o")), f"{source} not compiled"
