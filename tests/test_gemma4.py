"""Gemma 4 text models from HF folders, against transformers (random-initialised from small
configs), mlx-lm loading the same packages, the multimodal wrapper, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from edgert.convert.api import convert_file
from edgert.errors import EdgertError
from edgert.models import gemma4
from edgert.package import load_model

S, F = "sliding_attention", "full_attention"
VOCAB = 160


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def text_config(**over) -> dict:
    """A small gemma4_text config with every feature: PLE, KV sharing (2 of 8 layers),
    attention_k_eq_v with its own kv heads and head_dim on full layers, double-wide MLP on the
    shared layers, a sliding window (4) shorter than the prompts, soft-capping."""
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=8,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
               num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=4,
               layer_types=[S, S, F, S, S, F, S, F], num_kv_shared_layers=2,
               vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=16,
               use_double_wide_mlp=True, final_logit_softcapping=30.0)
    return cfg | over


def randomize(model: torch.nn.Module) -> None:
    """Norm weights and layer scalars away from their init values (ones), so that a model that
    ignores one of them differs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))


def save_text_model(folder: Path, **over) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Gemma4TextConfig(**text_config(**over))
    model = transformers.Gemma4ForCausalLM(cfg).eval()
    randomize(model)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def hf_text(tmp_path_factory):
    folder = tmp_path_factory.mktemp("g4") / "hf"
    return folder, save_text_model(folder)


@pytest.fixture(scope="module")
def packages(hf_text, tmp_path_factory):
    """The same HF folder as a float package and a default (4-bit) package."""
    folder, _ = hf_text
    root = tmp_path_factory.mktemp("g4pkg")
    return {bits: convert_file(folder, root / f"b{bits}", progress=False,
                               **({"bits": 0} if bits == 0 else {}))
            for bits in (0, 4)}


PROMPT = np.array([[5, 17, 99, 3, 42, 7, 150, 8, 23, 61, 2, 11, 88, 14]])  # 14 > window 4


def hf_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits[0].float().numpy()


def edgert_logits(model, ids: np.ndarray, cache=None) -> np.ndarray:
    return np.array(model(mx.array(ids), cache=cache)[0].astype(mx.float32))


def cached_logits(model, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Prefill `prefill` tokens through a cache, then one token at a time."""
    cache = model.make_cache()
    out = [edgert_logits(model, ids[:, :prefill], cache)]
    for t in range(prefill, ids.shape[1]):
        out.append(edgert_logits(model, ids[:, t:t + 1], cache))
    return np.concatenate(out)


def test_float_package_matches_transformers(hf_text, packages):
    _, hf = hf_text
    model, config = load_model(packages[0])
    ref = hf_logits(hf, PROMPT)
    out = edgert_logits(model, PROMPT)
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()
    assert config["model_type"] == "gemma4_text"


def test_cached_decode_equals_uncached_past_the_window(hf_text, packages):
    _, hf = hf_text
    model, _ = load_model(packages[0])
    ref = hf_logits(hf, PROMPT)
    full = edgert_logits(model, PROMPT)
    for prefill in (1, 3, 9):  # before, at and past the window of 4
        inc = cached_logits(model, PROMPT, prefill)
        assert rel_err(inc, full) < 1e-5, prefill
        assert (inc.argmax(-1) == ref.argmax(-1)).all()
    # KV-shared layers hold no cache; sliding layers keep only their window
    cache = model.make_cache()
    assert [type(c).__name__ for c in cache] == ["RotatingKVCache"] * 2 + ["KVCache"] + [
        "RotatingKVCache"] * 2 + ["KVCache"]


def dequantized_state_dict(pkg: Path) -> dict[str, torch.Tensor]:
    """The package's weights as float32 torch tensors (quantized ones through mx.dequantize
    with float32 scales), under their HF names; the PLE file included."""
    q = json.loads((pkg / "config.json").read_text())["quantization"]
    w = {}
    for f in pkg.glob("model*.safetensors"):
        w.update(mx.load(str(f)))
    out = {}
    for k, v in w.items():
        m = k.removesuffix(".weight")
        if k.endswith((".scales", ".biases")):
            continue
        if f"{m}.scales" in w:
            layout = q.get(m, q)
            v = mx.dequantize(v, w[f"{m}.scales"].astype(mx.float32),
                              w[f"{m}.biases"].astype(mx.float32), layout["group_size"],
                              layout["bits"])
        out[k] = torch.tensor(np.array(v.astype(mx.float32)))
    return out


def test_4bit_package_matches_transformers_on_its_weights(tmp_path, packages):
    """The default 4-bit package against transformers running the package's own (dequantized)
    weights: the same function to float32 rounding (the quantization error itself is the
    quantizer's, tested in test_hf_reader)."""
    pkg = packages[4]
    model, config = load_model(pkg)
    assert config["quantization"]["bits"] == 4
    assert f"{gemma4.PLE}.scales" in _header_of(pkg / gemma4.PLE_FILE)  # the table quantized too
    torch.manual_seed(0)
    hf = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**text_config())).eval()
    missing = hf.load_state_dict(dequantized_state_dict(pkg), strict=False).missing_keys
    assert missing == ["lm_head.weight"]  # tied to the embedding
    ref = hf_logits(hf, PROMPT)
    out = edgert_logits(model, PROMPT)
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()
    assert rel_err(cached_logits(model, PROMPT, 6), out) < 1e-5


