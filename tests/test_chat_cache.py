"""ChatSession reuses its cache across turns: by trimming (all-KV models) or, where a layer cannot
be trimmed (Gemma 3's rotating sliding-window caches here; recurrent layers alike), by
restoring snapshots. Either way each turn gives exactly the tokens of a fresh run over the
whole conversation, and feeds only what is new."""

from __future__ import annotations

import shutil

import mlx.core as mx
import pytest
import torch
import transformers

from edgert.chat import ChatSession
from edgert.generation import generate_step
from edgert.models.cache import trimmable
from edgert.package import load_model
from edgert.tokenizer import load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TURNS = ["Hi there, who are you?", "Tell me about the sea.", "And the mountains?"]


@pytest.fixture(scope="module")
def gemma3_chat(smollm_package, tmp_path_factory):
    """A random Gemma 3 (window 8, shorter than every prompt) with SmolLM2's tokenizer."""
    from edgert.convert.api import convert_file

    src = tmp_path_factory.mktemp("gemma3-src")
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=49152, sliding_window=8,
        sliding_window_pattern=2, query_pre_attn_scalar=16, max_position_embeddings=2048)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(src)
    for name in TOKENIZER_FILES:
        shutil.copy(smollm_package / name, src / name)
    out = convert_file(src, tmp_path_factory.mktemp("gemma3") / "pkg", bits=0, progress=False)
    return load_model(out)[0], load_tokenizer(out)


def fresh_tokens(model, tokenizer, messages: list[dict], n: int) -> list[int]:
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                           add_special_tokens=False)
    out = []
    for token, _ in generate_step(mx.array(ids, dtype=mx.uint32), model, max_tokens=n):
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
    return out


def check_three_turns(model, tokenizer):
    session = ChatSession(model, tokenizer)
    prev_len = 0
    for i, user in enumerate(TURNS):
        tokens = [r.token for r in session.reply(user, 10, {"temp": 0.0})
                  if r.finish_reason is None]
        history = session.messages[:-1]  # this turn's prompt: everything before the reply
        assert tokens == fresh_tokens(model, tokenizer, history, 10)
        n_prompt = len(tokenizer.encode(tokenizer.apply_chat_template(
            history, add_generation_prompt=True), add_special_tokens=False))
        if i:
            assert session.fed <= n_prompt - prev_len, (session.fed, n_prompt, prev_len)
        else:
            assert session.fed == n_prompt
        prev_len = n_prompt
    return session


def test_rotating_caches_chat_by_snapshots(gemma3_chat):
    model, tokenizer = gemma3_chat
    session = check_three_turns(model, tokenizer)
    assert not trimmable(session.cache) and session.snapshots


def test_kv_caches_chat_by_trimming(smollm_package):
    model, _ = load_model(smollm_package)
    session = check_three_turns(model, load_tokenizer(smollm_package))
    assert trimmable(session.cache) and not session.snapshots
