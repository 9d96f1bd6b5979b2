"""The prefix cache across requests (edgert.prefix_cache): every cache kind, greedy tokens equal
to plain generation, LRU bounded in bytes; and the server reusing it on a sliding-window model
with streamed requests."""

from __future__ import annotations

import shutil

import mlx.core as mx
import openai
import pytest

from edgert.generation import generate_step
from edgert.models.cache import KVCache, RecurrentCache, make_cache
from edgert.package import load_model
from edgert.prefix_cache import PrefixCache
from test_models import hf_model


def greedy(model, ids: list[int], n: int, cache=None) -> tuple[list[int], list]:
    out = list(generate_step(mx.array(ids, dtype=mx.uint32), model, max_tokens=n,
                             prompt_cache=cache, prefill_step_size=8))
    return [t for t, _ in out], [lp for _, lp in out]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # KV; rotating (window 8) + KV
def test_reused_prefix_gives_the_tokens_of_plain_generation(arch, tmp_path):
    hf_model(arch, tmp_path)
    model, _ = load_model(tmp_path)
    prompt = [5, 17, 200, 2, 9, 11, 3, 40, 41, 42, 7, 99, 100, 101, 8, 6, 66, 12]
    first = prompt[:12] + [250, 251, 252]  # shares 12 tokens with `prompt`
    prefix = PrefixCache(model)

    cache, reused = prefix.fetch(first)
    assert reused == 0
    tokens, _ = greedy(model, first, 6, cache)
    trim = all(c.trimmable for c in cache)
    offset = cache[0].offset
    prefix.store((first + tokens)[:offset], cache)

    want, want_lp = greedy(model, prompt, 10)
    cache, reused = prefix.fetch(prompt)
    if trim:  # KV: any shared prefix, trimmed back to it
        assert reused == 12
    else:  # a sliding window cannot be trimmed: only whole entries that prefix the prompt
        assert reused == 0
        prefix.store(prompt[:12], _fed(model, prompt[:12]))
        cache, reused = prefix.fetch(prompt)
        assert reused == 12
    got, got_lp = greedy(model, prompt[reused:], 10, cache)
    assert got == want
    for a, b in zip(got_lp, want_lp):
        assert mx.allclose(a, b, atol=1e-4).item()
    # the entry is unchanged by the request that reused it: again the same tokens
    cache, again = prefix.fetch(prompt)
    assert again >= reused and greedy(model, prompt[again:], 10, cache)[0] == want


def _fed(model, ids: list[int]) -> list:
    cache = make_cache(model)
    model(mx.array(ids)[None], cache=cache)
    return cache


class Recurrent:
    """A stand-in model with a recurrent layer and a KV layer: state = 2 * state + token."""

    def make_cache(self):
        return [RecurrentCache(1), KVCache()]

    def feed(self, cache, ids: list[int]) -> None:
        r, kv = cache
        for t in ids:
            prev = r[0] if r[0] is not None else mx.zeros((1,))
            r[0] = prev * 2 + t
            r.advance(1)
            x = mx.full((1, 1, 1, 2), float(t))
            kv.update_and_fetch(x, x)


def test_recurrent_caches_reuse_only_whole_entries_and_stay_unchanged():
    model = Recurrent()
    prefix = PrefixCache(model, max_bytes=1 << 20)
    cache = model.make_cache()
    model.feed(cache, [1, 2])
    prefix.store([1, 2], cache)
    model.feed(cache, [3])
    prefix.store([1, 2, 3], cache)
    assert len(prefix) == 2  # not trimmable: both kept

    got, n = prefix.fetch([1, 2, 3, 4])
    assert n == 3 and got[0][0].item() == ((1 * 2 + 2) * 2 + 3) and got[1].offset == 3
    model.feed(got, [4])  # a request goes on from the restored state...
    again, n = prefix.fetch([1, 2, 3, 4])
    assert n == 3 and again[0][0].item() == 11  # ...and the entry is as it was
    assert again[1].keys[0, 0, :3, 0].tolist() == [1, 2, 3]
    _, n = prefix.fetch([1, 2, 9])  # diverges after 2: the [1, 2] entry
    assert n == 2
    _, n = prefix.fetch([1, 2])  # never the whole prompt: its last token gives the logits
    assert n == 0


def test_kv_entries_trim_without_changing_the_snapshot():
    prefix = PrefixCache(None)
    cache = [KVCache()]
    x = mx.ones((1, 1, 5, 2))
    cache[0].update_and_fetch(x, x)
    prefix.store([1, 2, 3, 4, 5], cache)
    prefix.model = type("M", (), {"make_cache": lambda self: [KVCache()]})()
    got, n = prefix.fetch([1, 2, 3, 7, 8])
    assert n == 3 and got[0].offset == 3
    z = mx.zeros((1, 1, 1, 2))
    got[0].update_and_fetch(z, z)  # writes into the buffer it shares with the entry
    again, _ = prefix.fetch([1, 2, 3, 4, 5, 6])
    assert again[0].keys[0, 0, :, 0].tolist() == [1, 1, 1, 1, 1]