@pytest.mark.parametrize("bits", [0, 4])
def test_ple_table_is_a_mapped_file(packages, bits):
    """The PLE table sits in its own file and is looked up through a memory map; the model holds
    no copy of it (its parameters exclude the table)."""
    pkg = packages[bits]
    assert (pkg / gemma4.PLE_FILE).is_file()
    model, _ = load_model(pkg)
    rows = model.model.ple_rows
    assert isinstance(rows, gemma4.MappedRows)
    assert all(isinstance(a, np.memmap) for a in rows.arrays.values())
    names = {k for k, _ in __import__("mlx.utils").utils.tree_flatten(model.parameters())}
    assert not any(n.startswith(gemma4.PLE) for n in names)
    # the mapped lookup gives what the table holds in memory
    resident, _ = load_model(pkg)
    resident.map_files(pkg, json.loads((pkg / "config.json").read_text()), resident=True)
    assert not isinstance(resident.model.ple_rows.arrays["weight"], np.memmap)
    np.testing.assert_array_equal(edgert_logits(resident, PROMPT), edgert_logits(model, PROMPT))


def test_full_attention_only_and_no_ple(tmp_path):
    """Variants: no sliding layers, no PLE, no KV sharing, separate k and v, untied head."""
    folder = tmp_path / "hf"
    hf = save_text_model(folder, layer_types=[F, F, F], num_hidden_layers=3,
                         num_kv_shared_layers=0, hidden_size_per_layer_input=0,
                         attention_k_eq_v=False, use_double_wide_mlp=False,
                         final_logit_softcapping=None, tie_word_embeddings=False)
    pkg = convert_file(folder, tmp_path / "pkg", bits=0, progress=False)
    assert not (pkg / gemma4.PLE_FILE).exists()
    model, _ = load_model(pkg)
    ref = hf_logits(hf, PROMPT)
    assert rel_err(edgert_logits(model, PROMPT), ref) < 1e-4
    assert rel_err(cached_logits(model, PROMPT, 5), ref) < 1e-4


# ------------------------------------------------------------------ the multimodal wrapper


def test_multimodal_wrapper_gives_the_text_models_logits(tmp_path, capsys):
    torch.manual_seed(0)
    text = transformers.Gemma4TextConfig(**text_config())
    vision = transformers.Gemma4VisionConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             num_key_value_heads=2, head_dim=16)
    audio = transformers.Gemma4AudioConfig(**_tiny_audio())
    cfg = transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=audio)
    wrapper = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    randomize(wrapper)
    wrapper.save_pretrained(tmp_path / "hf")
    names = json.loads(_header(tmp_path / "hf"))
    assert any("vision_tower" in n for n in names) and any("audio_tower" in n for n in names)

    from click.testing import CliRunner

    from edgert.cli import cli

    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "hf"), "-o", str(tmp_path / "pkg"),
                                 "--bits", "0"])
    assert r.exit_code == 0, r.output
    assert r.output.count("left out") == 1 and "audio_tower" in r.output
    model, config = load_model(tmp_path / "pkg")
    assert config["model_type"] == "gemma4_text"
    with torch.no_grad():
        ref = wrapper(input_ids=torch.tensor(PROMPT)).logits[0].numpy()
    out = edgert_logits(model, PROMPT)
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def _tiny_audio() -> dict:
    return dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                subsampling_conv_channels=[8, 8], output_proj_dims=32)


