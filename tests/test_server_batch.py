"""Batched decode in `edgert serve` (edgert.batching), driven by the official `openai` client:
concurrent greedy streams decoded in one model call per step each equal `edgert generate`
alone; a stream cancelled mid-batch leaves the others unchanged; per-request sampling, stop
strings, logprobs and grammars give what the same request gives alone; /health shows the
batch size reached. Plus the batched cache itself against single-row decoding."""

from __future__ import annotations

import json
import threading

import jsonschema
import openai
import pytest

from server_util import get_json, running_server, wait_idle

MODEL = "smollm"
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.",
           "List three colours, one per line.", "Hi"]


@pytest.fixture(scope="module")
def served(smollm_package):
    with running_server(smollm_package, model_id=MODEL, max_active=4) as (url, engine):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
        yield url, engine, client


@pytest.fixture(scope="module")
def alone(smollm_package):
    """Greedy text of edgert.generate (the library under `edgert generate`) for a chat."""
    from edgert.generation import stream_generate
    from edgert.package import load_model
    from edgert.tokenizer import load_tokenizer

    model, _ = load_model(smollm_package)
    tok = load_tokenizer(smollm_package)

    def run(question: str, n: int) -> str:
        ids = tok.encode(tok.apply_chat_template(user(question), add_generation_prompt=True),
                         add_special_tokens=False)
        return "".join(r.text for r in stream_generate(model, tok, ids, n, temp=0.0))

    return run


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def concurrently(fns: list) -> list:
    """Run the callables at once (a barrier before each starts); their results in order."""
    barrier, out, errors = threading.Barrier(len(fns)), [None] * len(fns), []

    def go(i, fn):
        barrier.wait()
        try:
            out[i] = fn()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=go, args=(i, f)) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    return out


def stream_text(client, question: str, n: int, stop_after: int | None = None) -> str:
    stream = client.chat.completions.create(model=MODEL, messages=user(question), temperature=0,
                                            max_tokens=n, stream=True)
    parts = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            if stop_after is not None and len(parts) >= stop_after:
                stream.close()
                break
    return "".join(parts)


def test_concurrent_greedy_streams_each_equal_generate_alone(served, alone):
    url, engine, client = served
    n = 16
    steps = engine.batched_steps
    got = concurrently([lambda q=q: stream_text(client, q, n) for q in PROMPTS])
    assert got == [alone(q, n) for q in PROMPTS]
    assert "Paris" in got[0]
    h = wait_idle(url)
    assert h["batched"] and h["max_batch_size"] > 1, h
    # fewer model calls than tokens: several rows shared each step
    assert h["batched_steps"] - steps < sum(len(engine.tokenizer.encode(t)) for t in got)


def test_a_stream_cancelled_mid_batch_leaves_the_others_unchanged(served, alone):
    url, engine, client = served
    n = 20
    fns = [lambda: stream_text(client, PROMPTS[1], n),
           lambda: stream_text(client, PROMPTS[2], n, stop_after=3),  # hangs up early
           lambda: stream_text(client, PROMPTS[0], n)]
    got = concurrently(fns)
    assert got[0] == alone(PROMPTS[1], n) and got[2] == alone(PROMPTS[0], n)
    assert alone(PROMPTS[2], n).startswith(got[1]) and got[1]
    h = wait_idle(url)
    assert h["batch_size"] == 0 and h["max_batch_size"] > 1


def test_each_row_keeps_its_own_sampling_stop_logprobs_and_grammar(served):
    """Four different requests sent together equal the same requests sent one at a time."""
    url, engine, client = served
    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"], "additionalProperties": False}
    requests = [
        dict(messages=user(PROMPTS[1]), temperature=0.9, top_p=0.9, seed=7, max_tokens=20),
        dict(messages=user(PROMPTS[2]), temperature=0, stop=["\n"], max_tokens=24),
        dict(messages=user(PROMPTS[0]), temperature=0, logprobs=True, top_logprobs=3,
             max_tokens=10),
        dict(messages=user("Give the capital of France as JSON."), temperature=0,
             max_tokens=30, response_format={"type": "json_schema", "json_schema": {
                 "name": "city", "schema": schema}}),
    ]

    def ask(kw):
        r = client.chat.completions.create(model=MODEL, **kw)
        c = r.choices[0]
        lps = None if c.logprobs is None else [
            (e.token, round(e.logprob, 3), [t.token for t in e.top_logprobs])
            for e in c.logprobs.content]
        return c.message.content, c.finish_reason, r.usage.completion_tokens, lps

    one_by_one = [ask(kw) for kw in requests]
    wait_idle(url)
    before = engine.max_batch
    engine.max_batch = 0
    together = concurrently([lambda kw=kw: ask(kw) for kw in requests])
    assert engine.max_batch > 1
    engine.max_batch = max(before, engine.max_batch)
    assert together == one_by_one
    assert one_by_one[1][1] == "stop" and "\n" not in one_by_one[1][0]
    assert len(one_by_one[2][3]) == one_by_one[2][2] > 3  # an entry per token
    assert all(len(e[2]) == 3 for e in one_by_one[2][3])
    jsonschema.validate(json.loads(one_by_one[3][0]), schema)


def test_turn_taking_where_the_cache_cannot_be_batched(smollm_package):
    """--kv-bits (quantized KV) is served by turns, one token per request each."""
    with running_server(smollm_package, model_id=MODEL, max_active=2, kv_bits=8) as (url, e):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
        got = concurrently([lambda q=q: stream_text(c, q, 6) for q in PROMPTS[:2]])
        assert all(got)
        h = get_json(f"{url}/health")
        assert not h["batched"] and h["max_batch_size"] == 0


def test_batched_rows_give_the_logits_of_each_row_alone():
    """A random Llama: rows of different prompt lengths joining and leaving a batch; every
    step's logits per row against the row decoded alone through KVCache."""
    import mlx.core as mx

    from edgert.batching import Batch, batchable
    from edgert.models import llama
    from edgert.models.cache import make_cache

    mx.random.seed(3)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2,
                           intermediate_size=128, num_attention_heads=4, vocab_size=97,
                           num_key_value_heads=2, max_position_embeddings=256)
    model = llama.Model(args)
    assert batchable(model)
    prompts = [[1, 5, 9, 2, 44, 3, 8], [7, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    steps = 5

    def alone(ids):  # the logits of `steps` greedy steps after the prompt
        cache, out, y = make_cache(model), [], None
        logits = model(mx.array(ids)[None], cache=cache)[:, -1, :]
        for _ in range(steps):
            out.append(logits[0])
            y = int(logits.argmax(-1).item())
            logits = model(mx.array([[y]]), cache=cache)[:, -1, :]
        return out

    want = [alone(p) for p in prompts]
    batch, t = Batch(), 0
    while t < len(prompts) or batch.rows:
        if t < len(prompts):  # row t joins after t steps of the others
            ids = prompts[t]
            cache = make_cache(model)
            model(mx.array(ids[:-1])[None], cache=cache)
            batch.add({"i": t, "next": ids[-1], "step": 0}, cache)
        y = mx.array([[r["next"]] for r in batch.rows])  # (B, 1)
        logits = model(y, cache=batch.layers)[:, -1, :]
        for b, r in enumerate(list(batch.rows)):
            ref = want[r["i"]][r["step"]]
            assert mx.allclose(logits[b], ref, atol=1e-5, rtol=1e-5).item(), (r, t)
            r["next"] = int(logits[b].argmax().item())
            r["step"] += 1
            if r["step"] == steps:
                batch.remove(r)
        t += 1
    assert batch.layers is None
