"""Build HF tokenizers from bare vocabularies (token lists, merges, scores, types), as the GGUF
reader (edgert.convert.gguf_tokenizer) and SentencePiece `.model` files need them.

The result tokenizes as llama.cpp does (src/llama-vocab.cpp): byte-level BPE with the
pre-tokenizer splits named by `tokenizer.ggml.pre`, or SentencePiece-style BPE that merges
the best-scoring adjacent pair first, with byte fallback and a `▁` space prefix.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing

from .errors import UnsupportedError

# Token types, numbered as in llama.cpp and SentencePiece's ModelProto.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# HF special-token name -> GGUF `tokenizer.ggml.<key>_token_id`
SPECIAL_IDS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}

# Split patterns as in the models' own tokenizer.json files (llama.cpp rewrites some of them
# for std::regex, e.g. (?i:'s) -> '[sS]; Oniguruma takes the originals).
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
          r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}"
         rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class PreTokenizer(NamedTuple):
    """How llama.cpp pre-tokenizes one `tokenizer.ggml.pre` family."""

    splits: tuple[str, ...]  # applied in order, each isolating its matches
    ignore_merges: bool = False  # a pre-token that is a whole vocabulary entry skips BPE
    add_bos: bool = False  # llama.cpp's default when the file has no add_bos_token


def _family(names: str, pre: PreTokenizer) -> dict[str, PreTokenizer]:
    return dict.fromkeys(names.split(), pre)


# llama-vocab.cpp: the `tokenizer_pre` -> pre-type table and llm_tokenizer_bpe's regex_exprs.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **_family("gpt-2 gpt2 phi-2 mpt olmo jais trillion granite-docling jina-es jina-de "
              "jina-v2-es jina-v2-de gigachat a.x-4.0 mellum modern-bert",
              PreTokenizer((GPT2,))),
    **_family("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
              PreTokenizer((LLAMA3,), ignore_merges=True, add_bos=True)),
    **_family("dbrx smaug-bpe chatglm-bpe", PreTokenizer((LLAMA3,))),
    **_family("glm4 glm5", PreTokenizer((LLAMA3,), ignore_merges=True)),
    **_family("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open",
              PreTokenizer((QWEN2,))),
    "qwen35": PreTokenizer((QWEN35,)),
    **_family("smollm starcoder refact command-r codeshell exaone minerva-7b mellum2",
              PreTokenizer((r"\p{N}", GPT2))),
    "tekken": PreTokenizer((TEKKEN,), ignore_merges=True, add_bos=True),
    **_family("gpt-4o llama4 kanana2 talkie minimax-m2", PreTokenizer((GPT4O,))),
    "deepseek-coder": PreTokenizer((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+",
                                    "[一-龥ࠀ-一가-퟿]+", r"\p{N}")),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]")),
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]")),
}


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], pre: str) -> Tokenizer:
    """GPT-2-style BPE over byte-level tokens, pre-tokenized as llama.cpp does for `pre`."""
    if (spec := PRE_TOKENIZERS.get(pre)) is None:
        raise UnsupportedError(f"GGUF pre-tokenizer {pre!r} is not supported")
    pairs = []
    for m in merges:  # llama.cpp splits at the first space after the first character
        i = m.find(" ", 1)
        pairs.append((m[:i], m[i + 1:]))
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, pairs,
                               ignore_merges=spec.ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_style_bpe(tokens: Sequence[str], merges: Sequence[str]) -> Tokenizer:
    """Gemma 4's vocabulary (llama.cpp tokenizer model "gemma4"): BPE with ranked merges over
    raw UTF-8 with spaces as `▁`, no word-level split (llama.cpp splits only at newline runs,
    which no merge crosses), `<0xXX>` byte fallback."""
    pairs = []
    for m in merges:  # llama.cpp splits at the first space after the first character
        i = m.find(" ", 1)
        pairs.append((m[:i], m[i + 1:]))
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, pairs, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|[\n]+"), behavior="isolated")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def sentencepiece_bpe(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int],
                      add_space_prefix: bool, unk: str | None = None,
                      byte_fallback: bool = True) -> Tokenizer:
    """SentencePiece BPE (llama.cpp's `llama` vocabulary, or a `tokenizer.model`).

    Both merge the adjacent pair whose concatenation is the best-scoring token; as BPE ranks
    that is every split of every token, ordered by the token's score. Spaces become `▁`,
    a `▁` goes in front of each text run when `add_space_prefix`, and characters outside the
    vocabulary fall back to `<0xXX>` byte tokens.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, (t, score, kind) in enumerate(zip(tokens, scores, types)):
        if kind in (NORMAL, USER_DEFINED, UNUSED):
            ranked += [(-score, i, t[:k], t[k:]) for k in range(1, len(t))
                       if t[:k] in vocab and t[k:] in vocab]
    ranked.sort()
    tok = Tokenizer(models.BPE(vocab, [(a, b) for *_, a, b in ranked], unk_token=unk,
                               fuse_unk=True, byte_fallback=byte_fallback))
    tok.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if add_space_prefix else []) + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    return tok


def add_vocab_specials(tok: Tokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Control and unknown-type tokens become special added tokens, user-defined ones plain
    added tokens: llama.cpp matches all of them whole in the text, before the model runs."""
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED])


def add_bos_processor(tok: Tokenizer, bos: str, bos_id: int) -> None:
    """Make `encode(..., add_special_tokens=True)` put BOS in front, for any reader of the file."""
    tok.post_processor = TemplateProcessing(single=f"{bos}:0 $A:0",
                                            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                            special_tokens=[(bos, bos_id)])
