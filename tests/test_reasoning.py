"""Reasoning kept out of the visible reply, and gpt-oss's harmony format.

Oracles: the families' own chat templates, shipped in llama.cpp's source (the llama-cpp-python
sdist, models/templates/): gpt-oss (harmony), Qwen3 and Qwen3.5 (<think>). What a template
renders for an assistant turn with reasoning, content or a tool call is exactly what the model
was trained to generate after the generation prompt; edgert's parser must take that text apart
into the same reasoning, content and call, whole or streamed in pieces of any size. The server
is then driven with the official openai client on a model that writes such a reply."""

from __future__ import annotations

import json
import tarfile

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, decoders
from tokenizers import AddedToken

from edgert.reasoning import (ReasoningParser, opens_reasoning, reasoning_format,
                              split_reasoning)
from edgert.tokenizer import Tokenizer
from edgert.tools import parse_tool_calls, tool_format
from testdata import data_file

SDIST = "llama_cpp_python-0.3.36"
TEMPLATES = {"gpt-oss": "openai-gpt-oss-120b.jinja", "qwen3": "Qwen-Qwen3-0.6B.jinja",
             "qwen3.5": "Qwen3.5-4B.jinja"}
HARMONY_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start|>", "<|end|>", "<|message|>",
                    "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"]
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
THOUGHT = "The user wants the capital.\nIt is Paris, I am sure."
ANSWER = "The capital of France is **Paris**."
ARGS = {"city": "Paris", "unit": "celsius"}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def templates() -> dict[str, str]:
    prefix = f"{SDIST}/vendor/llama.cpp/models/templates/"
    with tarfile.open(data_file(f"{SDIST}.tar.gz")) as tar:
        return {k: tar.extractfile(prefix + v).read().decode() for k, v in TEMPLATES.items()}


def tokenizer(template: str, specials: list[str]) -> Tokenizer:
    """A byte-level BPE tokenizer with the family's special tokens and chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return Tokenizer(tok, {"eos_token": specials[-1] if "<|return|>" in specials else
                           "<|im_end|>"}, chat_template=template)


def generated(tok: Tokenizer, messages: list[dict], stop: str, **kw) -> tuple[str, str]:
    """(prompt, reply): the template's generation prompt for all but the last message, and
    what it renders for the last (the assistant's) after that prompt, up to its stop token."""
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, **kw)
    full = tok.apply_chat_template(messages, add_generation_prompt=False, **kw)
    assert full.startswith(prompt)
    reply = full[len(prompt):]
    return prompt, reply[:reply.index(stop)] if stop in reply else reply


def streamed(reply: str, fmt: str, inside: bool, size: int):
    p = ReasoningParser(fmt, inside)
    parts = [part for i in range(0, len(reply), size) for part in p.feed(reply[i:i + size])]
    parts += p.finish()
    reasoning = "".join(t for k, t in parts if k == "reasoning") or None
    return reasoning, "".join(t for k, t in parts if k == "content"), p.tool_calls


def test_formats_are_read_from_the_templates(templates):
    assert reasoning_format(templates["gpt-oss"]) == "harmony"
    assert tool_format(templates["gpt-oss"]) == "harmony"
    assert reasoning_format(templates["qwen3"]) == reasoning_format(templates["qwen3.5"]) == "think"
    assert tool_format(templates["qwen3"]) == "hermes"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 10_000])
def test_harmony_reply_splits_into_reasoning_and_final(templates, size):
    tok = tokenizer(templates["gpt-oss"], HARMONY_SPECIALS)
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "thinking": THOUGHT, "content": ANSWER}]
    prompt, reply = generated(tok, messages, "<|return|>")
    assert prompt.endswith("<|start|>assistant") and "analysis" in reply  # the oracle's shape
    assert split_reasoning(reply, "harmony") == (THOUGHT, ANSWER, [])
    assert streamed(reply, "harmony", False, size) == (THOUGHT, ANSWER, [])


@pytest.mark.parametrize("size", [1, 5, 10_000])
def test_harmony_tool_call(templates, size):
    tok = tokenizer(templates["gpt-oss"], HARMONY_SPECIALS)
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "thinking": "I should call the tool.",
                 "tool_calls": [{"type": "function", "function": {
                     "name": "get_weather", "arguments": ARGS}}]}]
    _, reply = generated(tok, messages, "<|call|>", tools=[TOOL])
    reasoning, content, calls = streamed(reply, "harmony", False, size)
    assert (reasoning, content) == ("I should call the tool.", "")
    assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", ARGS)]
    text, openai_calls = parse_tool_calls(reply, "harmony")
    assert text is None and openai_calls[0]["function"]["name"] == "get_weather"
    assert json.loads(openai_calls[0]["function"]["arguments"]) == ARGS


