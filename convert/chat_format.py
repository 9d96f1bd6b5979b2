"""A chat template reduced to what it writes around plain-text messages, for the Core ML
manifest's `chat_format` (the Swift bridge renders conversations from it, with no Jinja):

    begin + (first message not a system one ? default_system : "")
      + for each message: prefix[role] + content + suffix[role]
      + (add_generation_prompt ? generation_prompt : "")

The pieces come from rendering conversations whose contents are unique marks and cutting
the text at the marks; the result is then checked against jinja2's rendering (edgert's, as
transformers renders templates) of sample conversations with varied contents. A template
that does not fit (system text moved into a user turn, conditions on content, tools) is
reported as `{"type": "unsupported", "reason": ...}` and the bridge refuses to guess; a role
the template refuses or moves (system, in Gemma's) is left out of `roles`.
"""

from __future__ import annotations

import json
from datetime import datetime

from edgert.errors import EdgertError
from edgert.tokenizer import compile_chat_template, render_chat_template

ROLES = ("system", "user", "assistant")
OTHER_DAY = datetime(1999, 12, 31)  # a date no export runs on: templates that print "today" differ
MARKS = [f"edgertmark{i}q" for i in range(6)]
SAMPLE_CONTENTS = ["Hello", "What is 2+2?\nShow the steps.", "ünïcödé 🚀 中文 ok",
                   "{{ not jinja }} {% raw %} <tag> & \"quotes\" 'single'", "a\n\nb\n",
                   "  padded with spaces  ", "Sure! Here it is:\n```py\nprint(1)\n```",
                   "The quick brown fox jumps over the lazy dog. Why? Yes, xyz!"]


class Irreducible(Exception):
    """The template does not fit the prefix / suffix form; the message says why."""


def _cut(text: str, marks: list[str]) -> list[str]:
    """The text around `marks` (each exactly once, in order): len(marks) + 1 pieces."""
    pieces, rest = [], text
    for m in marks:
        if text.count(m) != 1 or m not in rest:
            raise Irreducible("message content is not written exactly once, in order")
        before, rest = rest.split(m, 1)
        pieces.append(before)
    return pieces + [rest]


def _strip_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise Irreducible(what)
    return text[: len(text) - len(suffix)]


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise Irreducible(what)
    return text[len(prefix):]


def _messages(*pairs) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


def derive(render) -> dict:
    """The reduced format from `render(messages, add_generation_prompt) -> str` (which raises
    EdgertError where the template refuses a conversation)."""
    m0, m1, m2, m3 = MARKS[:4]
    try:
        alone = render(_messages(("user", m0)), False)
        opened = render(_messages(("user", m0)), True)
        turns = render(_messages(("user", m0), ("assistant", m1), ("user", m2)), False)
        answered = render(_messages(("user", m0), ("assistant", m1)), False)
        padded = render(_messages(("user", f"  {m0}  ")), False)
    except EdgertError as e:
        raise Irreducible(f"a user / assistant conversation does not render ({e})") from None
    generation_prompt = _strip_prefix(opened, alone, "add_generation_prompt changes more than "
                                                     "the end of the text")
    trim = f"  {m0}  " not in padded
    if trim and padded != alone:
        raise Irreducible("the template changes message content beyond trimming it")

    head_user, suffix_user = _cut(alone, [m0])
    _, between_ua, between_au, tail = _cut(turns, [m0, m1, m2])
    if tail != suffix_user:
        raise Irreducible("the last user message ends differently from the first")
    suffix_assistant = _cut(answered, [m0, m1])[2]
    prefix_assistant = _strip_prefix(between_ua, suffix_user,
                                     "the assistant turn does not follow the user suffix")
    prefix_user = _strip_prefix(between_au, suffix_assistant,
                                "the user turn does not follow the assistant suffix")
    before_user = _strip_suffix(head_user, prefix_user,
                                "the first user message opens differently from later ones")
    roles = {"user": (prefix_user, suffix_user), "assistant": (prefix_assistant, suffix_assistant)}
    fmt = {"type": "role_affixes", "begin": before_user, "default_system": "",
           "generation_prompt": generation_prompt, "trim_content": trim,
           "system_anywhere": False}

    system = _system(render, prefix_user, suffix_user, suffix_assistant)
    if system is not None:
        (prefix_system, suffix_system), head_system, anywhere = system
        if anywhere:
            begin = _strip_suffix(head_system, prefix_system, "system prefix")
        else:  # a system message only ever comes first: the beginning is part of its prefix
            begin, prefix_system = "", head_system
        fmt.update(begin=begin, system_anywhere=anywhere,
                   default_system=_strip_prefix(before_user, begin, "a conversation without a "
                                                "system message begins differently"))
        roles["system"] = (prefix_system, suffix_system)
    fmt["roles"] = [{"role": r, "prefix": p, "suffix": s} for r, (p, s) in roles.items()]
    return fmt