def _header_of(f: Path) -> dict:
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n))


def _header(folder: Path) -> str:
    return json.dumps(_header_of(next(folder.glob("*.safetensors"))))


# ------------------------------------------------------------------ mlx-lm on the same packages


@pytest.mark.parametrize("bits", [0, 4])
def test_mlx_lm_loads_the_packages_with_the_same_logits(packages, bits):
    """mlx-lm 0.32's gemma4_text loads the packages (the PLE file included: it globs
    model*.safetensors). edgert widens float16 scales to float32 on the CPU, so mlx-lm's are
    widened the same way before comparing (otherwise its quantized embedding lookups round in
    float16: 1.1% apart at 4 bits, measured)."""
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import load_model as mlx_lm_load

    pkg = packages[bits]
    ours, _ = load_model(pkg)
    theirs, _ = mlx_lm_load(pkg)
    theirs.update(tree_map_with_path(
        lambda p, v: v.astype(mx.float32) if p.endswith((".scales", ".biases")) else v,
        theirs.parameters()))
    a = edgert_logits(ours, PROMPT)
    b = np.array(theirs(mx.array(PROMPT))[0].astype(mx.float32))
    assert rel_err(a, b) < 1e-4  # float32 rounding: mlx-lm scales and rounds in other orders
    assert (a.argmax(-1) == b.argmax(-1)).all()
    assert len(theirs.make_cache()) == len(ours.make_cache())


# ------------------------------------------------------------------ bad input


def _package_with(src: Path, dst: Path, **config_over) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text()) | config_over
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_kv_shared_layers_must_be_fewer_than_layers(packages, tmp_path):
    pkg = _package_with(packages[0], tmp_path / "p", num_kv_shared_layers=8)
    with pytest.raises(EdgertError, match="num_kv_shared_layers 8 must be below the layer count 8"):
        load_model(pkg)


def test_kv_shared_layer_without_a_cache_to_reuse(packages, tmp_path):
    # the last two layers share; no full layer comes before them to give its cache
    pkg = _package_with(packages[0], tmp_path / "p", layer_types=[S, S, S, S, S, S, F, F])
    with pytest.raises(EdgertError, match=r"KV-shared layer 6 \(full_attention\) has no earlier"):
        load_model(pkg)


def test_ple_file_missing(packages, tmp_path):
    pkg = _package_with(packages[4], tmp_path / "p")
    (pkg / gemma4.PLE_FILE).unlink()
    with pytest.raises(EdgertError, match="per-layer embedding file .* is missing"):
        load_model(pkg)


@pytest.mark.parametrize("bits", [0, 4])
def test_ple_file_shorter_than_its_table(packages, tmp_path, bits):
    pkg = _package_with(packages[bits], tmp_path / "p")
    f = pkg / gemma4.PLE_FILE
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(EdgertError, match="shorter than the"):
        load_model(pkg)


def test_ple_table_smaller_than_the_config_says(packages, tmp_path):
    pkg = _package_with(packages[0], tmp_path / "p", vocab_size_per_layer_input=VOCAB * 2)
    with pytest.raises(EdgertError, match="the config needs"):
        load_model(pkg)