def test_harmony_stops_at_return_not_at_end(templates):
    """<|end|> closes the reasoning message and the reply goes on; <|return|> and <|call|> end
    it (llama.cpp's rule for this vocabulary)."""
    tok = tokenizer(templates["gpt-oss"], HARMONY_SPECIALS)
    ids = {t: tok.special_token_id(t) for t in ("<|end|>", "<|return|>", "<|call|>")}
    assert ids["<|return|>"] in tok.eos_token_ids and ids["<|call|>"] in tok.eos_token_ids
    assert ids["<|end|>"] not in tok.eos_token_ids
    phi = tokenizer(None, ["<|end|>", "<|endoftext|>"])  # elsewhere <|end|> ends the turn
    assert phi.special_token_id("<|end|>") in phi.eos_token_ids


@pytest.mark.parametrize("family", ["qwen3", "qwen3.5"])
@pytest.mark.parametrize("size", [1, 2, 4, 9, 10_000])
def test_think_blocks(templates, family, size):
    """Qwen3's generation prompt leaves the block to the model (it writes <think>); Qwen3.5's
    opens it (the prompt ends with <think>), so the reply starts inside."""
    tok = tokenizer(templates[family], QWEN_SPECIALS)
    messages = [{"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "reasoning_content": THOUGHT, "content": ANSWER}]
    prompt, reply = generated(tok, messages, "<|im_end|>")
    inside = opens_reasoning(prompt, "think")
    assert inside == (family == "qwen3.5")
    assert split_reasoning(reply, "think", inside) == (THOUGHT, ANSWER, [])
    assert streamed(reply, "think", inside, size) == (THOUGHT, ANSWER, [])


@pytest.mark.parametrize("fmt", ["think", "harmony", None])
@pytest.mark.parametrize("tagged", [False, True])
def test_a_reply_without_reasoning_is_all_content(fmt, tagged):
    """Nothing is lost from a model that does not reason, or does not follow harmony."""
    want = "Just an answer, with < and </thi and <|chan in it."
    text = "<|channel|>final<|message|>" + want if tagged and fmt == "harmony" else want
    for size in (1, 3, 10_000):
        assert streamed(text, fmt, False, size) == (None, want, [])


# ------------------------------------------------------------------ through the server
# SmolLM2 with gpt-oss's template: its vocabulary has no harmony tokens, so the tags are
# plain text there; a grammar (llguidance) makes the random-enough model write harmony.

WORDS = r"/[a-z]{2,10}( [a-z]{2,10}){0,4}/"


@pytest.fixture(scope="module")
def harmony_server(smollm_package, tmp_path_factory, templates):
    import shutil

    import openai

    from server_util import running_server

    folder = tmp_path_factory.mktemp("harmony") / "pkg"
    shutil.copytree(smollm_package, folder)
    (folder / "chat_template.jinja").write_text(templates["gpt-oss"])
    with running_server(folder, model_id="m") as (url, engine):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)


def forced(monkeypatch, grammar: str) -> None:
    from edgert.server import Server

    monkeypatch.setattr(Server, "grammar", lambda self, req: grammar)


@pytest.mark.parametrize("stream", [False, True])
def test_server_sends_reasoning_apart(harmony_server, monkeypatch, stream):
    """The analysis channel arrives as `reasoning_content`, the final channel as `content`;
    neither carries a harmony tag."""
    forced(monkeypatch, f'start: "<|channel|>analysis<|message|>" {WORDS} '
                        f'"<|end|><|start|>assistant<|channel|>final<|message|>" {WORDS}')
    kw = dict(model="m", messages=[{"role": "user", "content": "Capital of France?"}],
              temperature=0, max_tokens=60)
    if stream:
        chunks = [c for c in harmony_server.chat.completions.create(stream=True, **kw)
                  if c.choices]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        thought = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                          for c in chunks)
    else:
        msg = harmony_server.chat.completions.create(**kw).choices[0].message
        content, thought = msg.content, msg.reasoning_content
    assert content and thought and "<|" not in content + thought
    assert all(w.isalpha() for w in (content + " " + thought).split())


@pytest.mark.parametrize("stream", [False, True])
def test_server_forces_and_parses_a_harmony_tool_call(harmony_server, stream):
    """tool_choice "required" with gpt-oss's template: the grammar is harmony's call header
    and the function's parameters; the reply comes back as `tool_calls`."""
    import jsonschema

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"type": "string", "maxLength": 20}}}}}]
    kw = dict(model="m", messages=[{"role": "user", "content": "Weather in Paris?"}],
              temperature=0, max_tokens=60, tools=tools, tool_choice="required")
    if stream:
        chunks = [c for c in harmony_server.chat.completions.create(stream=True, **kw)
                  if c.choices]
        calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = harmony_server.chat.completions.create(**kw).choices[0]
        calls, finish = choice.message.tool_calls, choice.finish_reason
        assert not choice.message.content
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments),
                        tools[0]["function"]["parameters"])
