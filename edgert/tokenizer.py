"""Tokenizers (HF tokenizer.json), chat templates (jinja2) and streaming detokenization."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from .errors import EdgertError

# Turn-end tokens that chat templates use; honoured as stop tokens when the vocabulary has them.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_str(v):
    return v.get("content") if isinstance(v, dict) else v


class StreamingDetokenizer:
    """Add ids one at a time; `last_segment` gives the text completed since the last read.

    Decodes only the pending ids with one token of context, so each step is O(1) in the length
    of the output; text is held back while it ends in an incomplete UTF-8 character."""

    def __init__(self, tokenizer: "Tokenizer"):
        self._tok = tokenizer
        self.reset()

    def reset(self):
        self.text = ""
        self._segment = ""
        self._context: list[int] = []
        self._base = ""
        self._pending: list[int] = []

    def add_token(self, token: int) -> None:
        self._pending.append(token)
        full = self._tok.decode(self._context + self._pending)
        new = full[len(self._base):] if full.startswith(self._base) else full
        if new.endswith("\ufffd"):
            return
        self._emit(new)

    def _emit(self, new: str) -> None:
        self._segment += new
        self.text += new
        self._context = self._pending[-1:]
        self._base = self._tok.decode(self._context)
        self._pending = []

    def finalize(self) -> None:
        if self._pending:
            full = self._tok.decode(self._context + self._pending)
            self._emit(full[len(self._base):] if full.startswith(self._base) else full)

    @property
    def last_segment(self) -> str:
        seg, self._segment = self._segment, ""
        return seg


class Tokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg = _read_json(path / "tokenizer_config.json")
        model_cfg = _read_json(path / "config.json")
        gen_cfg = _read_json(path / "generation_config.json")
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.add_bos_token = bool(cfg.get("add_bos_token", False)) and self.bos_token_id is not None
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template

        eos: set[int] = set()
        for src in (model_cfg.get("eos_token_id"), gen_cfg.get("eos_token_id")):
            eos.update(src if isinstance(src, list) else [src] if src is not None else [])
        if self.eos_token and (i := self._tok.token_to_id(self.eos_token)) is not None:
            eos.add(i)
        for t in TURN_END_TOKENS:
            if (i := self._tok.token_to_id(t)) is not None and (
                    template is None or t in template or t == self.eos_token):
                eos.add(i)
        self.eos_token_ids = eos

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the conversation with the model's template (jinja2, sandboxed)."""
        if not self.chat_template:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False,
                                                                       indent=indent)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:
            raise EdgertError(f"chat template: {e}") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise EdgertError(f"{path} has no tokenizer.json")
    return Tokenizer(path)
