"""Convert an 8B-class GGUF and record time and memory: the converter must stream.

Writes a Llama-3-8B-shaped GGUF (32 layers, hidden 4096, FFN 14336, 32/8 heads, vocabulary
128256) of random blocks (finite f16 scales) one tensor at a time, then runs
`edgert convert` on it in a child process, sampling its /proc status: private memory
(RssAnon, what the converter allocates) and file-backed pages (RssFile: the memory-mapped
input and the page cache of what it writes) are reported apart.

    .venv/bin/python bench/convert_8b.py --type Q4_0 --type Q1_0 [--layers 32] [--dir DIR]
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


def tensors(layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int):
    """(GGUF name, numpy shape (rows, cols)) of a Llama 3 8B, embeddings untied."""
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


def random_blocks(shape: tuple[int, int], qtype: T, rng) -> np.ndarray:
    """(rows, cols // block * type_size) uint8 random blocks whose leading f16 d is finite
    (Q4_0, Q8_0, Q1_0, TQ2_0 ... all start with d, except TQ*, handled by zeroing nothing)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d_at = size - 2 if qtype in (T.TQ1_0, T.TQ2_0) else 0  # TQ blocks end with d
    raw[..., d_at:d_at + 2] = np.frombuffer(np.float16(0.02).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(path: Path, qtype: T, layers: int) -> int:
    """Stream a random Llama-3-8B-shaped GGUF to `path`; returns its size in bytes."""
    dims = dict(LLAMA3_8B, layers=layers)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(8192)
    w.add_embedding_length(dims["hidden"])
    w.add_feed_forward_length(dims["ffn"])
    w.add_head_count(dims["heads"])
    w.add_head_count_kv(dims["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_vocab_size(dims["vocab"])
    specs = list(tensors(**dims))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    for name, shape in specs:
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            nbytes = shape[0] * shape[1] // block * size
            w.add_tensor_info(name, (shape[0], shape[1] // block * size), np.dtype(np.uint8),
                              nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape in specs:
        w.write_tensor_data(np.ones(shape, np.float32) if len(shape) == 1
                            else random_blocks(shape, qtype, rng))
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
    ap.add_argument("--layers", type=int, default=LLAMA3_8B["layers"])
    ap.add_argument("--dir", type=Path, default=None, help="Scratch folder (default: a temp dir)")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="edgert-8b-", dir=args.dir))
    gib = 1 << 30
    rows = []
    try:
        for name in args.types or ["Q4_0", "Q1_0"]:
            qtype = T[name]
            src, out = scratch / f"llama3-8b-{name}.gguf", scratch / f"llama3-8b-{name}-mlx"
            t0 = time.perf_counter()
            src_bytes = write_gguf(src, qtype, args.layers)
            write_s = time.perf_counter() - t0
            r = convert(src, out)
            biggest = max(np.prod(s) for _, s in tensors(**dict(LLAMA3_8B, layers=args.layers)))
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            rows.append((name, src_bytes / gib, write_s, r, biggest * size / block / gib))
            shutil.rmtree(out)
            src.unlink()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"Llama-3-8B shapes, {args.layers} layers; edgert convert in a child process")
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