def test_lru_is_bounded_in_bytes():
    model = type("M", (), {"make_cache": lambda self: [KVCache()]})()
    one = KVCache()
    x = mx.ones((1, 1, 3, 4))
    one.update_and_fetch(x, x)
    size = one.nbytes
    prefix = PrefixCache(model, max_bytes=int(2.5 * size))
    for i in range(4):  # four unrelated prompts: only the two most recent stay
        c = [KVCache()]
        c[0].update_and_fetch(x, x)
        prefix.store([100 + i, 1, 2], c)
    assert len(prefix) == 2 and prefix.nbytes == 2 * size
    assert prefix.fetch([103, 1, 2, 5])[1] == 3 and prefix.fetch([100, 1, 2, 5])[1] == 0


@pytest.fixture(scope="module")
def sliding_package(smollm_package, tmp_path_factory):
    """A random-initialised Gemma 3 (sliding window 8) with SmolLM2's tokenizer and template."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("gemma3-sliding")
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=512,
        sliding_window=8, sliding_window_pattern=2, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm_package / name).is_file():
            shutil.copy(smollm_package / name, folder / name)
    return folder


def test_server_reuses_prefixes_on_a_sliding_window_model_streamed(sliding_package):
    from edgert.tokenizer import load_tokenizer
    from server_util import running_server

    model, _ = load_model(sliding_package)
    tok = load_tokenizer(sliding_package)
    system = {"role": "system", "content": "Answer in one word. " * 6}
    turns = [[system, {"role": "user", "content": q}] for q in ("Colour?", "Fruit?")]
    want = []
    for messages in turns:
        ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
        want.append(tok.decode([t for t in greedy(model, ids, 8)[0]]))
    with running_server(sliding_package, model_id="g") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        got, cached = [], []
        for messages in turns + turns:
            chunks = list(client.chat.completions.create(
                model="g", messages=messages, temperature=0, max_tokens=8, stream=True,
                stream_options={"include_usage": True}))
            got.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
            cached.append(chunks[-1].usage.prompt_tokens_details.cached_tokens)
            prompt_tokens = chunks[-1].usage.prompt_tokens
    assert got == want + want
    assert cached[0] == 0
    assert cached[2] == cached[3] == prompt_tokens - 1  # whole prompts again: all but the last
    # a new question after the same system prompt: the snapshot where the last message starts
    n_system = len(tok.encode(tok.apply_chat_template([system], add_generation_prompt=False),
                              add_special_tokens=False))
    assert cached[1] == n_system


def test_bounded_load_every_request_answered_or_refused_and_memory_back(sliding_package):
    """bench/load_test.py, small: 60 requests from 4 clients (streamed, cancelled mid-stream,
    malformed), a queue of 2 so that some are refused with 503."""
    import sys
    from pathlib import Path

    from server_util import running_server

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from load_test import run_load

    with running_server(sliding_package, model_id="g", max_active=2, max_queue=2,
                        prefix_cache_bytes=4 << 20) as (url, _):
        report = run_load(url, "g", requests=60, clients=4, max_tokens=4)
    assert report["ok"], report
    # how many are refused for a full queue depends on timing; each one is accounted for
    assert report["outcomes"].get("answered", 0) > 0 and report["outcomes"].get("refused-bad")
    assert sum(report["outcomes"].values()) == 60
    assert report["memory_growth_bytes"] <= 1 << 20, report
    assert report["prefix_cache_bytes"] <= 4 << 20


def test_hybrid_recurrent_model_reuses_prefixes_with_the_same_tokens(tmp_path):
    """Qwen 3.5 (Gated DeltaNet layers with RecurrentCache + full attention): what mlx-lm's
    server loses every turn (mlx-lm #980, #1162) is reused here, with the tokens of plain
    generation."""
    from test_qwen3_5 import hf_qwen3_5

    hf_qwen3_5("text-irregular-untied", tmp_path)
    model, _ = load_model(tmp_path)
    assert {type(c).__name__ for c in make_cache(model)} == {"RecurrentCache", "KVCache"}
    prompt = [5, 17, 200, 2, 9, 11, 3, 40, 41, 42, 7, 99, 100, 101, 8, 6]
    prefix = PrefixCache(model)
    first = prompt[:12] + [250, 251]
    cache, _ = prefix.fetch(first)
    tokens, _ = greedy(model, first, 6, cache)  # a request whose reply ends its turn
    prefix.store(prompt[:12], _fed(model, prompt[:12]))  # the snapshot at its last message
    want, want_lp = greedy(model, prompt, 8)
    cache, reused = prefix.fetch(prompt)
    assert reused == 12
    got, got_lp = greedy(model, prompt[reused:], 8, cache)
    assert got == want
    assert all(mx.allclose(a, b, atol=1e-4).item() for a, b in zip(got_lp, want_lp))
