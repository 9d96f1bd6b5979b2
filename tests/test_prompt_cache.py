"""Prompt caches on disk: `edgert cache-prompt`, `generate --prompt-cache`, `serve --prompt-cache`;
another model's cache is refused; sliding-window caches round-trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import openai
import pytest
from safetensors import safe_open

from edgert.errors import EdgertError
from edgert.generation import generate_step
from edgert.models.cache import make_cache, restore
from edgert.package import load_model
from edgert.prompt_cache import load_prompt_cache, prefill_cache, save_prompt_cache
from test_models import hf_model

SYSTEM = "You are a pirate. Answer every question in the voice of a pirate captain."


def edgert_cli(*args, home) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgert", *map(str, args)], capture_output=True,
                          text=True, env=dict(os.environ, EDGERT_HOME=str(home)))


def test_cache_prompt_then_generate_reuses_it_with_the_same_reply(smollm_package, tmp_path):
    cache_file = tmp_path / "pirate.safetensors"
    made = edgert_cli("cache-prompt", smollm_package, "--system", SYSTEM, "-o", cache_file,
                      home=tmp_path)
    assert made.returncode == 0, made.stderr
    with safe_open(str(cache_file), "np") as f:  # a plain safetensors file naming its model
        meta = f.metadata()
    assert meta["model_name"] == smollm_package.name and meta["format"].startswith("edgert")
    n_cached = len(json.loads(meta["tokens"]))

    args = ["generate", smollm_package, "-p", "Where is the treasure?", "--system", SYSTEM,
            "--temp", "0", "-n", "12", "--json"]
    plain = edgert_cli(*args, home=tmp_path)
    cached = edgert_cli(*args, "--prompt-cache", cache_file, home=tmp_path)
    assert plain.returncode == 0 and cached.returncode == 0, cached.stderr
    p, c = json.loads(plain.stdout), json.loads(cached.stdout)
    assert c["cached_tokens"] == n_cached > 20 and p["cached_tokens"] == 0
    assert c["text"] == p["text"] and c["tokens"] == p["tokens"]


def test_a_cache_for_another_model_is_refused(smollm_package, tmp_path):
    other = tmp_path / "other"
    hf_model("llama", other)
    model, _ = load_model(other)
    save_prompt_cache(tmp_path / "c.safetensors", other, [1, 2, 3], prefill_cache(model, [1, 2, 3]))
    with pytest.raises(EdgertError, match="another model"):
        load_prompt_cache(tmp_path / "c.safetensors", smollm_package)
    r = edgert_cli("generate", smollm_package, "-p", "Hi", "-n", "2", "--prompt-cache",
                   tmp_path / "c.safetensors", home=tmp_path)
    assert r.returncode == 1
    assert "prompt cache for another model" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sliding_window_cache_round_trips(tmp_path):
    hf_model("gemma3", tmp_path / "g")
    model, _ = load_model(tmp_path / "g")
    prompt = [5, 17, 200, 2, 9, 11, 3, 40, 41, 42, 7, 99, 100, 101]  # longer than the window
    file = save_prompt_cache(tmp_path / "g.safetensors", tmp_path / "g", prompt[:11],
                             prefill_cache(model, prompt[:11], step=4))
    assert not (tmp_path / ".g.safetensors.tmp.safetensors").exists()
    tokens, snap = load_prompt_cache(file, tmp_path / "g", make_cache(model))
    assert tokens == prompt[:11]
    cache = make_cache(model)
    restore(cache, snap)
    got = [t for t, _ in generate_step(mx.array(prompt[11:]), model, max_tokens=8,
                                       prompt_cache=cache)]
    want = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=8)]
    assert got == want


def test_serve_starts_with_the_prompt_cache(smollm_package, tmp_path):
    from edgert.tokenizer import load_tokenizer
    from server_util import running_server

    model, _ = load_model(smollm_package)
    tok = load_tokenizer(smollm_package)
    text = tok.apply_chat_template([{"role": "system", "content": SYSTEM}],
                                   add_generation_prompt=False)
    ids = tok.encode(text, add_special_tokens=False)
    file = save_prompt_cache(tmp_path / "s.safetensors", smollm_package, ids,
                             prefill_cache(model, ids))
    del model
    with running_server(smollm_package, model_id="m", prompt_cache=file) as (url, _):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="m", max_tokens=2, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Ahoy?"}])
    assert r.usage.prompt_tokens_details.cached_tokens == len(ids)
