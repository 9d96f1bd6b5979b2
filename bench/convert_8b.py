"""Convert a large GGUF and record time and memory: the converter must stream.

Writes a GGUF of random blocks (finite f16 scales) one tensor at a time, then runs
`edgert convert` on it in a child process, sampling its /proc status: private memory
(RssAnon, what the converter allocates) and file-backed pages (RssFile: the memory-mapped
input and the page cache of what it writes) are reported apart. Shapes:

- `llama3-8b` (default): 32 layers, hidden 4096, FFN 14336, 32/8 heads, vocabulary 128256,
  every matrix of one `--type`.
- `qwen3-30b-a3b`: llama.cpp `qwen3moe`, 48 layers of 128 experts (FFN 768, 8 per token),
  hidden 2048, 32/4 heads of 128, vocabulary 151936; `--type Q4_K_M` gives llama-quantize's
  Q4_K_M mix (Q4_K, with Q6_K for attn_v / ffn_down(_exps) on its "more bits" layers and
  for the output; the router F32, as llama-quantize leaves it): ~17 GB.

    .venv/bin/python bench/convert_8b.py --type Q4_0 --type Q1_0 [--layers 32] [--dir DIR]
    .venv/bin/python bench/convert_8b.py --shape qwen3-30b-a3b --type Q4_K_M --dir /work
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

LLAMA3_8B = dict(hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256, layers=32)
QWEN3_30B_A3B = dict(hidden=2048, ffn=768, heads=32, kv_heads=4, head_dim=128, vocab=151936,
                     layers=48, experts=128, used=8)


def llama_tensors(layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int):
    """(GGUF name, numpy shape) of a Llama 3 8B, embeddings untied."""
    hd = hidden // heads
    yield "token_embd.weight", (vocab, hidden)
    for i in range(layers):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (hidden,)
        yield b + "attn_q.weight", (hidden, hidden)
        yield b + "attn_k.weight", (kv_heads * hd, hidden)
        yield b + "attn_v.weight", (kv_heads * hd, hidden)
        yield b + "attn_output.weight", (hidden, hidden)
        yield b + "ffn_norm.weight", (hidden,)
        yield b + "ffn_gate.weight", (ffn, hidden)
        yield b + "ffn_up.weight", (ffn, hidden)
        yield b + "ffn_down.weight", (hidden, ffn)
    yield "output_norm.weight", (hidden,)
    yield "output.weight", (vocab, hidden)


def qwen3moe_tensors(layers: int, hidden: int, ffn: int, heads: int, kv_heads: int,
                     head_dim: int, vocab: int, experts: int, used: int):
    """(GGUF name, numpy shape) of a Qwen3-30B-A3B: experts stacked (E, out, in)."""
    yield "token_embd.weight", (vocab, hidden)
    for i in range(layers):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (hidden,)
        yield b + "attn_q.weight", (heads * head_dim, hidden)
        yield b + "attn_k.weight", (kv_heads * head_dim, hidden)
        yield b + "attn_v.weight", (kv_heads * head_dim, hidden)
        yield b + "attn_output.weight", (hidden, heads * head_dim)
        yield b + "attn_q_norm.weight", (head_dim,)
        yield b + "attn_k_norm.weight", (head_dim,)
        yield b + "ffn_norm.weight", (hidden,)
        yield b + "ffn_gate_inp.weight", (experts, hidden)
        yield b + "ffn_gate_exps.weight", (experts, ffn, hidden)
        yield b + "ffn_up_exps.weight", (experts, ffn, hidden)
        yield b + "ffn_down_exps.weight", (experts, hidden, ffn)
    yield "output_norm.weight", (hidden,)
    yield "output.weight", (vocab, hidden)


def more_bits(layer: int, layers: int) -> bool:
    """llama-quantize's use_more_bits: the layers Q4_K_M gives Q6_K attn_v / ffn_down."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(name: str, qtype: str, layers: int) -> T:
    """The GGML type of `name` in a file of `qtype` (a GGML type, or the Q4_K_M mix)."""
    if qtype != "Q4_K_M":
        return T.F32 if "gate_inp" in name else T[qtype]
    if "gate_inp" in name:
        return T.F32
    if name == "output.weight":
        return T.Q6_K
    if name.startswith("blk.") and ("attn_v" in name or "ffn_down" in name):
        return T.Q6_K if more_bits(int(name.split(".")[1]), layers) else T.Q4_K
    return T.Q4_K


# where each block type keeps its f16 scales (d, and dmin for the K-quants with mins)
F16_SCALES = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q2_K: (80, 82), T.Q6_K: (208,),
              T.TQ1_0: (52,), T.TQ2_0: (64,)}


