"""`edgert serve` driven by the official `openai` client on a loopback port: replies equal
`edgert generate` for the same greedy request, stop strings, cached tokens, bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

from server_util import get_json, post_raw, running_server, wait_idle

MODEL = "smollm"
QUESTION = "What is the capital of France?"
STORY = "Write a short story about a robot who learns to paint."


@pytest.fixture(scope="module")
def server(smollm_package):
    with running_server(smollm_package, model_id=MODEL, max_active=4) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def reference(smollm_package):
    """Greedy replies of edgert.generate (library, this thread's own model)."""
    from edgert.package import load_model
    from edgert.tokenizer import load_tokenizer
    from edgert.generation import stream_generate

    model, _ = load_model(smollm_package)
    tok = load_tokenizer(smollm_package)

    def run(ids: list[int], max_tokens: int) -> tuple[str, list[int]]:
        text, tokens = [], []
        for r in stream_generate(model, tok, ids, max_tokens, temp=0.0):
            text.append(r.text)
            if r.finish_reason is None:
                tokens.append(r.token)
        return "".join(text), tokens

    def chat_ids(messages: list[dict]) -> list[int]:
        return tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)

    run.chat_ids, run.tok = chat_ids, tok
    return run


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_capital_of_france_is_paris(client):
    r = client.chat.completions.create(model=MODEL, messages=user(QUESTION), temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


def test_chat_streamed_and_not_equal_edgert_generate(client, reference, smollm_package, tmp_path):
    n = 24
    want_text, want_tokens = reference(reference.chat_ids(user(STORY)), n)
    cli = subprocess.run([sys.executable, "-m", "edgert", "generate", str(smollm_package),
                          "-p", STORY, "--temp", "0", "-n", str(n), "--json"],
                         capture_output=True, text=True, env=dict(os.environ,
                                                                  EDGERT_HOME=str(tmp_path)))
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["text"] == want_text

    r = client.chat.completions.create(model=MODEL, messages=user(STORY), temperature=0,
                                       max_tokens=n)
    assert r.choices[0].message.content == want_text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == n == len(want_tokens)
    assert r.usage.prompt_tokens == len(reference.chat_ids(user(STORY)))

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=user(STORY), temperature=0, max_completion_tokens=n, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want_text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    # the same request again: its whole prompt but the last token comes from the prefix cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1


def test_completions_equal_generate(client, reference):
    prompt = "The three primary colours are"
    want_text, _ = reference(reference.tok.encode(prompt), 16)
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16)
    assert r.choices[0].text == want_text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=16, stream=True))
    assert streamed == want_text


def test_stop_strings_cut_exactly_across_tokens(client, reference):
    ids = reference.chat_ids(user(STORY))
    full, tokens = reference(ids, 40)
    # a stop string that starts inside one token and ends inside a later one
    pieces = [reference.tok.decode(tokens[:i]) for i in range(len(tokens) + 1)]
    i = next(i for i in range(8, len(tokens)) if len(pieces[i + 1]) - len(pieces[i]) >= 3)
    start = len(pieces[i]) + 1
    stop = full[start:len(pieces[i + 2]) - 1]
    assert len(stop) >= 2 and full.index(stop) == start
    r = client.chat.completions.create(model=MODEL, messages=user(STORY), temperature=0,
                                       max_tokens=40, stop=[stop, "\u2603 never"])
    assert r.choices[0].message.content == full[:start]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=user(STORY), temperature=0,
                                              max_tokens=40, stop=stop, stream=True)
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == full[:start]
    assert chunks[-1].finish_reason == "stop"


def test_cached_tokens_grow_on_a_repeated_prefix(client):
    system = {"role": "system", "content": "You are a terse assistant. " * 20}
    first = client.chat.completions.create(
        model=MODEL, messages=[system, *user("Name a colour.")], temperature=0, max_tokens=8)
    second = client.chat.completions.create(
        model=MODEL, messages=[system, *user("Name a fruit.")], temperature=0, max_tokens=8)
    c1 = first.usage.prompt_tokens_details.cached_tokens
    c2 = second.usage.prompt_tokens_details.cached_tokens
    assert c2 > c1 and c2 > 100  # the system prompt (20 x 6 tokens) came from the cache
    history = [system, *user("Name a fruit."),
               {"role": "assistant", "content": second.choices[0].message.content},
               *user("And another one?")]
    third = client.chat.completions.create(model=MODEL, messages=history, temperature=0,
                                           max_tokens=8)
    assert third.usage.prompt_tokens_details.cached_tokens > second.usage.prompt_tokens - 2


def test_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=user(QUESTION), temperature=0,
                                       max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert e.logprob <= 0 and e.top_logprobs[0].logprob >= e.top_logprobs[2].logprob


