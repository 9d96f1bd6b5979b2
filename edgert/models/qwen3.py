"""Qwen3: HF model_type "qwen3" — Llama with RMSNorm on each head's queries and keys."""

from __future__ import annotations

from dataclasses import dataclass

from . import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True
    head_dim: int | None = None


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args, qk_norm=True)
