"""PrismML's Qwen3.5 packs: MLX 1-/2-bit folders made by mlx-lm, llama.cpp's Q1_0 / Q2_0 /
TQ2_0 / TQ1_0 GGUFs made by its own converter and llama-quantize, and mlx-lm's
`prism_hadamard_qwen35` format (2-bit g128 with blockwise Hadamard rotations), written here
from random transformers models. Oracles: mlx-lm (its own quantizer and loader), llama.cpp's
ggml dequantization and the llama_cpp binding, transformers on the weights each file holds."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from edgert.convert.api import convert_file
from edgert.errors import EdgertError
from edgert.models import prism_hadamard_qwen35 as prism
from edgert.models import qwen3_5
from edgert.package import load_model

from test_qwen3_5 import (IDS, hf_logits, hf_qwen3_5, llama_cpp_converter,  # noqa: F401
                          llama_cpp_gguf, llama_cpp_logits, rel_err, write_char_tokenizer)

L, F = "linear_attention", "full_attention"


def mlx_lm_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    """mlx-lm's own loader and model on `folder`, computing in float32 as edgert does on the
    CPU (mlx-lm otherwise computes in the scales' dtype)."""
    from mlx_lm.utils import load_model as mlx_lm_load

    model, _ = mlx_lm_load(Path(folder))
    model.set_dtype(mx.float32)
    return np.array(model(mx.array(ids)))


def edgert_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    return np.array(load_model(folder)[0](mx.array(ids)))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgert", *args], capture_output=True, text=True)


# ------------------------------------------------------------------ the Hadamard format


# hidden 512 and an MLP of 1024: Hadamard blocks of 512 and 1024; attention output and the
# linear attention's out_proj are 256 wide (no block there, block 0: plain 2-bit g128)
PRISM_TEXT = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, linear_conv_kernel_dim=4,
                  linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=2,
                  linear_num_value_heads=4, num_hidden_layers=3, layer_types=[L, L, F],
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                   "partial_rotary_factor": 0.5})
FLOAT_IN_PACK = ("in_proj_a",)  # left float (not in `modules`): plain layers beside packed ones


