"""Mutation fuzzing of edgert's readers: the GGUF reader, the safetensors (HF folder) reader and
the package loader. Shared by tests/test_fuzz.py (bounded, in the suite) and
tests/fuzz_readers.py (longer runs that add what they find to tests/fuzz_corpus/).

A mutation is data (JSON): byte overwrites {"flips": [[offset, byte], ...]}, an optional
{"truncate": n}, and for packages {"config": {"key" or "quantization.key": value}}; it is
applied to a seed input that is rebuilt deterministically (tiny_gguf, seed 0). The property:
reading the mutated input either succeeds or raises EdgertError; anything else is a finding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgert.errors import EdgertError

CORPUS = Path(__file__).parent / "fuzz_corpus"
KINDS = ("gguf", "safetensors", "package")
# where byte flips land: the header region of each seed, where the structure is
HEADER_BYTES = {"gguf": 4096, "safetensors": 2048, "package": 2048}
CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "intermediate_size", "max_position_embeddings",
               "rope_theta", "rms_norm_eps", "rope_scaling", "tie_word_embeddings",
               "model_type", "quantization.bits", "quantization.group_size", "quantization.mode",
               "quantization")


def make_seeds(folder: Path) -> dict[str, Path]:
    """The seed inputs: a tiny llama GGUF, an HF folder of its tensors as float16 safetensors,
    and the MLX package converted from the GGUF."""
    from edgert.convert.api import convert_file
    from test_convert_gguf import tiny_gguf

    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "seed.gguf"
    if not src.exists():
        tiny_gguf(src, layers=1, hidden=32, heads=2, kv_heads=1, ffn=64, vocab=64)
    pkg = folder / "seed-pkg"
    if not pkg.exists():
        convert_file(src, pkg, progress=False)
    hf = folder / "seed-hf"
    if not hf.exists():
        _hf_from_package(pkg, hf)
    return {"gguf": src, "safetensors": hf, "package": pkg}


def _hf_from_package(pkg: Path, hf: Path) -> None:
    """A float16 HF llama folder with the package's dequantized weights."""
    import mlx.core as mx

    config = json.loads((pkg / "config.json").read_text())
    weights = mx.load(str(pkg / "model.safetensors"))
    q = config.pop("quantization")
    config.pop("quantization_config", None)
    out = {}
    for name, v in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name.removesuffix(".weight")
        if f"{module}.scales" in weights:
            p = q.get(module, q)
            v = mx.dequantize(v, weights[f"{module}.scales"], weights[f"{module}.biases"],
                              group_size=p["group_size"], bits=p["bits"])
        out[name] = v.astype(mx.float16)
    hf.mkdir()
    mx.save_safetensors(str(hf / "model.safetensors"), out)
    (hf / "config.json").write_text(json.dumps(config))


def _flip(path: Path, mutation: dict) -> None:
    data = bytearray(path.read_bytes())
    for offset, byte in mutation.get("flips", []):
        if offset < len(data):
            data[offset] = byte
    if (n := mutation.get("truncate")) is not None:
        data = data[:n]
    path.write_bytes(bytes(data))


def _set(config: dict, key: str, value) -> None:
    head, _, leaf = key.partition(".")
    if leaf:
        if not isinstance(config.get(head), dict):
            config[head] = {}
        config[head][leaf] = value
    elif value is None:
        config.pop(head, None)
    else:
        config[head] = value


def apply(kind: str, seed: Path, mutation: dict, work: Path) -> Path:
    """A fresh copy of `seed` under `work` with `mutation` applied."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if kind == "gguf":
        target = work / "m.gguf"
        shutil.copy(seed, target)
        _flip(target, mutation)
        return target
    target = work / "m"
    shutil.copytree(seed, target)
    _flip(target / "model.safetensors", mutation)
    if mutation.get("config"):
        config = json.loads((target / "config.json").read_text())
        for key, value in mutation["config"].items():
            _set(config, key, json.loads(json.dumps(value)))  # no shared objects
        (target / "config.json").write_text(json.dumps(config))
    return target


def read(kind: str, path: Path) -> None:
    """Read `path` as edgert would, to the end (every tensor mapped; the model built)."""
    if kind == "gguf":
        from edgert.convert.gguf_reader import read_gguf

        cm = read_gguf(path)
        for _ in cm.tensors():
            pass
    elif kind == "safetensors":
        from edgert.convert.hf_reader import read_hf_folder

        cm = read_hf_folder(path)
        for _ in cm.tensors():
            pass
    else:
        from edgert.package import load_model

        load_model(path, parallel=False)


def outcome(kind: str, path: Path) -> str:
    """"ok" or "refused" (an EdgertError); any other exception propagates (a finding)."""
    try:
        read(kind, path)
    except EdgertError as e:
        assert "\n" not in str(e), str(e)
        return "refused"
    return "ok"


def corpus(kind: str) -> list[tuple[str, dict]]:
    """(file name, mutation) of every kept case of `kind`."""
    folder = CORPUS / kind
    return [(f.name, json.loads(f.read_text())) for f in sorted(folder.glob("*.json"))]


def keep(kind: str, mutation: dict, note: str) -> Path:
    """Add a found case to the corpus (a regression test from then on)."""
    folder = CORPUS / kind
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}-{len(list(folder.glob('*.json'))):03d}.json"
    path.write_text(json.dumps(dict(mutation, note=note), indent=1) + "\n")
    return path
