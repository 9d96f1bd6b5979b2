"""Architectures, one module per HF model_type; found by import name plus a small remap."""

from __future__ import annotations

import importlib

from ..errors import UnsupportedError

# HF model_type -> module name, where they differ.
MODEL_REMAPPING = {"mistral": "llama", "smollm": "llama", "gemma3_text": "gemma3",
                   "qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe"}
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "bitnet", "gemma3_text", "qwen3_5",
             "qwen3_5_text", "qwen3_moe", "qwen3_5_moe", "qwen3_5_moe_text", "gpt_oss")


def get_classes(model_type: str):
    """(Model, ModelArgs) for an HF model_type."""
    name = MODEL_REMAPPING.get(model_type, model_type)
    try:
        module = importlib.import_module(f"edgert.models.{name}")
    except ModuleNotFoundError:
        raise UnsupportedError(
            f"unknown architecture {model_type!r} (supported: {', '.join(SUPPORTED)})"
        ) from None
    return module.Model, module.ModelArgs