def hf_text_model(folder: Path, tied: bool):
    """A random transformers qwen3_5_text model with the char tokenizer, saved to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_char_tokenizer(folder)
    torch.manual_seed(0)
    cfg = transformers.Qwen3_5TextConfig(**PRISM_TEXT, vocab_size=vocab,
                                         tie_word_embeddings=tied)
    model = transformers.Qwen3_5ForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(("dt_bias", "A_log")):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model


def block_for(width: int) -> int:
    """The Hadamard block the test gives a layer of this input width (0 where none fits)."""
    return width if width in prism.BLOCKS else (512 if width % 512 == 0 else 0)


def write_pack(hf, folder: Path, schema: int, rotate: bool = True) -> dict:
    """`hf`'s weights as a prism_hadamard_qwen35 pack, laid out as mlx-lm reads it: each packed
    layer's rows rotated by mlx-lm's own hadamard_rotate (signs random +-1), quantized by
    mx.quantize to 2-bit g128 (float16 scales); norms as mlx-lm saves them (1 + w) beside its
    (C, K, 1) conv1d; schema 2 keys under language_model.* with a vision tower. `rotate` False
    gives every record block 0 (plain 2-bit). Returns the de-rotated dequantized weights (HF
    names), what the pack means in float."""
    from mlx_lm.models.prism_hadamard_qwen35 import hadamard_rotate
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    write_char_tokenizer(folder)
    rng = np.random.default_rng(1)
    out, records, meaning = {}, [], {}
    for name, p in hf.state_dict().items():
        w = p.detach().numpy().astype(np.float32)
        path = name.removesuffix(".weight")
        packed = w.ndim == 2 and not any(f in name for f in FLOAT_IN_PACK)
        if name == "lm_head.weight" and hf.config.tie_word_embeddings:
            continue
        if not packed:
            meaning[name] = w
            if name.endswith(qwen3_5.ZERO_CENTRED_NORMS):
                w = w + 1.0
            if name.endswith("conv1d.weight"):
                w = w.swapaxes(1, 2)  # HF (C, 1, K) -> mlx-lm's (C, K, 1)
            out[name] = w
            continue
        block = block_for(w.shape[1]) if rotate else 0
        signs = mx.array(rng.choice([-1.0, 1.0], w.shape[1]).astype(np.float32))
        rotated = hadamard_rotate(mx.array(w), block, signs) if block else mx.array(w)
        q, s, b = mx.quantize(rotated, group_size=128, bits=2)
        s, b = s.astype(mx.float16), b.astype(mx.float16)
        out[f"{path}.weight"], out[f"{path}.scales"], out[f"{path}.biases"] = (
            np.array(q), np.array(s), np.array(b))
        w_hat = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=128,
                              bits=2)
        if block:
            out[f"{path}.signs"] = np.array(signs)
            w_hat = hadamard_rotate(w_hat, block, signs, inverse=True)
        meaning[name] = np.array(w_hat)
        records.append({"path": path, "embedding": "embed_tokens" in path, "dtype": "float16",
                        "block": block})
    if schema == 2:
        out = {f"language_model.{k}": v for k, v in out.items()}
        out["vision_tower.patch_embed.proj.weight"] = np.zeros((8, 3, 2, 2), np.float32)
    save_file(out, str(folder / "model.safetensors"))
    text = {k: v for k, v in hf.config.to_dict().items() if not k.startswith("_")}
    text.update(model_type="qwen3_5_text", full_attention_interval=3)  # mlx-lm reads the interval
    config = {"model_type": "prism_hadamard_qwen35", "architectures": ["Qwen3_5ForCausalLM"],
              "text_config": text, "tie_word_embeddings": hf.config.tie_word_embeddings,
              "schema_version": schema, "tensor_namespace": prism.NAMESPACES[schema],
              "gdn_activation_layout": "grouped", "quantization": dict(prism.QUANTIZATION),
              "modules": records}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return meaning


PACKS = {"schema1-untied": (1, False), "schema2-tied": (2, True)}


@pytest.fixture(scope="module", params=list(PACKS))
def pack(request, tmp_path_factory):
    """(name, transformers model, pack folder, the pack's float meaning)."""
    schema, tied = PACKS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf = hf_text_model(root / "hf", tied)
    meaning = write_pack(hf, root / "pack", schema)
    return request.param, hf, root / "pack", meaning


def test_rotation_twin_and_mlx_lm_agree():
    """edgert's rotation: mx.hadamard_transform (runs on MLX's CPU) and the pure-MLX butterfly
    twin agree, both equal mlx-lm's hadamard_rotate, and the inverse undoes it."""
    from mlx_lm.models.prism_hadamard_qwen35 import hadamard_rotate

    assert prism.fused_available()
    for block in prism.BLOCKS[1:]:
        x = mx.random.normal((3, 2 * block), key=mx.random.key(block))
        signs = mx.where(mx.random.bernoulli(0.5, (2 * block,), key=mx.random.key(1)), 1.0, -1.0)
        fused = prism.rotate(x, block, signs, use_fused=True)
        twin = prism.rotate(x, block, signs, use_fused=False)
        theirs = hadamard_rotate(x, block, signs)
        assert float(mx.abs(fused - twin).max()) < 1e-5, block
        assert float(mx.abs(fused - theirs).max()) < 1e-6, block
        back = prism.rotate(fused, block, signs, inverse=True, use_fused=False)
        assert float(mx.abs(back - x).max()) < 1e-5, block
        assert float(mx.abs(back - hadamard_rotate(theirs, block, signs, inverse=True)).max()) \
            < 1e-5


PRISM_IDS = IDS[:, :32] % 99  # the char tokenizer's vocabulary


def test_pack_matches_mlx_lm(pack):
    """mlx-lm's prism_hadamard_qwen35 and edgert on the same pack: same logits, same top-1."""
    _, _, folder, _ = pack
    ref = mlx_lm_logits(folder, PRISM_IDS)
    out = edgert_logits(folder, PRISM_IDS)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def _meaning_model(hf, meaning: dict):
    """transformers on the pack's weights (de-rotated, dequantized). The tied pack's lookups
    round rows to float16 (the records' activation dtype); the head does not."""
    model = copy.deepcopy(hf)
    model.load_state_dict({k: torch.tensor(v) for k, v in meaning.items()}, strict=False)
    return model


def test_pack_matches_transformers_on_its_weights(pack):
    """edgert's logits equal transformers' on the float weights the pack stands for; and near
    the unrotated float model's within 2-bit error, as a plain 2-bit g128 quantization of the
    same weights is (the rotation is undone, not merely ignored)."""
    name, hf, folder, meaning = pack
    out = edgert_logits(folder, PRISM_IDS)
    ref = hf_logits(_meaning_model(hf, meaning), PRISM_IDS)
    # float16 rounding of embedding rows (mlx-lm's lookup does it; transformers does not)
    assert rel_err(out, ref) < 2e-3
    plain_meaning = write_pack(hf, folder.parent / "plain", PACKS[name][0], rotate=False)
    plain = edgert_logits(folder.parent / "plain", PRISM_IDS)
    exact = hf_logits(hf, PRISM_IDS)
    err, plain_err = rel_err(out, exact), rel_err(plain, exact)
    float_w = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    w_err = _weight_error(meaning, float_w)
    plain_w_err = _weight_error(plain_meaning, float_w)
    print(f"{name}: logits vs float model {err:.3f} (plain 2-bit g128 {plain_err:.3f}), top-1 "
          f"{(out.argmax(-1) == exact.argmax(-1)).mean():.2f} "
          f"({(plain.argmax(-1) == exact.argmax(-1)).mean():.2f}); weights {w_err:.3f} "
          f"({plain_w_err:.3f})")
    assert w_err < 1.1 * plain_w_err < 0.6  # a rotation left in place would be ~1.4
    assert err < 1.3 * plain_err


def _weight_error(meaning: dict, float_w: dict) -> float:
    """Mean relative (Frobenius) error of the packed layers' weights against the float ones."""
    errs = [np.linalg.norm(v - float_w[k]) / np.linalg.norm(float_w[k])
            for k, v in meaning.items() if v.ndim == 2 and not np.array_equal(v, float_w[k])]
    return float(np.mean(errs))


def _damaged(pack, tmp_path: Path, change) -> Path:
    folder = tmp_path / "bad"
    shutil.copytree(pack[2], folder)
    change(folder)
    return folder


def _edit_config(fn):
    def change(folder: Path):
        cfg = json.loads((folder / "config.json").read_text())
        fn(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return change


def _edit_weights(fn):
    def change(folder: Path):
        from safetensors.numpy import load_file, save_file

        w = load_file(str(folder / "model.safetensors"))
        fn(w)
        save_file(w, str(folder / "model.safetensors"))
    return change


def _signs_key(w: dict) -> str:
    return next(k for k in sorted(w) if k.endswith(".signs"))


BAD = {
    "missing signs": (_edit_weights(lambda w: w.pop(_signs_key(w))),
                      "no Hadamard sign vector"),
    "signs not +-1": (_edit_weights(lambda w: w[_signs_key(w)].__setitem__(3, 0.5)),
                      "values other than -1 and +1"),
    "4-bit block": (_edit_config(lambda c: c["quantization"].update(bits=4)),
                    "quantization must be exactly"),
    "group 64": (_edit_config(lambda c: c["quantization"].update(group_size=64)),
                 "quantization must be exactly"),
    "block 256": (_edit_config(lambda c: c["modules"][1].update(block=256)),
                  "Hadamard block 256"),
    "schema 3": (_edit_config(lambda c: c.update(schema_version=3)), "schema_version 3"),
    "tiled layout": (_edit_config(lambda c: c.update(gdn_activation_layout="tiled")),
                     "gdn_activation_layout"),
    "no modules": (_edit_config(lambda c: c.update(modules=[])), "no `modules`"),
    "unknown path": (_edit_config(lambda c: c["modules"][0].update(path="model.nope")),
                     "'model.nope' is not a linear or embedding layer"),
    "listed twice": (_edit_config(lambda c: c["modules"].append(c["modules"][1])),
                     "is listed twice"),
    "wrong kind": (_edit_config(lambda c: c["modules"][1].update(embedding=True)),
                   "embedding is True, but it is a linear layer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pack_one_line_error(pack, tmp_path, case):
    change, message = BAD[case]
    folder = _damaged(pack, tmp_path, change)
    with pytest.raises(EdgertError) as e:
        load_model(folder)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_pack_cli_exit(pack, tmp_path):
    folder = _damaged(pack, tmp_path, BAD["signs not +-1"][0])
    r = run_cli("generate", str(folder), "-p", "Hi", "-n", "2")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "values other than -1 and +1" in lines[0]


def test_cli_generate_matches_mlx_lm_and_info(pack, tmp_path):
    """`edgert generate` on the pack: greedy tokens equal mlx-lm's; `edgert info` reads it;
    a Core ML export is refused in one line, nothing written."""
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model as mlx_lm_load

    from edgert.tokenizer import load_tokenizer

    _, _, folder, _ = pack
    r = run_cli("generate", str(folder), "-p", "Hello", "-n", "8", "--temp", "0", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    tok = load_tokenizer(folder)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hello"}],
                                             add_generation_prompt=True),
                     add_special_tokens=False)
    theirs, _ = mlx_lm_load(folder)
    theirs.set_dtype(mx.float32)
    want = [int(t) for t, _ in generate_step(mx.array(ids), theirs, max_tokens=8)]
    n = len(got["tokens"])
    assert n > 0 and got["tokens"] == want[:n]
    r = run_cli("info", str(folder), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["architecture"] == "prism_hadamard_qwen35"
    assert (summary["layers"], summary["hidden_size"]) == (3, PRISM_TEXT["hidden_size"])
    out = tmp_path / "x.mlpackage"
    r = run_cli("convert", str(folder), "--to", "coreml", "-o", str(out))
    assert r.returncode != 0 and not out.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unsupported architecture 'prism_hadamard_qwen35'" in lines[0]


def test_edgert_convert_carries_the_pack(pack, tmp_path):
    """`edgert convert` of a pack copies it exactly (signs, packed layers, config): edgert and
    mlx-lm on the result give mlx-lm's logits on the original."""
    name, _, folder, _ = pack
    r = run_cli("convert", str(folder), "-o", str(tmp_path / "pkg"))
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "pkg" / "config.json").read_text())
    assert config["quantization"] == prism.QUANTIZATION
    assert config["modules"] == json.loads((folder / "config.json").read_text())["modules"]
    names = mx.load(str(tmp_path / "pkg" / "model.safetensors"))
    assert sum(k.endswith(".signs") for k in names) == sum(1 for m in config["modules"]
                                                           if m["block"])
    notes = [line for line in (r.stdout + r.stderr).splitlines() if "left out" in line]
    if PACKS[name][0] == 2:  # the vision tower, said once
        assert len(notes) == 1 and "vision_tower" in notes[0]
        assert not any(k.startswith("vision_tower") for k in names)
    ref = mlx_lm_logits(folder, PRISM_IDS)
    assert rel_err(edgert_logits(tmp_path / "pkg", PRISM_IDS), ref) < 1e-5
    assert rel_err(mlx_lm_logits(tmp_path / "pkg", PRISM_IDS), ref) < 1e-5


# ------------------------------------------------------------------ MLX 1-/2-bit folders (mlx-lm)

# the VL wrapper with full attention every 4th layer (mlx-lm reads only the interval); widths
# of 128 and 256 so that 1-/2-bit groups of 64 and 128 both fit (out_proj's 32 columns do not
# split into groups: mlx-lm leaves it float at g64 and g128, so do we)
MLX_TEXT = dict(hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mlx-low-bit") / "hf"
    folder.mkdir()
    vocab = write_char_tokenizer(folder)
    hf_qwen3_5("vl-interval4", folder, vocab_size=vocab, **MLX_TEXT)
    return folder


def mlx_lm_quantized(hf_folder: Path, bits: int, group: int, dtype: str) -> Path:
    """The HF folder quantized by mlx-lm's own convert (as PrismML's Bonsai MLX packs are)."""
    from mlx_lm.convert import convert

    out = hf_folder.parent / f"mlx-{bits}bit-g{group}-{dtype}"
    if not out.exists():
        convert(str(hf_folder), str(out), quantize=True, q_bits=bits, q_group_size=group,
                dtype=dtype)
    return out


MLX_IDS = IDS[:, :40] % 99


@pytest.mark.parametrize("bits,group,dtype", [(1, 64, "float32"), (1, 128, "float16"),
                                              (2, 64, "bfloat16"), (2, 128, "float16")])
def test_mlx_lm_low_bit_folder(hf_folder, bits, group, dtype):
    """A 1-/2-bit folder written by mlx-lm (its layout: language_model.* keys, norms stored as
    1 + w, conv1d (C, K, 1)) loads in edgert: mlx-lm's logits, top-1 identical."""
    folder = mlx_lm_quantized(hf_folder, bits, group, dtype)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"] == {"group_size": group, "bits": bits, "mode": "affine"}
    ref = mlx_lm_logits(folder, MLX_IDS)
    out = edgert_logits(folder, MLX_IDS)
    assert rel_err(out, ref) < 1e-5
    assert (out.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("bits,group,dtype", [(1, 128, "float16"), (2, 64, "bfloat16")])
def test_mlx_lm_low_bit_folder_through_edgert_convert(hf_folder, tmp_path, bits, group, dtype):
    """`edgert convert` of mlx-lm's folder carries every packed layer over exactly (bf16 scales
    widened to float32, the class saying so): edgert and
    mlx-lm on the package give mlx-lm's logits on the folder."""
    folder = mlx_lm_quantized(hf_folder, bits, group, dtype)
    r = run_cli("convert", str(folder), "-o", str(tmp_path / "pkg"))
    assert r.returncode == 0, r.stderr
    records = json.loads((tmp_path / "pkg" / "edgert.json").read_text())["tensors"]
    quantized = [v for v in records.values() if "bits" in v]
    mapping = "widened" if dtype == "bfloat16" else "exact"  # bf16 scales -> float32, exactly
    assert quantized and all(v["class"] == mapping and (v["bits"], v["group_size"]) ==
                             (bits, group) for v in quantized)
    ref = mlx_lm_logits(folder, MLX_IDS)
    assert rel_err(edgert_logits(tmp_path / "pkg", MLX_IDS), ref) < 1e-5
    assert rel_err(mlx_lm_logits(tmp_path / "pkg", MLX_IDS), ref) < 1e-5


# ------------------------------------------------------------------ GGUF Q1_0, Q2_0, TQ2_0, TQ1_0

# every weight row a whole number of 256-weight blocks (TQ1_0 / TQ2_0; Q1_0 takes 128, Q2_0 64),
# and value heads of 128 columns, so that out_proj's reordered heads are whole MLX groups
GGUF_TEXT = dict(hidden_size=256, intermediate_size=256, head_dim=64, linear_key_head_dim=128,
                 linear_value_head_dim=128, linear_num_key_heads=1, linear_num_value_heads=2)
# design.md's table: mapping class per type
GGUF_CLASSES = {"Q1_0": "exact", "Q2_0": "exact", "TQ2_0": "exact", "TQ1_0": "widened"}


@pytest.fixture(scope="module")
def low_bit_source(llama_cpp_converter, tmp_path_factory):
    """(transformers model, its config, the f32 GGUF llama.cpp's converter made of it)."""
    folder = tmp_path_factory.mktemp("gguf-low-bit")
    (folder / "hf").mkdir()
    vocab = write_char_tokenizer(folder / "hf", merge=True)
    hf = hf_qwen3_5("text-irregular-untied", folder / "hf", vocab_size=vocab, **GGUF_TEXT)
    config = json.loads((folder / "hf" / "config.json").read_text())
    return hf, config, llama_cpp_gguf(llama_cpp_converter, folder / "hf", folder / "f32.gguf")


def run_llama_quantize(*args: str) -> None:
    from testdata import data_file

    lib = data_file("llama.cpp/lib/libllama.so").parent
    r = subprocess.run([str(data_file("llama.cpp/bin/llama-quantize")), *args],
                       capture_output=True, text=True, env={"LD_LIBRARY_PATH": str(lib)})
    assert r.returncode == 0, r.stderr[-2000:]


def llama_quantize(f32: Path, kind: str) -> Path:
    """llama-quantize --pure: every weight matrix of `kind` (no higher-precision head)."""
    out = f32.with_name(f"{kind}.gguf")
    if not out.exists():
        run_llama_quantize("--pure", str(f32), str(out), kind)
    return out


def ggml_reference(path: Path, config: dict) -> dict[str, np.ndarray]:
    """Every tensor of the GGUF as llama.cpp's ggml (Q1_0, Q2_0) or gguf-py (TQ1_0, TQ2_0)
    dequantizes it, under its HF name and in HF's convention (qwen3_5's transforms, checked
    against llama.cpp's converter in test_qwen3_5)."""
    from test_gguf_types import reference

    from edgert.convert.gguf_reader import open_gguf

    out = {}
    for t in open_gguf(path).tensors:
        shape = tuple(int(d) for d in t.shape[::-1])
        if t.tensor_type.name in ("F32", "F16"):
            w = np.array(t.data, np.float32).reshape(shape)
        else:
            w = reference(np.array(t.data), t.tensor_type, shape)
        layer, _, rest = t.name.removeprefix("blk.").partition(".")
        part, _, kind = rest.rpartition(".")
        if t.name.startswith("blk."):
            leaf = qwen3_5.GGUF_LEAVES.get(rest) or f"{qwen3_5.GGUF_TENSORS[part]}.{kind}"
            name = f"model.layers.{layer}.{leaf}"
        else:
            name = {"token_embd.weight": "model.embed_tokens.weight", "output.weight":
                    "lm_head.weight", "output_norm.weight": "model.norm.weight"}[t.name]
        out[name] = np.asarray(qwen3_5.gguf_transform(name, w, config), np.float32)
    return out


@pytest.fixture(scope="module", params=list(GGUF_CLASSES))
def low_bit_gguf(request, low_bit_source, tmp_path_factory):
    """(kind, transformers model, GGUF path, edgert package, ggml's dequantization)."""
    hf, config, f32 = low_bit_source
    path = llama_quantize(f32, request.param)
    package = convert_file(path, tmp_path_factory.mktemp(request.param) / "pkg", progress=False)
    return request.param, hf, path, package, ggml_reference(path, config)


def test_low_bit_gguf_tensors_map_as_design_says(low_bit_gguf):
    """Every weight matrix llama-quantize wrote is of the asked type, and edgert's MLX form of
    it dequantizes (mx.dequantize) to ggml's own dequantization bit for bit (a zero may differ
    in sign only), with the mapping class of design.md's table."""
    from test_gguf_types import assert_bit_exact

    kind, _, _, package, ref = low_bit_gguf
    records = json.loads((package / "edgert.json").read_text())["tensors"]
    weights = mx.load(str(package / "model.safetensors"))
    matrices = [n for n, r in records.items() if len(r["shape"]) == 2 and "conv1d" not in n]
    assert len(matrices) == 40
    for name in matrices:
        r = records[name]
        assert (r["source_type"], r["class"]) == (kind, GGUF_CLASSES[kind]), name
        module = name.removesuffix(".weight")
        ours = mx.dequantize(weights[f"{module}.weight"],
                             weights[f"{module}.scales"].astype(mx.float32),
                             weights[f"{module}.biases"].astype(mx.float32),
                             group_size=r["group_size"], bits=r["bits"])
        assert_bit_exact(np.array(ours), ref[name])


def test_low_bit_gguf_logits(low_bit_gguf):
    """edgert on the package equals transformers on ggml's dequantized weights (1e-4, top-1
    identical); llama.cpp on the GGUF agrees within its own arithmetic (it quantizes the
    activations to 8 bits for these dot products)."""
    kind, hf, path, package, ref = low_bit_gguf
    model = copy.deepcopy(hf)
    model.load_state_dict({k: torch.tensor(v) for k, v in ref.items()}, strict=True)
    ids = IDS[:, :40] % hf.config.vocab_size
    want = hf_logits(model, ids)
    out = edgert_logits(package, ids)
    assert rel_err(out, want) < 1e-4
    assert (out.argmax(-1) == want.argmax(-1)).all()
    theirs = llama_cpp_logits(path, [int(i) for i in ids[0]])
    agree = (theirs.argmax(-1) == out[0].argmax(-1)).mean()
    print(f"{kind}: edgert vs transformers {rel_err(out, want):.1e}; llama.cpp vs edgert "
          f"{rel_err(theirs, out[0]):.3f}, top-1 {agree:.2f}")
    assert rel_err(theirs, out[0]) < 0.06 and agree >= 0.85  # measured 0.016-0.041, 0.90-1.0


def test_llama_cpp_float_path_on_ternary_weights(low_bit_source, llama_cpp_converter, tmp_path):
    """Where llama.cpp computes in float (an f32 GGUF its converter made of the TQ2_0 file's
    dequantized weights), its top-1 equals edgert's on the TQ2_0 package at every position: the
    differences above come from llama.cpp's 8-bit activations, not from reading the file."""
    hf, config, f32 = low_bit_source
    path = llama_quantize(f32, "TQ2_0")
    package = convert_file(path, tmp_path / "pkg", progress=False)
    model = copy.deepcopy(hf)
    model.load_state_dict({k: torch.tensor(v) for k, v in ggml_reference(path, config).items()})
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    write_char_tokenizer(folder, merge=True)
    dense = llama_cpp_gguf(llama_cpp_converter, folder, tmp_path / "dense.gguf")
    ids = [int(i) for i in IDS[0, :40] % hf.config.vocab_size]
    theirs = llama_cpp_logits(dense, ids)
    ours = edgert_logits(package, np.array([ids]))[0]
    assert rel_err(theirs, ours) < 1e-3  # llama.cpp's float16 KV cache
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_default_q1_0_mix(low_bit_source, tmp_path):
    """llama-quantize's own Q1_0 mix keeps the head at Q6_K, which edgert re-quantizes to 8-bit
    g32 (its 16-weight sub-blocks have no exact MLX layout) with the error recorded: every other
    matrix exact, logits near transformers' on the file's weights (measured 5e-3, top-1 1.0)."""
    hf, config, f32 = low_bit_source
    path = tmp_path / "Q1_0-mix.gguf"
    run_llama_quantize(str(f32), str(path), "Q1_0")
    package = convert_file(path, tmp_path / "pkg", progress=False)
    records = json.loads((package / "edgert.json").read_text())["tensors"]
    kinds = {(v["source_type"], v["class"]) for v in records.values() if "bits" in v}
    assert kinds == {("Q1_0", "exact"), ("Q6_K", "requantized")}
    assert 0 < records["lm_head.weight"]["max_abs_error"] < 1e-3
    model = copy.deepcopy(hf)
    model.load_state_dict({k: torch.tensor(v) for k, v in ggml_reference(path, config).items()})
    ids = IDS[:, :40] % hf.config.vocab_size
    out, want = edgert_logits(package, ids), hf_logits(model, ids)
    assert rel_err(out, want) < 2e-2
    assert (out.argmax(-1) == want.argmax(-1)).mean() >= 0.9
