"""Qwen3: HF model_type "qwen3" — Llama with RMSNorm on each head's queries and keys."""

from __future__ import annotations

from dataclasses import dataclass

from . import llama
from .base import LLAMA_GGUF_TENSORS, GGUFSpec

MODEL_TYPES = ("qwen3",)
COREML_GRAPH = "llama"
GGUF = GGUFSpec("qwen3", "Qwen3ForCausalLM", LLAMA_GGUF_TENSORS, default_rope_theta=1e6)


@dataclass
class ModelArgs(llama.ModelArgs):
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True
    head_dim: int | None = None


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args, qk_norm=True)
