"""Rebuild an HF tokenizer (`tokenizer.json` + config files) from a GGUF file's vocabulary.

The result tokenizes as llama.cpp does (src/llama-vocab.cpp): byte-level BPE with the
pre-tokenizer splits named by `tokenizer.ggml.pre`, or SentencePiece-style BPE that merges
the best-scoring adjacent pair first, with byte fallback and a `▁` space prefix (the builders
are edgert.vocab's).
"""

from __future__ import annotations

import json

from edgert.errors import UnsupportedError
from edgert.vocab import (NORMAL, PRE_TOKENIZERS, SPECIAL_IDS, add_bos_processor,
                          add_vocab_specials, byte_level_bpe, sentencepiece_bpe, spm_style_bpe)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return f.contents() if f is not None else default


def tokenizer_files_from_gguf(reader) -> dict[str, bytes]:
    """`tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` rebuilt from a
    GGUF file's `tokenizer.*` metadata (`reader` is a `gguf.GGUFReader`)."""
    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise UnsupportedError("the GGUF file has no tokenizer vocabulary")
    types = _field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)

    ids = {k: i for k, key in SPECIAL_IDS.items()
           if (i := _field(reader, f"tokenizer.ggml.{key}_token_id")) is not None
           and 0 <= i < len(tokens)}
    names = {f"{k}_token": tokens[i] for k, i in ids.items()}

    if kind == "gpt2":
        pre = _field(reader, "tokenizer.ggml.pre") or "default"
        tok = byte_level_bpe(tokens, _field(reader, "tokenizer.ggml.merges", []), pre)
        add_bos = PRE_TOKENIZERS[pre].add_bos
    elif kind == "llama":
        scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        tok = sentencepiece_bpe(tokens, scores, types,
                                bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)),
                                names.get("unk_token"))
        add_bos = True
    elif kind == "gemma4":
        tok = spm_style_bpe(tokens, _field(reader, "tokenizer.ggml.merges", []))
        add_bos = True
    else:
        raise UnsupportedError(f"GGUF tokenizer model {kind!r} is not supported")
    add_vocab_specials(tok, tokens, types)

    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", add_bos)) and "bos" in ids
    if add_bos:
        add_bos_processor(tok, names["bos_token"], ids["bos"])
    config = {**names, "add_bos_token": add_bos,
              "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
              "clean_up_tokenization_spaces": False,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    arch = _field(reader, "general.architecture")
    if (n_ctx := _field(reader, f"{arch}.context_length")) is not None:
        config["model_max_length"] = int(n_ctx)
    if (template := _field(reader, "tokenizer.chat_template")) is not None:
        config["chat_template"] = template

    def dump(obj) -> bytes:
        return json.dumps(obj, indent=2, ensure_ascii=False).encode()

    return {"tokenizer.json": tok.to_str().encode(),
            "tokenizer_config.json": dump(config),
            "special_tokens_map.json": dump(names)}
