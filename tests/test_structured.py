"""Structured output through the server: response_format json_object / json_schema decoded
under llguidance's grammar (validated with jsonschema), and tool calls for the real Qwen 2.5
and Llama 3.2 chat templates shipped in llama.cpp's sources, parsed back into `tool_calls`."""

from __future__ import annotations

import json
import shutil
import tarfile

import jsonschema
import openai
import pytest

from edgert.tokenizer import load_tokenizer
from edgert.tools import parse_tool_calls, tool_format
from server_util import running_server
from testdata import data_file

TEMPLATES = {"qwen": "Qwen-Qwen2.5-7B-Instruct.jinja",
             "llama3": "meta-llama-Llama-3.2-3B-Instruct.jinja"}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pets": {"type": "array", "maxItems": 3,
                                  "items": {"enum": ["cat", "dog", "fish"]}}}}
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False,
                   "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Local time in a city",
        "parameters": {"type": "object", "required": ["city"],
                       "properties": {"city": {"type": "string", "maxLength": 30}}}}}]


@pytest.fixture(scope="module")
def templates() -> dict[str, str]:
    """Real chat templates from llama.cpp's models/templates (the llama-cpp-python sdist)."""
    out = {}
    with tarfile.open(data_file("llama_cpp_python-0.3.36.tar.gz")) as tar:
        for member in tar:
            for key, name in TEMPLATES.items():
                if member.name.endswith(f"vendor/llama.cpp/models/templates/{name}"):
                    out[key] = tar.extractfile(member).read().decode()
            if len(out) == len(TEMPLATES):
                break
    assert set(out) == set(TEMPLATES)
    return out


def with_template(smollm_package, tmp_path_factory, template: str):
    """SmolLM2's weights and tokenizer with another family's chat template."""
    folder = tmp_path_factory.mktemp("templated") / "pkg"
    shutil.copytree(smollm_package, folder)
    (folder / "chat_template.jinja").write_text(template)
    return folder


@pytest.fixture(scope="module")
def qwen_server(smollm_package, tmp_path_factory, templates):
    pkg = with_template(smollm_package, tmp_path_factory, templates["qwen"])
    with running_server(pkg, model_id="m") as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_parses_and_validates(qwen_server, stream):
    kw = dict(model="m", messages=ask("Describe a person as JSON."), temperature=0,
              max_tokens=80, response_format={"type": "json_schema", "json_schema": {
                  "name": "person", "schema": PERSON, "strict": True}})
    if stream:
        chunks = list(qwen_server.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        r = qwen_server.chat.completions.create(**kw)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_and_sampled_schema_output(qwen_server):
    r = qwen_server.chat.completions.create(
        model="m", messages=ask("List three colours as JSON."), temperature=0, max_tokens=120,
        response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"  # (free-form strings can loop to the limit)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    for seed in range(2):  # sampling under the grammar still validates
        r = qwen_server.chat.completions.create(
            model="m", messages=ask("A person, JSON."), temperature=1.0, seed=seed,
            max_tokens=80, response_format={"type": "json_schema",
                                            "json_schema": {"name": "p", "schema": PERSON}})
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_a_schema_the_grammar_engine_rejects_is_a_400(qwen_server):
    with pytest.raises(openai.BadRequestError) as e:
        qwen_server.chat.completions.create(
            model="m", messages=ask("x"), response_format={
                "type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "nosuch"}}})
    assert e.value.body["code"] == "invalid_json_schema"
    with pytest.raises(openai.BadRequestError):
        qwen_server.chat.completions.create(model="m", messages=ask("x"), tools=WEATHER,
                                            tool_choice={"type": "function",
                                                         "function": {"name": "nope"}})
    r = qwen_server.chat.completions.create(model="m", messages=ask("Hi"), max_tokens=3)
    assert r.choices[0].message.content is not None


def _check_calls(calls, name: str | None = None) -> None:
    assert calls
    params = {t["function"]["name"]: t["function"]["parameters"] for t in WEATHER}
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        assert name is None or c.function.name == name
        jsonschema.validate(json.loads(c.function.arguments), params[c.function.name])


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_call_with_the_qwen_template(qwen_server, stream):
    kw = dict(model="m", messages=ask("What is the weather in Paris?"), tools=WEATHER,
              tool_choice="required", temperature=0, max_tokens=80)
    if stream:
        chunks = [c for c in qwen_server.chat.completions.create(stream=True, **kw) if c.choices]
        deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert deltas and deltas[0].index == 0
        _check_calls([d for d in deltas])
    else:
        r = qwen_server.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "tool_calls"
        assert r.choices[0].message.content is None
        _check_calls(r.choices[0].message.tool_calls)
        plain = qwen_server.chat.completions.create(
            model="m", messages=ask("What is the weather in Paris?"), max_tokens=1)
        assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 100  # tools rendered


def test_named_tool_choice_and_a_tool_result_turn(qwen_server):
    r = qwen_server.chat.completions.create(
        model="m", messages=ask("What time is it in Tokyo?"), tools=WEATHER, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=60)
    call = r.choices[0].message.tool_calls[0]
    _check_calls([call], "get_time")
    history = ask("What time is it in Tokyo?") + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "09:30"}]
    r = qwen_server.chat.completions.create(model="m", messages=history, tools=WEATHER,
                                            temperature=0, max_tokens=12)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_required_tool_call_with_the_llama3_template(smollm_package, tmp_path_factory,
                                                     templates):
    pkg = with_template(smollm_package, tmp_path_factory, templates["llama3"])
    with running_server(pkg, model_id="m") as (url, _):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
        r = c.chat.completions.create(model="m", messages=ask("Weather in Rome?"), tools=WEATHER,
                                      tool_choice="required", temperature=0, max_tokens=80)
    assert r.choices[0].finish_reason == "tool_calls"
    _check_calls(r.choices[0].message.tool_calls)


@pytest.mark.parametrize("family", ["qwen", "llama3"])
def test_calls_rendered_by_the_real_template_parse_back(family, templates, smollm_package,
                                                        tmp_path_factory):
    """The template renders an assistant turn with a call; parsing that text gives it back."""
    pkg = with_template(smollm_package, tmp_path_factory, templates[family])
    tok = load_tokenizer(pkg)
    fmt = tool_format(tok.chat_template)
    assert fmt == {"qwen": "hermes", "llama3": "llama3"}[family]
    args = {"city": "Zürich", "unit": "celsius"}
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": args}}
    head = ask("Weather?")
    before = tok.apply_chat_template(head, add_generation_prompt=True, tools=WEATHER)
    full = tok.apply_chat_template(head + [{"role": "assistant", "content": None,
                                            "tool_calls": [call]}],
                                   add_generation_prompt=False, tools=WEATHER)
    assert full.startswith(before)
    reply = full[len(before):]
    for end in ("<|im_end|>", "<|eot_id|>"):
        reply = reply.split(end)[0]
    content, calls = parse_tool_calls(reply, fmt)
    assert content is None and len(calls) == 1
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == args
    assert parse_tool_calls("Just text.", fmt) == ("Just text.", [])
