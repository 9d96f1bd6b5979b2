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


@pytest.fixture(scope="session")
def quantized_smollm(smollm_gguf, tmp_path_factory):
    """A factory: `quantized_smollm("Q4_K_M")` is SmolLM2-135M-Instruct re-quantized by
    llama.cpp's llama-quantize (--allow-requantize, from the embedded Q4_1 + Q8_0 file) to that
    type (any name llama-quantize takes: Q4_K_M, Q1_0, TQ2_0, Q2_K, Q6_K, IQ4_NL, ...), made once
    per session. llama-quantize comes from tests/fetch_data.sh; without it the test fails."""
    import subprocess

    from testdata import data_file

    folder = tmp_path_factory.mktemp("llama-quantize")
    made: dict[str, Path] = {}

    def make(type_name: str) -> Path:
        if type_name not in made:
            tool = data_file("llama.cpp/bin/llama-quantize")
            out = folder / f"SmolLM2-135M-Instruct.{type_name}.gguf"
            run = subprocess.run([str(tool), "--allow-requantize", str(smollm_gguf), str(out),
                                  type_name, "2"], capture_output=True, text=True)
            if run.returncode:
                pytest.fail(f"llama-quantize {type_name} failed:\n{run.stderr[-2000:]}")
            made[type_name] = out
        return made[type_name]

    return make