def random_blocks(shape: tuple[int, ...], qtype: T, rng) -> np.ndarray:
    """(..., cols // block * type_size) uint8 random blocks whose f16 scales are finite."""
    if qtype == T.F32:
        return rng.standard_normal(shape, dtype=np.float32) * 0.02
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    *lead, cols = shape
    raw = rng.integers(0, 256, (*lead, cols // block, size), dtype=np.uint8)
    for at in F16_SCALES.get(qtype, (0,)):
        raw[..., at:at + 2] = np.frombuffer(np.float16(0.02).tobytes(), np.uint8)
    return raw.reshape(*lead, -1)


def tensor_bytes(name: str, shape: tuple[int, ...], qtype: str, layers: int) -> int:
    """Bytes of one tensor in the GGUF."""
    t = T.F32 if len(shape) == 1 else tensor_type(name, qtype, layers)
    block, size = gguf.GGML_QUANT_SIZES[t]
    return int(np.prod(shape)) // block * size


SHAPES = {"llama3-8b": ("llama", LLAMA3_8B, llama_tensors),
          "qwen3-30b-a3b": ("qwen3moe", QWEN3_30B_A3B, qwen3moe_tensors)}


def shape_tensors(shape: str, layers: int):
    arch, dims, fn = SHAPES[shape]
    return list(fn(**dict(dims, layers=layers)))


def write_gguf(path: Path, qtype: str, layers: int, shape: str = "llama3-8b") -> int:
    """Stream a random GGUF of `shape` to `path`; returns its size in bytes."""
    arch, dims, _ = SHAPES[shape]
    dims = dict(dims, layers=layers)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(layers)
    w.add_context_length(8192)
    w.add_embedding_length(dims["hidden"])
    w.add_head_count(dims["heads"])
    w.add_head_count_kv(dims["kv_heads"])
    w.add_layer_norm_rms_eps(1e-6 if "experts" in dims else 1e-5)
    w.add_vocab_size(dims["vocab"])
    if "experts" in dims:
        w.add_rope_freq_base(1e6)
        w.add_key_length(dims["head_dim"])
        w.add_value_length(dims["head_dim"])
        w.add_feed_forward_length(6144)
        w.add_expert_count(dims["experts"])
        w.add_expert_used_count(dims["used"])
        w.add_expert_feed_forward_length(dims["ffn"])
    else:
        w.add_rope_freq_base(500000.0)
        w.add_feed_forward_length(dims["ffn"])
    specs = shape_tensors(shape, layers)
    for name, shp in specs:
        t = T.F32 if len(shp) == 1 else tensor_type(name, qtype, layers)
        if t == T.F32:
            w.add_tensor_info(name, shp, np.dtype(np.float32), int(np.prod(shp)) * 4)
        else:
            block, size = gguf.GGML_QUANT_SIZES[t]
            byte_shape = (*shp[:-1], shp[-1] // block * size)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                              raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shp in specs:
        w.write_tensor_data(np.ones(shp, np.float32) if len(shp) == 1
                            else random_blocks(shp, tensor_type(name, qtype, layers), rng))
    w.close()
    return path.stat().st_size


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def convert(src: Path, out: Path) -> dict:
    """Run `edgert convert` in a child process; wall time and peak memory figures."""
    cmd = [sys.executable, "-m", "edgert", "convert", str(src), "-o", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak: dict[str, int] = {}

    def sample():
        while proc.poll() is None:
            for k, v in _status(proc.pid).items():
                peak[k] = max(peak.get(k, 0), v)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"edgert convert failed: {stderr.strip()}")
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"seconds": seconds, "peak_anon": peak.get("RssAnon", 0),
            "peak_file": peak.get("RssFile", 0), "peak_rss": peak.get("VmHWM", 0),
            "package_bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", dest="types", action="append", default=None,
                    help="GGML type (repeatable; default Q4_0 and Q1_0)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None, help="default: the shape's own")
    ap.add_argument("--dir", type=Path, default=None, help="Scratch folder (default: a temp dir)")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="edgert-8b-", dir=args.dir))
    gib = 1 << 30
    rows = []
    try:
        layers = args.layers or SHAPES[args.shape][1]["layers"]
        for name in args.types or ["Q4_0", "Q1_0"]:
            src, out = scratch / f"{args.shape}-{name}.gguf", scratch / f"{args.shape}-{name}-mlx"
            t0 = time.perf_counter()
            src_bytes = write_gguf(src, name, layers, args.shape)
            write_s = time.perf_counter() - t0
            print(f"wrote {src.name}: {src_bytes / gib:.2f} GiB in {write_s:.0f} s", flush=True)
            r = convert(src, out)
            biggest = max(tensor_bytes(n, s, name, layers) for n, s in
                          shape_tensors(args.shape, layers))
            rows.append((name, src_bytes / gib, write_s, r, biggest / gib))
            shutil.rmtree(out)
            src.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{args.shape} shapes, {layers} layers; edgert convert in a child process")
    print("| type | GGUF GiB | convert s | package GiB | peak private (RssAnon) GiB "
          "| peak file-backed GiB | peak RSS GiB | largest tensor GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, src_gib, _, r, big in rows:
        print(f"| {name} | {src_gib:.2f} | {r['seconds']:.1f} | {r['package_bytes'] / gib:.2f} | "
              f"{r['peak_anon'] / gib:.2f} | {r['peak_file'] / gib:.2f} | "
              f"{r['peak_rss'] / gib:.2f} | {big:.2f} |")


if __name__ == "__main__":
    os.environ.setdefault("NO_COLOR", "1")
    main()
