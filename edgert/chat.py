"""The interactive chat loop: multi-turn, streaming, KV cache reused across turns."""

from __future__ import annotations

import signal

from rich.console import Console

from .generation import stream_generate
from .models.cache import make_cache, restore, snapshot, trimmable
from .reasoning import (ReasoningParser, prompt_opens_reasoning, reasoning_format,
                        split_reasoning)
from .signals import stop_requested
from .speculative import summary

HELP = "/reset starts a new conversation, /exit quits; Ctrl-C stops a reply."


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation whose cache holds the tokens seen so far; each turn feeds only the tokens
    after the longest prefix it can reuse.

    Trimmable caches (all KV) are trimmed back to the prefix shared with the new prompt. Where
    a layer cannot be trimmed (recurrent, rotating), the session keeps snapshots: one at the
    end of each prompt it fed, one after each reply, and restores the longest whose tokens are
    a prefix of the new prompt (a template that rewrites history, e.g. dropping earlier
    reasoning, still matches the previous prompt's snapshot)."""

    max_snapshots = 4

    def __init__(self, model, tokenizer, system: str | None = None, draft=None,
                 num_draft: int = 4):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.draft, self.num_draft = draft, num_draft  # speculative decoding (edgert.speculative)
        self.reasoning = reasoning_format(tokenizer.chat_template)  # "harmony", "think", None
        self.opens_reasoning = False  # whether the last prompt left the reply inside reasoning
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = make_cache(self.model)
        self.cached: list[int] = []  # the tokens the cache holds now
        self.snapshots: list[tuple[list[int], list]] = []  # (tokens, snapshot), newest last
        self.fed = 0  # tokens fed in the last turn (for tests and stats)

    def prompt_ids(self) -> list[int]:
        tok = self.tokenizer
        if tok.has_chat_template:
            return tok.encode(tok.apply_chat_template(self.messages, add_generation_prompt=True),
                              add_special_tokens=False)
        text = "\n".join(m["content"] for m in self.messages) + "\n"
        return tok.encode(text)

    def _rewind(self, ids: list[int]) -> int:
        """Put the cache at the longest reusable prefix of `ids` (never all of it: the last
        token must be fed for logits); returns its length."""
        if trimmable(self.cache):
            keep = min(common_prefix(self.cached, ids), len(ids) - 1)
            for c in self.cache:
                c.trim(c.offset - keep)
            self.cached = self.cached[:keep]
            return keep
        best = None
        for tokens, snap in self.snapshots:
            n = len(tokens)
            if n < len(ids) and ids[:n] == tokens and (best is None or n > len(best[0])):
                best = (tokens, snap)
        if best is None:
            self.cache = make_cache(self.model)
            self.cached = []
            return 0
        restore(self.cache, best[1])
        self.cached = list(best[0])
        return len(best[0])

    def _remember(self, tokens: list[int]) -> None:
        if trimmable(self.cache) or not tokens:
            return
        self.snapshots = [s for s in self.snapshots if s[0] != tokens][-(self.max_snapshots - 1):]
        self.snapshots.append((list(tokens), snapshot(self.cache)))

    def reply(self, user: str, max_tokens: int, sampling: dict):
        """Yield GenerationResponses; the (possibly interrupted) reply joins the history."""
        self.messages.append({"role": "user", "content": user})
        ids = self.prompt_ids()
        self.opens_reasoning = prompt_opens_reasoning(self.tokenizer, ids, self.reasoning)
        keep = self._rewind(ids)
        self.fed = len(ids) - keep
        fed = list(ids)
        text = []
        try:
            for r in stream_generate(self.model, self.tokenizer, ids[keep:], max_tokens,
                                     prompt_cache=self.cache,
                                     on_prefilled=lambda _: self._remember(ids[:-1]),
                                     draft=self.draft, num_draft=self.num_draft,
                                     history=ids[:keep], **sampling):
                if r.finish_reason is None or r.finish_reason == "stop":
                    fed.append(r.token)
                text.append(r.text)
                yield r
        finally:
            # the visible reply joins the history (templates drop earlier turns' reasoning,
            # and gpt-oss's refuses harmony tags in content)
            _, content, _ = split_reasoning("".join(text), self.reasoning, self.opens_reasoning)
            self.messages.append({"role": "assistant", "content": content})
            offset = max(c.offset for c in self.cache)
            self.cached = fed[:offset]
            if trimmable(self.cache):  # anything beyond what we can name is dropped
                for c in self.cache:
                    c.trim(c.offset - len(self.cached))
            elif offset == len(self.cached):
                self._remember(self.cached)


def run_chat(loaded, system: str | None, max_tokens: int, sampling: dict, draft=None,
             num_draft: int = 4) -> None:
    model, tokenizer = loaded
    # Ctrl-C must stop a reply even when the parent started us with SIGINT ignored (a shell's
    # background job, nohup), which Python would otherwise inherit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    console = Console(highlight=False)
    session = ChatSession(model, tokenizer, system, draft, num_draft)
    console.print(f"[dim]{HELP}[/dim]")
    while True:
        try:
            user = console.input("[bold green]>>> [/bold green]")
        except (EOFError, KeyboardInterrupt) as e:
            console.print()
            if stop_requested(e):
                raise
            return
        cmd = user.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            session.reset()
            console.print("[dim]conversation reset[/dim]")
            continue
        last, parser, shown = None, None, [None]
        try:
            for r in session.reply(user, max_tokens, sampling):
                if parser is None:  # the prompt is rendered by now
                    parser = ReasoningParser(session.reasoning, session.opens_reasoning)
                show(console, parser.feed(r.text), shown)
                last = r
            if parser is not None:
                show(console, parser.finish(), shown)
        except KeyboardInterrupt as e:
            if stop_requested(e):  # SIGTERM / SIGHUP end the chat; Ctrl-C only the reply
                raise
            console.print("\n[dim](stopped)[/dim]", end="")
        console.print()
        if last is not None:
            console.print(f"[dim]prompt {last.prompt_tokens} tok @ {last.prompt_tps:.1f} tok/s · "
                          f"generation {last.generation_tokens} tok @ "
                          f"{last.generation_tps:.1f} tok/s{summary(last)}[/dim]")


def show(console: Console, parts: list[tuple[str, str]], shown: list) -> None:
    """Print reply parts: reasoning dimmed, then a blank line, then the content. `shown` holds
    the kind printed last."""
    for kind, text in parts:
        if kind == "content" and shown[-1] == "reasoning":
            console.print("\n")
        shown.append(kind)
        console.print(text, end="", markup=False, soft_wrap=True,
                      style="dim italic" if kind == "reasoning" else None)
