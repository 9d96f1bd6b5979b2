"""Multi-turn chat on a hybrid (Gated DeltaNet) model: time to first token of each turn with
edgert's cache snapshots (each turn feeds only its new tokens) against mlx-lm on the same
package, which cannot trim a recurrent cache and so re-prefills the whole conversation.

A random Qwen3.5 text model (transformers, from a config; no download) with SmolLM2's
tokenizer and chat template, converted by edgert to a 4-bit package that mlx-lm loads too.
Both runtimes are run in turn, interleaved, on the same conversation (greedy replies taken
from edgert's own session so the prompts are identical).

    .venv/bin/python bench/chat_ttft.py [--hidden 1024 --layers 8 --turns 3 --reps 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

SYSTEM = ("You are a careful assistant. Answer in full sentences and explain your reasoning "
          "step by step, citing what you know about geography, history and science. ") * 12
TURNS = ["What is the capital of France?", "Tell me about its history.",
         "And what about its museums?", "Which one should I visit first?"]


def make_package(out: Path, hidden: int, layers: int) -> Path:
    import torch
    import transformers

    from edgert.convert.api import convert_file, ensure_package

    smollm = ensure_package(None, progress=False)
    src = out / "hf"
    torch.manual_seed(0)
    cfg = transformers.Qwen3_5TextConfig(
        hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 128, num_key_value_heads=2, head_dim=128,
        linear_num_key_heads=hidden // 256, linear_num_value_heads=hidden // 128,
        linear_key_head_dim=128, linear_value_head_dim=128, vocab_size=49152,
        tie_word_embeddings=True, max_position_embeddings=32768)
    transformers.Qwen3_5ForCausalLM(cfg).to(torch.float32).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(smollm) / name, src / name)
    return convert_file(src, out / "pkg", progress=False)


def edgert_turns(pkg: Path, turns: int, max_tokens: int) -> tuple[list[float], list[int], list]:
    """TTFT per turn with edgert's ChatSession, the tokens it fed, and the conversation."""
    from edgert.chat import ChatSession
    from edgert.package import load_model
    from edgert.tokenizer import load_tokenizer

    model, _ = load_model(pkg)
    session = ChatSession(model, load_tokenizer(pkg), system=SYSTEM)
    ttft, fed = [], []
    for user in TURNS[:turns]:
        tic = time.perf_counter()
        first = None
        for r in session.reply(user, max_tokens, {"temp": 0.0}):
            if first is None:
                first = time.perf_counter() - tic
        ttft.append(first)
        fed.append(session.fed)
    return ttft, fed, list(session.messages)


def mlx_lm_turns(pkg: Path, messages: list, turns: int) -> tuple[list[float], list[int]]:
    """TTFT per turn with mlx-lm: each turn's whole conversation prompt, prefilled afresh."""
    from mlx_lm import load, stream_generate

    model, tok = load(str(pkg))
    ttft, fed = [], []
    history = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    for i in range(turns):
        history = history + [rest[2 * i]]
        prompt = tok.apply_chat_template(history, add_generation_prompt=True)
        tic = time.perf_counter()
        for _ in stream_generate(model, tok, prompt, max_tokens=1):
            break
        ttft.append(time.perf_counter() - tic)
        fed.append(len(prompt))
        history = history + [rest[2 * i + 1]]
    return ttft, fed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pkg = make_package(Path(tmp), args.hidden, args.layers)
        ours, theirs = [], []
        for _ in range(args.reps):  # interleaved
            e_ttft, e_fed, messages = edgert_turns(pkg, args.turns, args.max_tokens)
            m_ttft, m_fed = mlx_lm_turns(pkg, messages, args.turns)
            ours.append(e_ttft)
            theirs.append(m_ttft)
        print(f"random Qwen3.5 text model, hidden {args.hidden}, {args.layers} layers, 4-bit; "
              f"system prompt + {args.turns} turns, greedy, {args.reps} interleaved reps")
        print("| turn | tokens fed edgert | tokens fed mlx-lm | TTFT edgert s | TTFT mlx-lm s | "
              "ratio |")
        print("|---:|---:|---:|---:|---:|---:|")
        for t in range(args.turns):
            a = statistics.median(r[t] for r in ours)
            b = statistics.median(r[t] for r in theirs)
            print(f"| {t + 1} | {e_fed[t]} | {m_fed[t]} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
