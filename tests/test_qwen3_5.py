"""Qwen3.5 (Gated DeltaNet + gated attention) against transformers, mlx-lm and itself:
random-initialised HF models from small configs, converted with edgert's converter."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from edgert.convert.api import convert_file
from edgert.errors import EdgertError
from edgert.models import gated_delta as gd
from edgert.models.cache import KVCache, RecurrentCache, make_cache
from edgert.package import load_model

VOCAB = 272  # the byte-level test tokenizer's 256 bytes + specials, padded
TEXT = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=VOCAB, linear_conv_kernel_dim=4, linear_key_head_dim=16,
            linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True})
L, F = "linear_attention", "full_attention"
VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
              patch_size=4, num_position_embeddings=16)

# name -> (wrapper, text config); layer 0 is linear everywhere (masks must not come from it)
CONFIGS = {
    "text-irregular-untied": ("text", dict(TEXT, num_hidden_layers=5,
                                           layer_types=[L, F, L, L, F], tie_word_embeddings=False)),
    # YaRN on the rotated quarter of each head (attention factor and frequency ramp)
    "text-tied-yarn": ("text", dict(TEXT, num_hidden_layers=3, layer_types=[L, L, F],
                                    tie_word_embeddings=True, rope_parameters={
                                        "rope_type": "yarn", "rope_theta": 10000.0,
                                        "partial_rotary_factor": 0.25, "factor": 8.0,
                                        "original_max_position_embeddings": 16})),
    "vl-interval4": ("vl", dict(TEXT, num_hidden_layers=4, layer_types=[L, L, L, F],
                                tie_word_embeddings=False)),
    "vl-tied": ("vl", dict(TEXT, num_hidden_layers=3, layer_types=[L, F, L],
                           tie_word_embeddings=True)),
}


def hf_qwen3_5(name: str, folder: Path, **changes):
    """A random transformers Qwen3.5 model (text-only or the VL wrapper), saved to `folder`;
    `changes` go into its text config."""
    wrapper, text = CONFIGS[name]
    text = dict(text, **changes)
    torch.manual_seed(0)
    if wrapper == "text":
        model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**text))
    else:
        cfg = transformers.Qwen3_5Config(text_config=text, vision_config=VISION,
                                         tie_word_embeddings=text["tie_word_embeddings"])
        model = transformers.Qwen3_5ForConditionalGeneration(cfg)
    model = model.to(torch.float32)
    with torch.no_grad():  # random norm weights and gates, so that they are exercised
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(("dt_bias", "A_log")):
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(folder)
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


_CONVERTED: dict[tuple, tuple] = {}


def convert_once(name: str, tmp_path_factory, bits: int | None = 0) -> tuple:
    """(name, transformers model, package, its edgert model), made once per session; bits 0
    float, None the converter's default (4-bit g64)."""
    if (name, bits) not in _CONVERTED:
        hf_folder = tmp_path_factory.mktemp(name) / "hf"
        hf = _CONVERTED[name, 0][1] if (name, 0) in _CONVERTED else hf_qwen3_5(name, hf_folder)
        if not hf_folder.is_dir():
            hf.save_pretrained(hf_folder)
        package = convert_file(hf_folder, hf_folder.parent / f"pkg{bits}", bits=bits,
                               progress=False)
        _CONVERTED[name, bits] = (name, hf, package, load_model(package)[0])
    return _CONVERTED[name, bits]


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request, tmp_path_factory):
    return convert_once(request.param, tmp_path_factory)


IDS = np.random.default_rng(0).integers(0, VOCAB, size=(1, 80))


def test_logits_match_transformers(converted):
    _, hf, _, model = converted
    ref = hf_logits(hf, IDS)
    out = np.array(model(mx.array(IDS)))
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_cache_kinds_follow_layer_types(converted):
    name, _, _, model = converted
    kinds = [type(c) for c in make_cache(model)]
    want = [RecurrentCache if t == L else KVCache for t in CONFIGS[name][1]["layer_types"]]
    assert kinds == want


