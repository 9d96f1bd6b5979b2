"""Rebuild an HF `tokenizer.json` (+ config files) from a GGUF file's vocabulary metadata."""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import UnsupportedError

# llama.cpp token types
CONTROL, USER_DEFINED = 3, 4

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (llama.cpp's llama-vocab.cpp).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return f.contents() if f is not None else default


def _byte_level_pre(pre: str):
    if pre in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    if pre in ("llama-bpe", "llama3", "smaug-bpe", "falcon3", "dbrx"):
        split = LLAMA3_PATTERN
    elif pre in ("qwen2", "deepseek-r1-qwen"):
        split = QWEN2_PATTERN
    elif pre in ("gpt-2", "gpt2", "default", "olmo", "mpt", "jais", "phi-2", ""):
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        raise UnsupportedError(f"GGUF pre-tokenizer {pre!r} is not supported yet")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_files_from_gguf(reader) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for a GGUF vocabulary."""
    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise UnsupportedError("the GGUF file has no tokenizer vocabulary")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = _byte_level_pre(_field(reader, "tokenizer.ggml.pre", "default"))
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = _field(reader, "tokenizer.ggml.unknown_token_id", 0)
        tok = Tokenizer(models.Unigram([(t, float(s)) for t, s in zip(tokens, scores)],
                                       unk_id=unk, byte_fallback=True))
        prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
        tok.normalizer = normalizers.Sequence(
            ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse()] + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    else:
        raise UnsupportedError(f"GGUF tokenizer model {kind!r} is not supported yet")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])

    def name(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    specials = {k: v for k in ("bos", "eos", "unk", "pad") if (v := name(k)) is not None}
    config = {f"{k}_token": v for k, v in specials.items()}
    config["add_bos_token"] = bool(_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama"))
    config["add_eos_token"] = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    if (template := _field(reader, "tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return {
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False).encode(),
        "special_tokens_map.json": json.dumps({f"{k}_token": v for k, v in specials.items()},
                                              indent=2, ensure_ascii=False).encode(),
    }
