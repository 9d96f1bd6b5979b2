"""Tool calls: which format a chat template asks for, parsing calls back out of generated text,
and grammars that force a call (tool_choice "required" or a named function).

Formats (what the families edgert runs are trained on, as their templates describe it):
- "hermes" (Qwen 2.5 / 3, Hermes, SmolLM3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call.
- "llama3" (Llama 3.1-3.3): the reply is one JSON object `{"name": ..., "parameters": {...}}`,
  optionally after `<|python_tag|>`.
- "harmony" (gpt-oss): a commentary message addressed `to=functions.NAME` whose body is the
  arguments, ended by `<|call|>` (parsed by edgert.reasoning with the rest of the reply).
"""

from __future__ import annotations

import json
import re
import uuid

HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def tool_format(chat_template: str | None) -> str | None:
    """"hermes", "llama3", "harmony" or None (a template that does not render tool calls)."""
    t = chat_template or ""
    if "to=functions." in t or '"functions." + tool_call.name' in t:
        return "harmony"
    if "<tool_call>" in t:
        return "hermes"
    if "tool_calls" in t and '"parameters": ' in t:
        return "llama3"
    return None


def _call(name: str, arguments) -> dict:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _as_call(obj, key: str) -> dict | None:
    if isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(
            obj.get(key, {}), (dict, str)):
        return _call(obj["name"], obj.get(key, {}))
    return None


def harmony_calls(found: list[tuple[str, str]]) -> list[dict]:
    """OpenAI-form tool calls of the (name, arguments) pairs a harmony reply's parse found."""
    from .reasoning import harmony_tool_arguments

    return [_call(name, harmony_tool_arguments(args)) for name, args in found]


def parse_tool_calls(text: str, fmt: str | None) -> tuple[str | None, list[dict]]:
    """(content left over or None, tool calls in OpenAI form) from a generated reply."""
    if fmt == "hermes":
        calls = []
        for block in HERMES_BLOCK.findall(text):
            try:
                call = _as_call(json.loads(block), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []  # not a well-formed call: leave the text as it is
            calls.append(call)
        if not calls:
            return text, []
        rest = HERMES_BLOCK.sub("", text).strip()
        return rest or None, calls
    if fmt == "harmony":
        from .reasoning import split_reasoning

        _, content, found = split_reasoning(text, "harmony")
        return content or None, harmony_calls(found)
    if fmt == "llama3":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        call = _as_call(obj, "parameters") or _as_call(obj, "arguments")
        return (None, [call]) if call else (text, [])
    return text, []


def _call_schema(tool: dict, key: str) -> dict:
    f = tool["function"]
    return {"type": "object", "properties": {
        "name": {"const": f["name"]},
        key: f.get("parameters") or {"type": "object"}},
        "required": ["name", key], "additionalProperties": False}


def forced_call_grammar(tools: list[dict], name: str | None, fmt: str | None,
                        special: dict[str, int] | None = None) -> str:
    """A Lark grammar (llguidance) for exactly one call of `name` (or of any tool) in `fmt`;
    `special` maps tags (`<tool_call>`, harmony's `<|channel|>` ...) to their ids where the
    vocabulary has them as single tokens."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    key = "parameters" if fmt == "llama3" else "arguments"
    schemas = [_call_schema(t, key) for t in chosen]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    from .grammar import JSON_OPTIONS

    body = json.dumps({**schema, "x-guidance": JSON_OPTIONS})
    if fmt == "llama3":
        return f"start: call\ncall: %json {body}\n"
    special = special or {}

    def tag(t: str) -> str:
        return f"<[{special[t]}]>" if t in special else json.dumps(t)

    if fmt == "harmony":  # a commentary message to the function whose body is the arguments
        calls = []
        for t in chosen:
            args = json.dumps({**(t["function"].get("parameters") or {"type": "object"}),
                               "x-guidance": JSON_OPTIONS})
            calls.append(f'{tag("<|channel|>")} "commentary to=functions.{t["function"]["name"]} " '
                         f'{tag("<|constrain|>")} "json" {tag("<|message|>")} %json {args}')
        return "start: " + " | ".join(calls) + "\n"

    return (f'start: {tag("<tool_call>")} "\\n" call "\\n" {tag("</tool_call>")}\n'
            f"call: %json {body}\n")
