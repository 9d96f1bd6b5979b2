"""Constrained decoding with llguidance: a grammar (JSON schema or Lark) becomes a logits
processor that masks every token the grammar cannot take next.

    lark = json_schema_grammar({"type": "object"})
    processor = GrammarProcessor(ll_tokenizer(tokenizer, vocab), lark)
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np

from .errors import EdgertError

# compact, but with the spaces models are used to seeing in JSON
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def ll_tokenizer(tokenizer, n_vocab: int):
    """llguidance's tokenizer for an edgert Tokenizer (made once per tokenizer: ~1 s)."""
    from llguidance import LLTokenizer

    cached = getattr(tokenizer, "_ll_tokenizer", None)
    if cached is None or cached.vocab_size != n_vocab:
        cached = LLTokenizer(tokenizer._tok.to_str(), n_vocab=n_vocab,
                             eos_token=sorted(tokenizer.eos_token_ids))
        tokenizer._ll_tokenizer = cached
    return cached


def json_schema_grammar(schema: dict) -> str:
    """The llguidance grammar of JSON documents that validate against `schema`."""
    from llguidance import LLMatcher

    try:
        return LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise EdgertError(f"JSON schema: {e}") from None


def check_grammar(ll_tok, grammar: str) -> None:
    """Raise EdgertError naming the problem if llguidance rejects the grammar."""
    from llguidance import LLMatcher

    message = LLMatcher.validate_grammar(grammar, ll_tok)
    if message and not message.startswith("WARNING"):
        raise EdgertError(f"grammar rejected: {message}")


class GrammarProcessor:
    """A logits processor `(tokens, logits) -> logits` for generate_step: tokens the grammar
    does not allow get -inf; once the grammar is complete only the stop tokens remain.

    generate_step calls it once for the prompt and then once per sampled token (the last of
    `tokens`), which is consumed into the matcher before the next mask."""

    def __init__(self, ll_tok, grammar: str):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(ll_tok, grammar, log_level=0)
        if self.matcher.is_error():
            raise EdgertError(f"grammar rejected: {self.matcher.get_error()}")
        self.n_vocab = ll_tok.vocab_size
        self._calls = 0

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._calls:
            self.matcher.consume_token(int(tokens[-1].item()))
        self._calls += 1
        if self.matcher.is_error():
            raise EdgertError(f"constrained decoding failed: {self.matcher.get_error()}")
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(words, bitorder="little")[: logits.shape[-1]].astype(bool)
        if allowed.size < logits.shape[-1]:  # ids past the tokenizer's vocabulary
            allowed = np.pad(allowed, (0, logits.shape[-1] - allowed.size))
        return mx.where(mx.array(allowed)[None], logits, -mx.inf)  # (1, V)
