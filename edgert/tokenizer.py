"""Tokenizers, chat templates (jinja2) and streaming detokenization.

A package folder holds `tokenizer.json` (HF tokenizers) or a SentencePiece `tokenizer.model`
(rebuilt into the same form on load), plus any of `tokenizer_config.json`,
`chat_template.jinja`, `generation_config.json` and `config.json`.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable

from tokenizers import Tokenizer as HFTokenizer

from .errors import EdgertError, UnsupportedError

# Tokens that end a turn or a text (llama.cpp's end-of-generation list in llama-vocab.cpp);
# they stop generation wherever the vocabulary has them as special tokens.
END_OF_GENERATION = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>",
                     "<|endoftext|>", "<|end_of_text|>", "<EOT>", "<end_of_utterance>",
                     "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>")
# gpt-oss's harmony vocabulary: <|end|> closes one message (the reasoning) and the reply goes
# on; <|return|> and <|call|> end it (llama.cpp drops <|end|> where both are present)
HARMONY_ENDS = ("<|return|>", "<|call|>")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgertError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise EdgertError(f"{path}: not a JSON object")
    return data


def check_text(text: str, what: str = "the prompt") -> str:
    """`text` if it is valid Unicode; else one line saying where it is not (bytes that were not
    UTF-8 reach Python as lone surrogates, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EdgertError(f"{what} is not valid UTF-8 (character {e.start})") from None
    return text


def _token_str(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def _ids(v) -> list[int]:
    return [] if v is None else list(v) if isinstance(v, list) else [v]


def held_back(text: str, markers) -> int:
    """How many trailing characters of `text` could begin one of `markers` without being
    one whole (kept back from a stream until the next piece says whether they do)."""
    for n in range(min(len(text), max(map(len, markers), default=1) - 1), 0, -1):
        if any(m.startswith(text[-n:]) for m in markers):
            return n
    return 0


class StreamingDetokenizer:
    """Token ids in, one at a time; text out as soon as it is final.

    Only the ids not yet turned into text are decoded, behind a fixed one-letter anchor token
    so that a SentencePiece word's leading `▁` still decodes to a space (it is dropped only at
    the very start of the output, as a full decode does). Text that ends in an incomplete
    UTF-8 character (U+FFFD from a split multi-byte sequence) waits for the next token.
    """

    def __init__(self, decode: Callable[[list[int]], str], anchor: int | None = None):
        self._decode = decode
        self._anchor = [] if anchor is None else [anchor]
        self._anchor_len = len(decode(self._anchor)) if self._anchor else 0
        self.reset()

    def reset(self) -> None:
        """Forget all tokens and text."""
        self.text = ""  # all text finalized so far
        self._read = 0  # how much of `text` last_segment has handed out
        self._pending: list[int] = []
        self._started = False  # some token already decoded: later `▁`s are real spaces

    def add_token(self, token: int) -> None:
        self._pending.append(token)
        self._flush(final=False)

    def finalize(self) -> None:
        """Turn whatever is still held back into text (invalid bytes become U+FFFD)."""
        self._flush(final=True)

    @property
    def last_segment(self) -> str:
        """The text finalized since the last read."""
        segment = self.text[self._read:]
        self._read = len(self.text)
        return segment

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        if self._started:
            new = self._decode(self._anchor + self._pending)[self._anchor_len:]
        else:
            new = self._decode(self._pending)
        if new.endswith("\ufffd") and not final:
            return
        self.text += new
        self._pending.clear()
        self._started = True


def _sentencepiece_tokenizer(path: Path) -> tuple[HFTokenizer, dict]:
    """A SentencePiece BPE `tokenizer.model` as an HF tokenizer, and its special-token names."""
    from .vocab import add_vocab_specials, sentencepiece_bpe

    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # the generated module needs protobuf
        raise EdgertError(f"reading {path.name} needs protobuf: pip install protobuf ({e})")
    m = pb.ModelProto.FromString(path.read_bytes())
    norm, trainer = m.normalizer_spec, m.trainer_spec
    if trainer.model_type != pb.TrainerSpec.BPE:
        raise UnsupportedError(f"{path.name}: SentencePiece model type "
                               f"{pb.TrainerSpec.ModelType.Name(trainer.model_type)} is not supported")
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        raise UnsupportedError(f"{path.name}: SentencePiece normalizer {norm.name!r} is not supported")
    tokens = [p.piece for p in m.pieces]
    types = [p.type for p in m.pieces]

    def name(i: int) -> str | None:
        return tokens[i] if 0 <= i < len(tokens) else None

    tok = sentencepiece_bpe(tokens, [p.score for p in m.pieces], types, norm.add_dummy_prefix,
                            name(trainer.unk_id), byte_fallback=trainer.byte_fallback)
    add_vocab_specials(tok, tokens, types)
    names = {"bos_token": name(trainer.bos_id), "eos_token": name(trainer.eos_id),
             "unk_token": name(trainer.unk_id), "pad_token": name(trainer.pad_id)}
    return tok, {k: v for k, v in names.items() if v is not None} | {"add_bos_token": True}


class Tokenizer:
    """Text <-> token ids for one model, with its chat template and its stop tokens."""

    def __init__(self, tok: HFTokenizer, config: dict, model_config: dict | None = None,
                 generation_config: dict | None = None, chat_template: str | None = None):
        self._tok = tok
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self._special_names = {k: v for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                               if (v := _token_str(config.get(k))) is not None}
        model_config, generation_config = model_config or {}, generation_config or {}
        self.generation_config: dict = generation_config  # the model's recommended sampling
        self.bos_token_id: int | None = (tok.token_to_id(self.bos_token) if self.bos_token
                                         else model_config.get("bos_token_id"))
        self.add_bos_token = bool(config.get("add_bos_token")) and self.bos_token_id is not None

        template = chat_template or config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template or None

        specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        stops = {*_ids(model_config.get("eos_token_id")), *_ids(generation_config.get("eos_token_id"))}
        if self.eos_token and (i := tok.token_to_id(self.eos_token)) is not None:
            stops.add(i)
        harmony = all(t in specials for t in HARMONY_ENDS)
        stops.update(specials[t] for t in END_OF_GENERATION if t in specials
                     and not (harmony and t == "<|end|>"))
        self.eos_token_ids: set[int] = stops
        self._anchor = next((i for t in ("a", "e", "x") if (i := tok.token_to_id(t)) is not None
                             and t not in specials and tok.decode([i, i]) == t + t), None)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def vocab(self) -> dict[str, int]:
        """Token string -> id, added tokens included."""
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def special_token_id(self, text: str) -> int | None:
        """The id of `text` where the vocabulary has it as one special (added) token."""
        return next((i for i, t in self._tok.get_added_tokens_decoder().items()
                     if t.content == text and t.special), None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`. Special tokens written in the text become their ids; with
        `add_special_tokens` BOS goes in front when the tokenizer asks for it (not twice when
        the text already starts with it, as chat templates often do)."""
        check_text(text)
        if add_special_tokens and self.bos_token and text.startswith(self.bos_token):
            add_special_tokens = False
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A fresh streaming detokenizer whose output concatenates to `decode(ids)`."""
        return StreamingDetokenizer(lambda ids: self.decode(ids, skip_special_tokens), self._anchor)

    @cached_property
    def _template(self):
        return compile_chat_template(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """The conversation as prompt text, rendered with the model's template (extra keyword
        arguments, e.g. `tools` or `enable_thinking`, go to the template)."""
        if self.chat_template is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        return render_chat_template(self._template, messages, add_generation_prompt,
                                    self._special_names, **kwargs)



def compile_chat_template(template: str):
    """A chat template compiled as transformers renders it: jinja2 sandboxed, trim_blocks and
    lstrip_blocks, `{% generation %}` marks, `raise_exception`, `tojson`, `strftime_now`."""
    from jinja2 import nodes
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' {% generation %} marks; no-op when rendering
        tags = {"generation"}

        def parse(self, parser) -> list[nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise EdgertError(f"chat template does not parse: {e}") from None


def render_chat_template(compiled, messages: list[dict], add_generation_prompt: bool,
                         special_names: dict, **kwargs) -> str:
    """Render a compiled chat template; `special_names` are bos_token, eos_token, ..."""
    from jinja2.exceptions import TemplateError

    variables = {"tools": None, "documents": None, **special_names, **kwargs}
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **variables)
    except TemplateError as e:
        raise EdgertError(f"chat template: {e}") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a package folder (`tokenizer.json` or `tokenizer.model`, plus configs)."""
    path = Path(path)
    config = _read_json(path / "tokenizer_config.json")
    if (path / "tokenizer.json").is_file():
        try:
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EdgertError(f"{path / 'tokenizer.json'}: corrupt tokenizer ({reason})") from None
    elif (path / "tokenizer.model").is_file():
        tok, defaults = _sentencepiece_tokenizer(path / "tokenizer.model")
        config = defaults | config
    else:
        raise EdgertError(f"{path} has neither tokenizer.json nor tokenizer.model")
    template = path / "chat_template.jinja"
    return Tokenizer(tok, config, _read_json(path / "config.json"),
                     _read_json(path / "generation_config.json"),
                     template.read_text(encoding="utf-8") if template.is_file() else None)
