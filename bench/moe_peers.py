"""A mixture-of-experts model for bench_peers.py: edgert against mlx-lm and llama.cpp on one
Qwen3-MoE, interleaved in one run.

Makes a random transformers Qwen3-MoE of the given shape (float16), converts it with
llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist) and quantizes it with
llama-quantize, converts that GGUF with `edgert convert`, then runs bench/bench_peers.py on
the package (edgert and mlx-lm) and on the GGUF (llama.cpp):

    .venv/bin/python bench/moe_peers.py [--dir DIR] [--type Q4_0] [-p 128] [-n 64] [-r 3]

The default shape is a scaled-down Qwen3-30B-A3B (hidden 1024, 8 layers, 32 experts, top 4,
expert FFN 384): it keeps the ratio of active to total expert bytes (1/8 here, 8/128 there)
in the same regime while fitting this machine's build time. Files are kept in DIR and reused.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

SHAPE = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=384,
             num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
             num_experts=32, num_experts_per_tok=4, norm_topk_prob=True,
             tie_word_embeddings=False, max_position_embeddings=4096)


def build(folder: Path, qtype: str) -> tuple[Path, Path]:
    """(package, GGUF) of the random Qwen3-MoE in `folder` (made once)."""
    import torch
    import transformers

    from test_moe_gguf import CONVERT, SDIST, byte_bpe_tokenizer
    from testdata import data_file

    gguf_q = folder / f"moe-{qtype}.gguf"
    package = folder / f"moe-{qtype}-mlx"
    if not (folder / "hf" / "config.json").exists():
        torch.manual_seed(0)
        config = transformers.Qwen3MoeConfig(**SHAPE)
        hf = transformers.Qwen3MoeForCausalLM(config).to(torch.float16).eval()
        hf.save_pretrained(folder / "hf")
        byte_bpe_tokenizer(folder / "hf")
    if not gguf_q.exists():
        with tempfile.TemporaryDirectory() as tmp:
            prefix = f"{SDIST}/vendor/llama.cpp/"
            with tarfile.open(data_file(f"{SDIST}.tar.gz")) as tar:
                tar.extractall(tmp, members=[m for m in tar.getmembers() if m.name.startswith(
                    (prefix + "conversion/", prefix + "gguf-py/", prefix + "convert_hf_to_gguf"))],
                    filter="data")
            (Path(tmp) / "convert.py").write_text(CONVERT)
            f16 = folder / "moe-f16.gguf"
            subprocess.run([sys.executable, f"{tmp}/convert.py", f"{tmp}/{prefix}",
                            str(folder / "hf"), "--outfile", str(f16), "--outtype", "f16"],
                           check=True, capture_output=True)
        subprocess.run([str(data_file("llama.cpp/bin/llama-quantize")), str(f16), str(gguf_q),
                        qtype], check=True, capture_output=True)
        f16.unlink()
    if not package.exists():
        from edgert.convert.api import convert_file

        convert_file(gguf_q, package, progress=False)
    return package, gguf_q


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "edgert-bench-moe")
    ap.add_argument("--type", default="Q4_0", help="llama-quantize type (exact in edgert: "
                    "Q4_0, Q8_0, Q4_K...)")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-r", type=int, default=3)
    args, rest = ap.parse_known_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    package, gguf_q = build(args.dir, args.type)
    sys.exit(subprocess.call([sys.executable, str(HERE / "bench_peers.py"), str(package),
                              "--gguf", str(gguf_q), "-p", str(args.p), "-n", str(args.n),
                              "-r", str(args.r), *rest]))


if __name__ == "__main__":
    main()