def _system(render, prefix_user: str, suffix_user: str, suffix_assistant: str):
    """((prefix, suffix), text before the first system message, allowed anywhere) or None
    where the template refuses system messages or does not write them as a turn of their own."""
    m0, m1, m2, m3 = MARKS[:4]
    try:
        first = render(_messages(("system", m0), ("user", m1)), False)
    except EdgertError:
        return None
    try:
        head, between, tail = _cut(first, [m0, m1])
        suffix_system = _strip_suffix(between, prefix_user, "")
    except Irreducible:
        return None  # e.g. Gemma: system text inside the first user turn
    if tail != suffix_user:
        return None
    try:
        later = render(_messages(("user", m0), ("assistant", m1), ("system", m2), ("user", m3)),
                       False)
        _, _, between, after, _ = _cut(later, [m0, m1, m2, m3])
        prefix_system = _strip_prefix(between, suffix_assistant, "")
        if after != suffix_system + prefix_user or not head.endswith(prefix_system):
            raise Irreducible("")
        return (prefix_system, suffix_system), head, True
    except (EdgertError, Irreducible):
        return (head, suffix_system), head, False


def render_reduced(fmt: dict, messages: list[dict], add_generation_prompt: bool) -> str:
    """A conversation rendered from the reduced format (what the Swift bridge does)."""
    roles = {r["role"]: (r["prefix"], r["suffix"]) for r in fmt["roles"]}
    text = fmt["begin"] + ("" if messages and messages[0]["role"] == "system"
                           else fmt["default_system"])
    for m in messages:
        prefix, suffix = roles[m["role"]]
        content = m["content"].strip() if fmt["trim_content"] else m["content"]
        text += prefix + content + suffix
    return text + (fmt["generation_prompt"] if add_generation_prompt else "")


def sample_conversations(fmt: dict) -> list[tuple[list[dict], bool]]:
    """Conversations of the roles `fmt` has (alternating user / assistant, system first and,
    where allowed, later), with varied contents, each with and without the generation prompt."""
    roles = {r["role"] for r in fmt["roles"]}
    shapes = [["user"], ["user", "assistant"], ["user", "assistant", "user"],
              ["user", "assistant", "user", "assistant", "user"], ["assistant", "user"]]
    if "system" in roles:
        shapes += [["system"] + s for s in shapes[:4]]
        if fmt["system_anywhere"]:
            shapes.append(["user", "assistant", "system", "user"])
    out, k = [], 0
    for shape in shapes:
        msgs = []
        for role in shape:
            msgs.append({"role": role, "content": SAMPLE_CONTENTS[k % len(SAMPLE_CONTENTS)]})
            k += 1
        out += [(msgs, False), (msgs, True)]
    return out


def reduce_chat_template(template: str | None, special_names: dict) -> dict:
    """The manifest's `chat_format` for `template` (special_names: bos_token, eos_token, ...
    as the template sees them)."""
    if not template:
        return {"type": "unsupported", "reason": "the model has no chat template"}
    try:
        compiled = compile_chat_template(template)
    except EdgertError as e:
        return {"type": "unsupported", "reason": str(e)}

    def render(messages, gen, **kwargs):
        return render_chat_template(compiled, messages, gen, special_names, **kwargs)

    try:
        fmt = derive(render)
    except Irreducible as e:
        return {"type": "unsupported", "reason": f"the chat template cannot be reduced: {e}"}
    probe = _messages(("user", "Hi"))
    if render(probe, True) != render(probe, True, strftime_now=lambda f: OTHER_DAY.strftime(f)):
        return {"type": "unsupported", "reason": "the chat template writes today's date "
                                                 "(strftime_now): a reduction would freeze it"}
    samples = sample_conversations(fmt)
    for messages, gen in samples:
        try:
            expected = render(messages, gen)
        except EdgertError as e:
            if messages[0]["role"] == "assistant":
                continue  # a template may insist on a user turn first
            return {"type": "unsupported", "reason": f"sample conversation refused ({e})"}
        if render_reduced(fmt, messages, gen) != expected:
            roles = "/".join(m["role"] for m in messages)
            return {"type": "unsupported",
                    "reason": f"the reduced format differs from the template on a {roles} "
                              f"conversation{' with the generation prompt' if gen else ''} "
                              f"(conditions on content or position?)"}
    fmt["checked_conversations"] = len(samples)
    return fmt


def special_names(tokenizer_config: dict) -> dict:
    """bos_token / eos_token / unk_token / pad_token as a template sees them."""
    names = {}
    for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
        v = tokenizer_config.get(k)
        v = v.get("content") if isinstance(v, dict) else v
        if v is not None:
            names[k] = v
    return names


def chat_format_from_files(files: dict[str, bytes], template: str | None) -> dict:
    """`reduce_chat_template` with the special names of the package's tokenizer_config.json."""
    config = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
    return reduce_chat_template(template, special_names(config))
