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


# (file type, --tensor-type patterns) for types that cannot take the whole of SmolLM2 (no
# fallback for its 576-wide rows: Q1_0) or would take minutes (IQ4_*); for Q2_K, whose file type
# puts Q3_K on the one tensor kind with whole blocks of 256 (ffn_down, 1536 wide); and "MIXED",
# one ffn_down each in types no file type above produces.
_TENSOR_TYPES = {
    "Q1_0": ("Q8_0", ["ffn_down=q1_0"]),
    "Q2_K": ("Q2_K", [r"blk\.\d\.ffn_down=q2_k"]),
    "IQ4_NL": ("Q8_0", [r"blk\.0\.=iq4_nl"]),
    "IQ4_XS": ("Q8_0", [r"blk\.0\.=iq4_xs"]),
    # a few layers only, so that the model stays in its trained regime (for llama.cpp peer tests)
    "Q1_0-FEW": ("Q8_0", [r"blk\.[0-3]\.ffn_down=q1_0"]),
    "TQ2_0-FEW": ("Q8_0", [r"blk\.[0-3]\.ffn_down=tq2_0"]),
    "MIXED": ("Q8_0", [rf"blk\.{i}\.ffn_down={t}" for i, t in
                       enumerate(["q5_k", "iq4_xs", "tq1_0", "q3_k", "q5_1", "q2_0"])]),
}


@pytest.fixture(scope="session")
def quantized_smollm(smollm_gguf, tmp_path_factory):
    """A factory: `quantized_smollm("Q4_K_M")` is SmolLM2-135M-Instruct re-quantized by
    llama.cpp's llama-quantize (--allow-requantize, from the embedded Q4_1 + Q8_0 file) to that
    type (a name llama-quantize takes: Q4_K_M, TQ2_0, Q2_0, Q2_K, Q6_K, ...), made once per
    session. Tensors whose rows are not whole blocks of the type get llama.cpp's fallback type;
    Q1_0 (no fallback) is ffn_down only and IQ4_NL / IQ4_XS layer 0 only, the rest Q8_0; Q2_K
    has ffn_down of layers 0-9 in Q2_K (its file type gives them Q3_K, as it does the rest);
    "MIXED" is Q8_0 with ffn_down of layers 0-5 in Q5_K, IQ4_XS, TQ1_0, Q3_K, Q5_1, Q2_0.
    llama-quantize comes from tests/fetch_data.sh; without it the test fails."""
    import subprocess

    from testdata import data_file

    folder = tmp_path_factory.mktemp("llama-quantize")
    made: dict[str, Path] = {}

    def make(type_name: str) -> Path:
        if type_name not in made:
            tool = data_file("llama.cpp/bin/llama-quantize")
            out = folder / f"SmolLM2-135M-Instruct.{type_name}.gguf"
            args = [str(tool), "--allow-requantize"]
            ftype, tensors = _TENSOR_TYPES.get(type_name, (type_name, []))
            for pattern in tensors:
                args += ["--tensor-type", pattern]
            run = subprocess.run(args + [str(smollm_gguf), str(out), ftype, "2"],
                                 capture_output=True, text=True)
            if run.returncode:
                pytest.fail(f"llama-quantize {type_name} failed:\n{run.stderr[-2000:]}")
            made[type_name] = out
        return made[type_name]

    return make
