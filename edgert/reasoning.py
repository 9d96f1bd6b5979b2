"""Reasoning kept out of the visible reply: which format a chat template uses, and a parser that
splits generated text into reasoning, content and (harmony) tool calls, whole or streamed.

Formats (as the families' templates render them):
- "harmony" (gpt-oss): messages `<|start|>assistant<|channel|>analysis<|message|>...<|end|>`,
  then `<|start|>assistant<|channel|>final<|message|>...` ended by `<|return|>`; a tool call is
  a commentary message addressed `to=functions.NAME`, ended by `<|call|>`. The generation
  prompt ends with `<|start|>assistant`, so the reply begins with the first header.
- "think" (Qwen3, Qwen3.5, DeepSeek-R1 distills, SmolLM3): `<think>...</think>` before the
  answer; where the generation prompt already opened the block (it ends with `<think>`), the
  reply begins inside it.
Text outside any recognised structure is content, so a model that does not reason loses
nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .tokenizer import held_back

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
HARMONY_ENDS = ("<|end|>", "<|return|>", "<|call|>")
HEADER_STARTS = (CHANNEL, "to=", CONSTRAIN, START)  # what a message header after <|start|>ROLE opens with
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def reasoning_format(chat_template: str | None) -> str | None:
    """"harmony", "think" or None (a template without reasoning)."""
    t = chat_template or ""
    if CHANNEL in t and "analysis" in t:
        return "harmony"
    if THINK_OPEN in t and THINK_CLOSE in t:
        return "think"
    return None


@dataclass
class Header:
    """A harmony message header: `<|channel|>commentary to=functions.f <|constrain|>json`."""
    channel: str | None = None
    recipient: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Header":
        channel = re.search(re.escape(CHANNEL) + r"\s*([^\s<]+)", text)
        recipient = re.search(r"\bto=([^\s<]+)", text)
        return cls(channel.group(1) if channel else None,
                   recipient.group(1) if recipient else None)

    @property
    def kind(self) -> str:
        if self.recipient and self.recipient.startswith("functions."):
            return "tool"
        return "reasoning" if self.channel == "analysis" else "content"


@dataclass
class ReasoningParser:
    """Feed generated text piece by piece; each `feed` returns the (kind, text) parts it can
    already classify, kind "reasoning" or "content". Tool calls (harmony) collect in
    `tool_calls` as (name, arguments text) once their message ends (or at `finish`)."""

    fmt: str | None
    in_reasoning: bool = False  # "think": the prompt opened the block
    tool_calls: list[tuple[str, str]] = field(default_factory=list)
    _buf: str = ""
    _header: Header | None = None  # harmony: the open message's header (None: in a header)
    _body: list[str] = field(default_factory=list)  # harmony: a tool call's arguments so far
    _role_given: bool = False  # harmony: the header follows <|start|> (it opens with the role)

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._buf += text
        if self.fmt == "harmony":
            return self._harmony(final=False)
        if self.fmt == "think":
            return self._think(final=False)
        out, self._buf = [("content", self._buf)] if self._buf else [], ""
        return out

    def finish(self) -> list[tuple[str, str]]:
        if self.fmt == "harmony":
            return self._harmony(final=True)
        if self.fmt == "think":
            return self._think(final=True)
        return []

    # -- harmony ----------------------------------------------------------------------------

    def _harmony(self, final: bool) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while self._buf:
            if self._header is None:  # reading a header, up to <|message|>
                head = self._buf.lstrip()
                if head.startswith(START):  # <|start|>ROLE ...: the header opens with the role
                    self._buf, self._role_given = head[len(START):], True
                    continue
                if not self._role_given and head and not any(
                        head.startswith(m) or m.startswith(head) for m in HEADER_STARTS):
                    self._header = Header("final")  # not harmony: the text is content as it is
                    continue
                at = self._buf.find(MESSAGE)
                if at < 0:
                    if final:  # a header that never opened a body: nothing to show
                        self._buf = ""
                    break
                self._header = Header.parse(self._buf[:at])
                self._buf = self._buf[at + len(MESSAGE):]
                continue
            ends = [(i, m) for m in HARMONY_ENDS if (i := self._buf.find(m)) >= 0]
            if ends:
                i, m = min(ends)
                self._emit(out, self._buf[:i])
                self._close()
                self._buf = self._buf[i + len(m):]
                self._role_given = False
                continue
            keep = 0 if final else held_back(self._buf, HARMONY_ENDS)
            self._emit(out, self._buf[:len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            break
        if final and self._header is not None:
            self._close()
        return out

    def _emit(self, out: list, text: str) -> None:
        if not text:
            return
        kind = self._header.kind
        if kind == "tool":
            self._body.append(text)
        elif out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))

    def _close(self) -> None:
        if self._header.kind == "tool":
            self.tool_calls.append((self._header.recipient.removeprefix("functions."),
                                    "".join(self._body).strip()))
        self._header, self._body = None, []

    # -- think ------------------------------------------------------------------------------
    # states: "start" (nothing but whitespace yet), "reasoning", "content"; `_trim` drops the
    # newlines the template puts after <think> and after </think>

    def _think(self, final: bool) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self._state is None:
            self._state, self._trim = ("reasoning", True) if self.in_reasoning else ("start", False)
        while self._buf:
            if self._trim:
                self._buf = self._buf.lstrip("\n")
                if not self._buf:
                    break
                self._trim = False
            if self._state == "start":
                head = self._buf.lstrip()
                if not final and len(head) < len(THINK_OPEN) and THINK_OPEN.startswith(head):
                    break  # whitespace, or what may still become <think>
                if head.startswith(THINK_OPEN):
                    self._buf, self._state, self._trim = head[len(THINK_OPEN):], "reasoning", True
                else:
                    self._state = "content"
                continue
            if self._state == "content":
                out.append(("content", self._buf))
                self._buf = ""
                break
            at = self._buf.find(THINK_CLOSE)
            if at >= 0:
                out.append(("reasoning", self._buf[:at].rstrip("\n")))
                self._buf, self._state, self._trim = self._buf[at + len(THINK_CLOSE):], "content", True
                continue
            # hold back what may begin </think>, and trailing newlines that may precede it
            keep = 0 if final else held_back(self._buf, (THINK_CLOSE,))
            body = self._buf[:len(self._buf) - keep]
            if not final:
                keep += len(body) - len(body.rstrip("\n"))
                body = body.rstrip("\n")
            out.append(("reasoning", body))
            self._buf = self._buf[len(self._buf) - keep:]
            break
        return [(k, t) for k, t in out if t]

    _state: str | None = None
    _trim: bool = False


def split_reasoning(text: str, fmt: str | None, in_reasoning: bool = False
                    ) -> tuple[str | None, str, list[tuple[str, str]]]:
    """(reasoning or None, visible content, harmony tool calls as (name, arguments)) of a
    whole generated reply."""
    p = ReasoningParser(fmt, in_reasoning)
    parts = p.feed(text) + p.finish()
    reasoning = "".join(t for k, t in parts if k == "reasoning")
    content = "".join(t for k, t in parts if k == "content")
    return reasoning or None, content, p.tool_calls


def opens_reasoning(prompt_text: str, fmt: str | None) -> bool:
    """Whether a rendered prompt leaves the reply inside a reasoning block (a "think" template
    whose generation prompt ends with `<think>`)."""
    return fmt == "think" and prompt_text.rstrip().endswith(THINK_OPEN)


def prompt_opens_reasoning(tokenizer, ids: list[int], fmt: str | None) -> bool:
    """opens_reasoning of a tokenized prompt: only its last few tokens can hold `<think>`."""
    return fmt == "think" and opens_reasoning(tokenizer.decode(ids[-4:]), fmt)


def harmony_tool_arguments(arguments: str) -> str:
    """Arguments as a JSON text (harmony calls carry JSON; anything else is passed as is)."""
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except json.JSONDecodeError:
        return arguments