def test_cached_decode_matches_uncached(converted):
    _, _, _, model = converted
    ids = IDS[:, :40]
    full = np.array(model(mx.array(ids)))[0]  # (40, V)
    cache = make_cache(model)
    model(mx.array(ids[:, :8]), cache=cache)  # prefill 8, then 32 single-token steps
    for t in range(8, 40):
        step = np.array(model(mx.array(ids[:, t : t + 1]), cache=cache))[0, 0]
        assert rel_err(step, full[t]) < 1e-4, f"position {t}"
    conv, delta = cache[0][0], cache[0][1]
    assert conv.shape == (1, 3, 2 * 2 * 16 + 4 * 8) and delta.shape == (1, 4, 8, 16)
    assert delta.dtype == mx.float32


def test_quantized_default_4bit(converted, tmp_path_factory):
    """The default conversion (4-bit g64): conv1d, A_log, dt_bias and norms stay float; logits
    near the float model's, top-1 mostly the same."""
    name, hf, _, model = converted
    _, _, package, q4 = convert_once(name, tmp_path_factory, bits=None)
    config = json.loads((package / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    from safetensors import safe_open

    with safe_open(str(next(package.glob("model*.safetensors"))), "np") as f:
        names = set(f.keys())
    assert not any(n.endswith(("conv1d.scales", "A_log.scales", "dt_bias.scales", "norm.scales"))
                   for n in names)
    assert any(n.endswith("in_proj_qkv.scales") for n in names)
    ref = np.array(model(mx.array(IDS)))
    out = np.array(q4(mx.array(IDS)))
    assert rel_err(out, ref) < 0.2  # 4-bit of random weights
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.6


# mlx-lm places full attention every full_attention_interval layers and ignores layer_types:
# only configs whose layers follow such a pattern are comparable (the package then carries
# the interval: qwen3_5.hf_config).
MLX_LM_COMPARABLE = ["vl-interval4", "text-tied-yarn"]


@pytest.mark.parametrize("bits", [0, None], ids=["float", "4-bit"])
@pytest.mark.parametrize("name", MLX_LM_COMPARABLE)
def test_mlx_lm_loads_the_package(name, bits, tmp_path_factory):
    """mlx-lm (its own qwen3_5 model and sanitize) reads edgert's package: same logits."""
    _, _, package, model = convert_once(name, tmp_path_factory, bits)
    from mlx_lm.utils import load_model as mlx_lm_load

    theirs, _ = mlx_lm_load(Path(package))
    theirs.set_dtype(mx.float32)  # mlx-lm computes in the scales' dtype (float16); ours float32
    ref = np.array(theirs(mx.array(IDS)))
    out = np.array(model(mx.array(IDS)))
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_vl_wrapper_leaves_the_vision_tower_out(tmp_path):
    """`edgert convert` of the VL checkpoint: the text model only, said once; the package's
    config is the flat text config (model_type qwen3_5, what mlx-lm and `edgert info` read)."""
    import subprocess
    import sys

    from safetensors import safe_open

    hf_qwen3_5("vl-tied", tmp_path / "hf")
    r = subprocess.run([sys.executable, "-m", "edgert", "convert", str(tmp_path / "hf"), "-o",
                        str(tmp_path / "pkg")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    notes = [line for line in (r.stdout + r.stderr).splitlines() if "left out" in line]
    assert len(notes) == 1 and "model.visual" in notes[0]
    with safe_open(str(tmp_path / "pkg" / "model.safetensors"), "np") as f:
        names = list(f.keys())
    assert names and not any("visual" in n for n in names)
    config = json.loads((tmp_path / "pkg" / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and "text_config" not in config
    assert config["hidden_size"] == TEXT["hidden_size"] and config["tie_word_embeddings"]


# ------------------------------------------------------------------ the recurrence's forms


def _random_inputs(T: int, Hk: int = 2, Hv: int = 4, Dk: int = 32, Dv: int = 16, seed: int = 0):
    keys = mx.random.split(mx.random.key(seed), 6)
    q = gd.l2_normalize(mx.random.normal((1, T, Hk, Dk), key=keys[0])) * Dk**-0.5
    k = gd.l2_normalize(mx.random.normal((1, T, Hk, Dk), key=keys[1]))
    v = mx.random.normal((1, T, Hv, Dv), key=keys[2])
    g, beta = gd.decay_and_rate(mx.random.normal((1, T, Hv), key=keys[3]),
                                mx.random.normal((1, T, Hv), key=keys[4]),
                                mx.log(mx.random.uniform(0.5, 16, (Hv,), key=keys[5])),
                                mx.ones((Hv,)))
    state = mx.random.normal((1, Hv, Dv, Dk), key=keys[0]) * 0.1
    return q, k, v, g, beta, state


@pytest.mark.parametrize("T,chunk", [(1, 64), (5, 4), (77, 16), (130, 64)])
def test_chunked_equals_sequential(T, chunk):
    q, k, v, g, beta, state = _random_inputs(T)
    ref, ref_state = gd.recurrent(q, k, v, g, beta, state)
    out, out_state = gd.chunked(q, k, v, g, beta, state, chunk=chunk)
    assert float(mx.abs(out - ref).max()) < 1e-5
    assert float(mx.abs(out_state - ref_state).max()) < 1e-5


def test_fused_kernel_equals_sequential():
    """mx.fast.gated_delta_update where this device runs it (it does on MLX 0.32's CPU)."""
    if not gd.fused_available():
        pytest.skip("mx.fast.gated_delta_update does not run on this device")
    q, k, v, g, beta, state = _random_inputs(50)
    ref, ref_state = gd.recurrent(q, k, v, g, beta, state)
    out, out_state = gd.gated_delta(q, k, v, g, beta, state, use_fused=True)
    assert float(mx.abs(out - ref).max()) < 1e-5
    assert float(mx.abs(out_state - ref_state).max()) < 1e-5


def test_model_prefill_chunked_equals_sequential(converted, monkeypatch):
    """The whole model with the fused kernel off: a long prefill (chunked) equals feeding the
    same tokens one at a time (the recurrence itself)."""
    _, _, _, model = converted
    monkeypatch.setattr(gd, "fused_available", lambda: False)
    ids = IDS[:, :70]
    cache = make_cache(model)
    chunked = np.array(model(mx.array(ids), cache=cache))[0, -1]
    seq_cache = make_cache(model)
    for t in range(ids.shape[1]):
        seq = np.array(model(mx.array(ids[:, t : t + 1]), cache=seq_cache))[0, 0]
    assert rel_err(chunked, seq) < 1e-4


# ------------------------------------------------------------------ bad input


def _config(folder: Path, **changes) -> Path:
    cfg = dict(TEXT, model_type="qwen3_5_text", num_hidden_layers=3, layer_types=[L, L, F])
    cfg.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("changes,message", [
    (dict(layer_types=[L, F]), "layer_types has 2 entries for 3 layers"),
    (dict(num_key_value_heads=3), "num_attention_heads (4) is not a multiple of "
                                  "num_key_value_heads (3)"),
    (dict(linear_num_value_heads=5), "linear_num_value_heads (5) is not a multiple of "
                                     "linear_num_key_heads (2)"),
])
def test_bad_config_one_line_error(tmp_path, changes, message):
    from edgert.models import get_classes

    cfg = json.loads((_config(tmp_path, **changes) / "config.json").read_text())
    _, args_cls = get_classes("qwen3_5_text")
    with pytest.raises(EdgertError) as e:
        args_cls.from_dict(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_config_cli_exit(tmp_path):
    """`edgert convert` of a folder whose layer_types disagree: one line, non-zero exit,
    nothing written."""
    import subprocess
    import sys

    src = tmp_path / "hf"
    hf_qwen3_5("text-tied-yarn", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["layer_types"] = cfg["layer_types"][:2]
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "pkg"
    r = subprocess.run([sys.executable, "-m", "edgert", "convert", str(src), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "layer_types has 2 entries for 3 layers" in lines[0]
    assert not out.exists()


# ------------------------------------------------------------------ chat with snapshots

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_char_tokenizer(folder: Path, merge: bool = False) -> int:
    """A character-level tokenizer (printable ASCII and newline, one token each, plus ChatML
    specials) with a Qwen-style ChatML template; returns its vocabulary size. Every id decodes
    to text that encodes back to the same id, so replies re-enter the history unchanged.
    `merge` adds one BPE merge ("~" "`"), which llama.cpp's vocabulary loader requires."""
    from tokenizers import Tokenizer, decoders, models

    chars = ["\n"] + [chr(c) for c in range(32, 127)] + (["~`"] if merge else [])
    merges = [("~", "`")] if merge else []
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, merges, unk_token=None))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "chat_template": CHATML}))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from edgert.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("chat")
    (folder / "hf").mkdir()
    vocab = write_char_tokenizer(folder / "hf")
    hf_qwen3_5("text-irregular-untied", folder / "hf", vocab_size=vocab)
    package = convert_file(folder / "hf", folder / "pkg", bits=0, progress=False)
    return load_model(package)[0], load_tokenizer(package)


def test_chat_snapshots_equal_a_fresh_run(chat_model):
    """Three turns on a hybrid model: each reply has exactly the tokens of a fresh session over
    the whole conversation so far; turns 2 and 3 feed only the tokens after the cached ones."""
    from edgert.chat import ChatSession

    model, tok = chat_model
    users = ["Hello there", "What is 2+2?", "And 3+3?"]
    session = ChatSession(model, tok)
    for turn, user in enumerate(users):
        before = list(session.cached)
        history = list(session.messages)
        tokens = [r.token for r in session.reply(user, 12, {"temp": 0.0})]
        prompt = tok.encode(tok.apply_chat_template(history + [{"role": "user", "content": user}]),
                            add_special_tokens=False)
        if turn == 0:
            assert session.fed == len(prompt)
        else:
            assert before and prompt[: len(before)] == before
            assert session.fed == len(prompt) - len(before) < len(prompt) // 2
        fresh = ChatSession(model, tok)
        fresh.messages = history
        assert [r.token for r in fresh.reply(user, 12, {"temp": 0.0})] == tokens
        assert fresh.fed == len(prompt)


# ------------------------------------------------------------------ Qwen3-Next, dense layers

NEXT = dict(TEXT, num_hidden_layers=4, layer_types=[L, F, L, L], tie_word_embeddings=False,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})


def test_qwen3_next_dense_matches_transformers(tmp_path):
    """Qwen3-Next with every layer dense (mlp_only_layers): the fused in_proj_qkvz / in_proj_ba
    (two value heads per key head, so the per-head interleave shows) against transformers."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3NextConfig(**NEXT, mlp_only_layers=[0, 1, 2, 3])
    hf = transformers.Qwen3NextForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_model(convert_file(tmp_path / "hf", tmp_path / "pkg", bits=0, progress=False))
    ref = hf_logits(hf, IDS[:, :40])
    out = np.array(model(mx.array(IDS[:, :40])))
    assert rel_err(out, ref) < 1e-4 and (out.argmax(-1) == ref.argmax(-1)).all()
    cache = make_cache(model)
    model(mx.array(IDS[:, :30]), cache=cache)
    for t in range(30, 40):
        step = np.array(model(mx.array(IDS[:, t : t + 1]), cache=cache))[0, 0]
        assert rel_err(step, ref[0, t]) < 1e-4


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_next_moe_matches_transformers(tmp_path, norm_topk_prob):
    """Qwen3-Next with routed experts and a shared expert on layers 0, 1 and 3 (layer 2 dense,
    mlp_only_layers): logits within 1e-4 of transformers, top-1 identical; cached decode
    equals the uncached run; sorting tokens by expert changes nothing."""
    from test_moe import set_sorting

    torch.manual_seed(0)
    cfg = transformers.Qwen3NextConfig(**NEXT, mlp_only_layers=[2], norm_topk_prob=norm_topk_prob)
    hf = transformers.Qwen3NextForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith(("dt_bias", "A_log")):
                p.add_(torch.randn_like(p) * 0.1)
            elif "experts" in n or n.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    model, config = load_model(convert_file(tmp_path / "hf", tmp_path / "pkg", bits=0,
                                            progress=False))
    assert [type(layer.mlp).__name__ for layer in model.layers] == [
        "SparseMoeBlock", "SparseMoeBlock", "MLP", "SparseMoeBlock"]
    ref = hf_logits(hf, IDS[:, :40])
    out = np.array(model(mx.array(IDS[:, :40])))
    assert rel_err(out, ref) < 1e-4 and (out.argmax(-1) == ref.argmax(-1)).all()
    cache = make_cache(model)
    model(mx.array(IDS[:, :30]), cache=cache)
    for t in range(30, 40):
        step = np.array(model(mx.array(IDS[:, t : t + 1]), cache=cache))[0, 0]
        assert rel_err(step, ref[0, t]) < 1e-4
    set_sorting(model, False)
    assert rel_err(np.array(model(mx.array(IDS[:, :40]))), out) < 1e-6


def test_qwen3_next_bad_expert_config():
    from edgert.models import get_classes

    cfg = dict(NEXT, model_type="qwen3_next", num_experts_per_tok=5)
    with pytest.raises(EdgertError, match="num_experts_per_tok 5 must be between 1 and"):
        get_classes("qwen3_next")[1].from_dict(cfg)


# ------------------------------------------------------------------ GGUF (llama.cpp's converter)

# more value heads than key heads (llama.cpp reorders them); value heads of 32 columns, so that
# out_proj's reordered columns are whole Q8_0 / MLX groups; key heads as wide as value heads
# (llama.cpp's qwen35 takes both from ssm.state_size)
GGUF_MODEL = dict(linear_key_head_dim=32, linear_value_head_dim=32, linear_num_value_heads=4,
                  linear_num_key_heads=2)


@pytest.fixture(scope="session")
def llama_cpp_converter(tmp_path_factory) -> Path:
    """llama.cpp's convert_hf_to_gguf.py, its conversion/ package and gguf-py, unpacked from
    the llama-cpp-python sdist (tests/fetch_data.sh)."""
    import tarfile

    from testdata import data_file

    sdist = data_file("llama_cpp_python-0.3.36.tar.gz")
    out = tmp_path_factory.mktemp("llama-cpp-src")
    prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and m.name[len(prefix):].startswith(wanted)]
        tar.extractall(out, members=members, filter="data")
    return out / prefix


# The converter names the tokenizer's pre-tokenizer by hashing its output on a fixed text; the
# test tokenizer is in no list, so it is named "gpt-2" (llama.cpp only uses that to tokenize
# text; these tests feed token ids). Nothing else of the converter is touched.
_RUN_CONVERTER = """
import runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [root, root + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_cpp_gguf(converter: Path, hf_folder: Path, out: Path, outtype: str = "f32") -> Path:
    """A GGUF made by llama.cpp's own convert_hf_to_gguf.py from an HF folder."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _RUN_CONVERTER, str(converter), str(hf_folder),
                        "--outfile", str(out), "--outtype", outtype, "--no-mtp"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def gguf_source(llama_cpp_converter, tmp_path_factory):
    """(transformers model, HF folder, the f32 GGUF llama.cpp's converter made of it)."""
    folder = tmp_path_factory.mktemp("gguf")
    (folder / "hf").mkdir()
    vocab = write_char_tokenizer(folder / "hf", merge=True)
    hf = hf_qwen3_5("text-irregular-untied", folder / "hf", vocab_size=vocab, **GGUF_MODEL)
    return hf, folder / "hf", llama_cpp_gguf(llama_cpp_converter, folder / "hf",
                                             folder / "f32.gguf")


def test_gguf_transforms_undo_llama_cpp_converter(gguf_source):
    """Every tensor of llama.cpp's f32 GGUF, mapped and transformed by the qwen3_5 module, is
    the HF checkpoint's tensor (exact but for A_log = log(-ssm_a) and the norms' 1 + w)."""
    import gguf
    from safetensors.numpy import load_file

    from edgert.models import qwen3_5

    hf, folder, path = gguf_source
    ref = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    reader = gguf.GGUFReader(path)
    seen = set()
    for t in reader.tensors:
        layer, _, rest = t.name.removeprefix("blk.").partition(".")
        part, _, kind = rest.rpartition(".")
        if t.name.startswith("blk."):
            leaf = qwen3_5.GGUF_LEAVES.get(rest) or f"{qwen3_5.GGUF_TENSORS[part]}.{kind}"
            name = f"model.layers.{layer}.{leaf}"
        else:
            name = {"token_embd.weight": "model.embed_tokens.weight", "output.weight":
                    "lm_head.weight", "output_norm.weight": "model.norm.weight"}[t.name]
        value = qwen3_5.gguf_transform(name, np.array(t.data, dtype=np.float32), config)
        assert value.shape == ref[name].shape, name
        if name.endswith(("A_log", "norm.weight")):
            np.testing.assert_allclose(value, ref[name], rtol=1e-6, atol=1e-7, err_msg=name)
        else:
            np.testing.assert_array_equal(value, ref[name], err_msg=name)
        seen.add(name)
    assert seen == set(ref)


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (T, vocab) on a GGUF, through the llama_cpp binding."""
    import os

    from testdata import data_file

    os.environ["LLAMA_CPP_LIB_PATH"] = str(data_file("llama.cpp/lib/libllama.so").parent)
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True,
                          n_threads=2, verbose=False, seed=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def test_llama_cpp_peer_on_its_own_gguf(gguf_source, tmp_path):
    """llama.cpp on the f32 GGUF its converter made and edgert on the package converted from
    the same HF checkpoint: top-1 identical at every position. (llama.cpp keeps its KV cache in
    float16: logits agree to ~1e-3 of the largest, not 1e-4.)"""
    hf, folder, path = gguf_source
    ids = [int(i) for i in IDS[0, :60] % hf.config.vocab_size]
    theirs = llama_cpp_logits(path, ids)
    model, _ = load_model(convert_file(folder, tmp_path / "pkg", bits=0, progress=False))
    ours = np.array(model(mx.array([ids])))[0]
    ref = hf_logits(hf, np.array([ids]))[0]
    assert rel_err(ours, ref) < 1e-4
    assert rel_err(theirs, ref) < 1e-2
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def _gguf_of(kind: str, gguf_source, converter: Path, folder: Path) -> Path:
    """The test model as a GGUF of `kind`: f32 / f16 / q8_0 from llama.cpp's converter, other
    types (Q4_0, Q4_K_M) by llama-quantize from the f32 file."""
    import subprocess

    from testdata import data_file

    _, hf_folder, f32 = gguf_source
    if kind == "f32":
        return f32
    if kind in ("f16", "q8_0"):
        return llama_cpp_gguf(converter, hf_folder, folder / f"{kind}.gguf", kind)
    out = folder / f"{kind}.gguf"
    quantize = data_file("llama.cpp/bin/llama-quantize")
    r = subprocess.run([str(quantize), str(f32), str(out), kind], capture_output=True, text=True,
                       env={"LD_LIBRARY_PATH": str(data_file("llama.cpp/lib/libllama.so").parent)})
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _dequantized_hf(hf, path: Path):
    """A copy of the transformers model holding the GGUF's weights as gguf-py dequantizes
    them (in HF's convention through the qwen3_5 module's transforms, checked above)."""
    import copy

    import gguf

    from edgert.models import qwen3_5

    config = hf.config.to_dict()
    state = {}
    for t in gguf.GGUFReader(path).tensors:
        layer, _, rest = t.name.removeprefix("blk.").partition(".")
        part, _, kind = rest.rpartition(".")
        if t.name.startswith("blk."):
            leaf = qwen3_5.GGUF_LEAVES.get(rest) or f"{qwen3_5.GGUF_TENSORS[part]}.{kind}"
            name = f"model.layers.{layer}.{leaf}"
        else:
            name = {"token_embd.weight": "model.embed_tokens.weight", "output.weight":
                    "lm_head.weight", "output_norm.weight": "model.norm.weight"}[t.name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.shape.tolist()[::-1])
        state[name] = torch.tensor(qwen3_5.gguf_transform(name, w.astype(np.float32), config))
    model = copy.deepcopy(hf)
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "Q4_0", "Q4_K_M"])
def test_gguf_logits_match_transformers(kind, gguf_source, llama_cpp_converter, tmp_path):
    """edgert converts llama.cpp's qwen35 GGUFs: its logits equal transformers' on the weights
    the file holds (gguf-py's dequantization) within 1e-4; every type here maps exactly."""
    hf = gguf_source[0]
    path = _gguf_of(kind, gguf_source, llama_cpp_converter, tmp_path)
    model, config = load_model(convert_file(path, tmp_path / "pkg", progress=False))
    assert config["layer_types"] == CONFIGS["text-irregular-untied"][1]["layer_types"]
    ids = IDS[:, :60] % hf.config.vocab_size
    ref = hf_logits(_dequantized_hf(hf, path), ids)
    out = np.array(model(mx.array(ids)))
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_llama_cpp_peer_on_gguf(kind, gguf_source, llama_cpp_converter, tmp_path):
    """llama.cpp on its own GGUF and edgert on the package converted from that GGUF: top-1
    identical at every position."""
    hf = gguf_source[0]
    path = _gguf_of(kind, gguf_source, llama_cpp_converter, tmp_path)
    ids = [int(i) for i in IDS[0, :60] % hf.config.vocab_size]
    theirs = llama_cpp_logits(path, ids)
    model, _ = load_model(convert_file(path, tmp_path / "pkg", progress=False))
    ours = np.array(model(mx.array([ids])))[0]
    # llama.cpp: float16 KV cache; on q8_0 also 8-bit activations (measured 2.3e-4 / 1.1e-2)
    assert rel_err(ours, theirs) < {"f32": 1e-3, "q8_0": 3e-2}[kind]
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_gguf_without_recurrent_layer_metadata(gguf_source, llama_cpp_converter, tmp_path):
    """A qwen35 GGUF with neither attention.recurrent_layers nor full_attention_interval
    (removed with gguf-py's gguf_new_metadata.py): one-line error, nothing written."""
    import os
    import subprocess
    import sys

    path, out = gguf_source[2], tmp_path / "stripped.gguf"
    script = llama_cpp_converter / "gguf-py/gguf/scripts/gguf_new_metadata.py"
    r = subprocess.run([sys.executable, str(script), str(path), str(out), "--force",
                        "--remove-metadata", "qwen35.attention.recurrent_layers",
                        "--remove-metadata", "qwen35.full_attention_interval"],
                       capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(llama_cpp_converter / "gguf-py")})
    assert r.returncode == 0, r.stderr[-2000:]
    with pytest.raises(EdgertError) as e:
        convert_file(out, tmp_path / "pkg", progress=False)
    assert "recurrent_layers" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "pkg").exists()