def test_seeded_sampling_repeats_and_defaults_sample(client):
    kw = dict(model=MODEL, messages=user(STORY), max_tokens=12, temperature=1.0, top_p=0.9,
              extra_body={"top_k": 50, "min_p": 0.01})
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert a == b
    # no sampling fields: the model ships no generation_config, so llama.cpp's defaults
    # (temperature 0.8) apply and different seeds give different stories
    kw = dict(model=MODEL, messages=user(STORY), max_tokens=12)
    replies = {client.chat.completions.create(seed=s, **kw).choices[0].message.content
               for s in range(3)}
    assert len(replies) > 1


def test_concurrent_streams_interleave_and_equal_sequential(client, reference):
    prompts = [STORY, "Explain why the sky is blue.", "List five animals."]
    want = [reference(reference.chat_ids(user(p)), 10)[0] for p in prompts]
    got, arrivals = [None] * 3, []

    def run(i: int) -> None:
        parts = []
        for c in client.chat.completions.create(model=MODEL, messages=user(prompts[i]),
                                                temperature=0, max_tokens=10, stream=True):
            if c.choices and c.choices[0].delta.content:
                parts.append(c.choices[0].delta.content)
                arrivals.append(i)
        got[i] = "".join(parts)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert got == want
    # decoded in turn: every stream had tokens before the others were done
    for i in range(3):
        assert arrivals.index(i) < min(len(arrivals) - 1 - arrivals[::-1].index(j)
                                       for j in range(3) if j != i)


def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(server, client):
    url = server[0]
    chat = f"{url}/v1/chat/completions"

    def body(**kw) -> bytes:
        return json.dumps({"model": MODEL, "messages": user("Hi"), **kw}).encode()

    cases = [
        (b'{"model": "smollm", "messages": [', 400),  # malformed JSON
        (body(max_tokens="many"), 400),  # wrong type
        (body(temperature=[1]), 400),
        (json.dumps({"model": MODEL, "messages": "Hi"}).encode(), 400),
        (body(max_tokens=-5), 400),
        (body(max_tokens=10 ** 12), 400),  # absurd
        (body(max_tokens=9000), 400),  # more than the context of 8192
        (body(n=3), 400),
        (json.dumps({"model": "gpt-17", "messages": user("Hi")}).encode(), 404),
        (json.dumps({"model": MODEL, "messages": user("hello " * 9000)}).encode(), 400),
        (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
         400),
    ]
    for data, status in cases:
        code, err = post_raw(chat, data)
        assert code == status, (data[:80], err)
        assert set(err["error"]) == {"message", "type", "param", "code"}
        assert "Traceback" not in err["error"]["message"]
    code, err = post_raw(f"{url}/v1/completions", b"x" * (100 << 20))  # 100 MB
    assert code == 413 and err["error"]["code"] == "body_too_large"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=user("Hi"))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user("Hi"), max_tokens=0)
    assert "max_tokens" in str(e.value)
    r = client.chat.completions.create(model=MODEL, messages=user(QUESTION), temperature=0)
    assert "Paris" in r.choices[0].message.content


def test_a_client_that_leaves_mid_stream_stops_its_generation(server, client):
    url, engine = server
    before = wait_idle(url)["served"]
    stream = client.chat.completions.create(model=MODEL, messages=user(STORY), temperature=0,
                                            max_tokens=2000, stream=True)
    got = 0
    for c in stream:
        got += bool(c.choices and c.choices[0].delta.content)
        if got == 3:
            break
    stream.close()  # the connection goes away
    t0 = time.monotonic()
    h = wait_idle(url, timeout=30)
    assert h["served"] == before + 1 and time.monotonic() - t0 < 30  # long before 2000 tokens
    r = client.chat.completions.create(model=MODEL, messages=user(QUESTION), temperature=0)
    assert "Paris" in r.choices[0].message.content


def test_models_health_and_openapi(server, client):
    url = server[0]
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert get_json(f"{url}/health")["status"] == "ok"
    spec = get_json(f"{url}/openapi.json")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(spec["paths"])


def test_edgert_serve_command_listens_on_loopback(smollm_package, tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "edgert", "serve", str(smollm_package),
                             "--port", str(port), "--model-id", "m"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, EDGERT_HOME=str(tmp_path)))
    try:
        end = time.monotonic() + 120
        while True:
            try:
                assert get_json(f"http://127.0.0.1:{port}/health")["model"] == "m"
                break
            except OSError:
                assert time.monotonic() < end and proc.poll() is None
                time.sleep(0.3)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="m", messages=user(QUESTION), temperature=0)
        assert "Paris" in r.choices[0].message.content
        code, _ = post_raw(f"http://127.0.0.1:{port}/v1/chat/completions", b"{")
        assert code == 400
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert "Traceback" not in out
    assert "400 request body is not valid JSON" in out  # the one log line


def test_recommended_sampling_from_generation_config():
    from edgert.sample import recommended_sampling

    # llama.cpp's defaults (common/common.h) where the model names none
    assert recommended_sampling(None) == {"temp": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
    qwen3 = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    assert recommended_sampling(qwen3) == {"temp": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.0}
    assert recommended_sampling({"do_sample": False, "temperature": 0.6})["temp"] == 0.0
    assert recommended_sampling({"bos_token_id": 1, "eos_token_id": 2})["temp"] == 0.8
