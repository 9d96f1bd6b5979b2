"""Qwen2 / Qwen2.5: HF model_type "qwen2" — Llama with biased q/k/v projections."""

from __future__ import annotations

from dataclasses import dataclass

from . import llama
from .base import LLAMA_GGUF_TENSORS, GGUFSpec

MODEL_TYPES = ("qwen2",)
COREML_GRAPH = "llama"
GGUF = GGUFSpec("qwen2", "Qwen2ForCausalLM", LLAMA_GGUF_TENSORS, default_rope_theta=1e6)


@dataclass
class ModelArgs(llama.ModelArgs):
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = False


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args, bias=True)