def test_bad_input_is_one_line_on_the_cli(packages, tmp_path, capsys):
    from edgert.cli import main

    pkg = _package_with(packages[4], tmp_path / "p")
    (pkg / gemma4.PLE_FILE).unlink()
    with pytest.raises(SystemExit) as e:
        main(["generate", str(pkg), "-p", "hi", "-n", "1"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is missing" in err


def test_info_separates_stored_resident_and_read_per_token(packages):
    from edgert.info import package_info

    pkg = packages[4]
    s = package_info(pkg)
    ple = _header_of(pkg / gemma4.PLE_FILE)
    main = _header_of(pkg / "model.safetensors")
    table = 8 * 16 * VOCAB  # layers * ple dim * vocab
    assert s["stored_parameters"] - s["resident_parameters"] == table
    data = lambda h: sum(e["data_offsets"][1] - e["data_offsets"][0]  # noqa: E731
                         for k, e in h.items() if k != "__metadata__")
    expected = data(main) + data(ple) / VOCAB  # every resident weight + one PLE row
    assert abs(s["bytes_read_per_token"] - expected) / expected < 1e-3


# ------------------------------------------------------------------ GGUF from llama.cpp's converter

GGUF_VOCAB = 288  # 4 specials + 256 byte tokens + 26 letters + "▁" + one merge "ab"


def save_tokenizer(folder: Path) -> None:
    """A tiny Gemma-style tokenizer.json (BPE with byte fallback, spaces as ▁): what llama.cpp's
    converter needs to write a gemma4 GGUF (it requires merges)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    pieces = (["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
              + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["▁", "ab"])
    assert len(pieces) == GGUF_VOCAB
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [("a", "b")],
                               byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>"}))


@pytest.fixture(scope="module")
def llama_cpp_converter(tmp_path_factory) -> Path:
    """convert_hf_to_gguf.py with its conversion/ package and gguf-py, from the llama-cpp-python
    sdist (tests/fetch_data.sh)."""
    import tarfile

    from testdata import data_file

    root = tmp_path_factory.mktemp("llama_cpp_src")
    with tarfile.open(data_file("llama_cpp_python-0.3.36.tar.gz")) as t:
        members = [m for m in t.getmembers() if "/vendor/llama.cpp/" in m.name and any(
            s in m.name for s in ("/convert_hf_to_gguf.py", "/conversion/", "/gguf-py/"))]
        t.extractall(root, members=members, filter="data")
    return next(root.glob("*/vendor/llama.cpp"))


@pytest.fixture(scope="module")
def ggufs(llama_cpp_converter, tmp_path_factory):
    """The random model (vocab GGUF_VOCAB) as an HF folder and as GGUFs (F32, Q8_0) written by
    llama.cpp's own converter."""
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("g4gguf")
    hf = save_text_model(root / "hf", vocab_size=GGUF_VOCAB, vocab_size_per_layer_input=GGUF_VOCAB)
    save_tokenizer(root / "hf")
    env = dict(os.environ, PYTHONPATH=str(llama_cpp_converter / "gguf-py"))
    out = {}
    for kind in ("f32", "q8_0"):
        out[kind] = root / f"{kind}.gguf"
        p = subprocess.run([sys.executable, str(llama_cpp_converter / "convert_hf_to_gguf.py"),
                            str(root / "hf"), "--outfile", str(out[kind]), "--outtype", kind],
                           capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
    return hf, out


@pytest.fixture(scope="module")
def llama_cpp():
    import os

    from testdata import data_file

    os.environ["LLAMA_CPP_LIB_PATH"] = str(data_file("llama.cpp/lib/libllama.so").parent)
    import llama_cpp

    return llama_cpp


def llama_cpp_logits(llama_cpp, path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True,
                          n_threads=2, verbose=False, seed=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)  # (T, vocab)
    finally:
        llm.close()


def test_gguf_f32_matches_transformers(ggufs, tmp_path):
    hf, files = ggufs
    pkg = convert_file(files["f32"], tmp_path / "pkg", progress=False)
    model, config = load_model(pkg)
    assert config["model_type"] == "gemma4_text" and config["attention_k_eq_v"]
    assert config["rope_parameters"][F]["partial_rotary_factor"] == 0.25
    ref = hf_logits(hf, PROMPT)
    out = edgert_logits(model, PROMPT)
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()
    assert rel_err(cached_logits(model, PROMPT, 3), ref) < 1e-4
    assert (pkg / gemma4.PLE_FILE).is_file()


def gguf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A GGUF's tensors dequantized by gguf-py, under HF names (what transformers runs)."""
    import gguf

    from edgert.convert.gguf_reader import hf_name

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        if t.name == "rope_freqs.weight":  # read into the config
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        value = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        out[hf_name(t.name, "gemma4_text")] = torch.tensor(np.asarray(value, np.float32))
    return out


def test_gguf_q8_0_matches_transformers_on_its_weights(ggufs, tmp_path):
    """Q8_0 maps onto MLX exactly: edgert on the GGUF equals transformers running gguf-py's
    dequantization of the same file."""
    _, files = ggufs
    pkg = convert_file(files["q8_0"], tmp_path / "pkg", progress=False)
    model, config = load_model(pkg)
    assert config["quantization"]["bits"] == 8
    torch.manual_seed(0)
    hf = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**text_config(
        vocab_size=GGUF_VOCAB, vocab_size_per_layer_input=GGUF_VOCAB))).eval()
    missing = hf.load_state_dict(gguf_state_dict(files["q8_0"]), strict=False).missing_keys
    assert missing == ["lm_head.weight"]  # tied
    ref = hf_logits(hf, PROMPT)
    out = edgert_logits(model, PROMPT)
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_gguf_matches_llama_cpp(ggufs, llama_cpp, tmp_path):
    """llama.cpp's logits on its own GGUFs as the peer. On F32 (llama.cpp keeps its KV cache in
    float16): top-1 identical, max error within 3% of the largest logit (measured 0.9%). On
    Q8_0 llama.cpp also rounds activations to 8 bits, which on this tiny random model moves its
    logits by ~64% of the largest against its own F32 path (measured); there edgert must be at
    least as close to llama.cpp's Q8_0 logits as llama.cpp's F32 path is (measured 47% vs 64%)."""
    _, files = ggufs
    ids = PROMPT[0].tolist()
    theirs = {k: llama_cpp_logits(llama_cpp, files[k], ids) for k in ("f32", "q8_0")}
    ours = {k: edgert_logits(load_model(convert_file(files[k], tmp_path / k, progress=False))[0],
                             PROMPT) for k in ("f32", "q8_0")}
    assert rel_err(ours["f32"], theirs["f32"]) < 0.03
    assert (ours["f32"].argmax(-1) == theirs["f32"].argmax(-1)).all()
    assert rel_err(ours["q8_0"], theirs["q8_0"]) < rel_err(theirs["f32"], theirs["q8_0"])


def test_gguf_tokenizer_matches_llama_cpp(ggufs, llama_cpp, tmp_path):
    from edgert.tokenizer import load_tokenizer

    _, files = ggufs
    pkg = convert_file(files["f32"], tmp_path / "pkg", progress=False)
    tok = load_tokenizer(pkg)
    llm = llama_cpp.Llama(model_path=str(files["f32"]), n_ctx=64, vocab_only=True, verbose=False)
    try:
        for text in ("ab ba cab", "hello world\n\nabc", " leading space", "zürich ß"):
            assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=True, special=False)
    finally:
        llm.close()


def test_bench_counts_one_ple_row_per_token(packages):
    """`edgert bench`'s roofline reads the resident weights and one PLE row per token, not the
    table."""
    from edgert.bench import load_for_bench

    pkg = packages[4]
    model, _, size = load_for_bench(str(pkg), None, 4, 64)
    ple = _header_of(pkg / gemma4.PLE_FILE)
    row = sum(e["data_offsets"][1] - e["data_offsets"][0]
              for k, e in ple.items() if k != "__metadata__") // VOCAB
    assert size == (pkg / "model.safetensors").stat().st_size + row


def test_bad_config_fails_at_convert_leaving_nothing(hf_text, tmp_path):
    folder, _ = hf_text
    bad = tmp_path / "hf"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text()) | {"num_kv_shared_layers": 8}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgertError, match="num_kv_shared_layers 8 must be below"):
        convert_file(bad, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no package, no temporary
