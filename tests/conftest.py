"""Shared fixtures. Keep each one small; converted models are built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """The embedded default model, SmolLM2-135M-Instruct (llama, Q4_1 + Q8_0 + F32)."""
    from edgert.paths import default_model_gguf

    return default_model_gguf()


@pytest.fixture(scope="session")
def smollm_package(smollm_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted once per session into an MLX package folder."""
    from edgert.convert.api import convert_file

    return convert_file(smollm_gguf, tmp_path_factory.mktemp("smollm") / "SmolLM2-135M",
                        progress=False)
