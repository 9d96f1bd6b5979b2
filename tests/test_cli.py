"""The `edgert` command as a user runs it: exit codes, one-line errors, no leftovers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args, env_home: Path, stdin: str | None = None, timeout: int = 300):
    env = dict(os.environ, EDGERT_HOME=str(env_home), NO_COLOR="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "edgert", *args], input=stdin, text=True,
                          capture_output=True, env=env, timeout=timeout)


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w.lower() in err.lower(), err


def test_generate_json(smollm_package, tmp_path):
    p = run("generate", str(smollm_package), "-p", "What is the capital of France?", "-n", "24",
            "--json", env_home=tmp_path)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert "Paris" in out["text"]
    assert out["generation_tokens"] == len(out["tokens"]) > 0
    assert out["finish_reason"] in ("stop", "length")


def test_chat_multi_turn_from_stdin(smollm_package, tmp_path):
    p = run("chat", str(smollm_package), "-n", "40", "--temp", "0", env_home=tmp_path,
            stdin="What is the capital of France?\n/reset\nAnd of Italy?\n/exit\n")
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout
    assert "conversation reset" in p.stdout
    assert p.stdout.count("tok/s") == 4  # a stats line (prompt and generation) after each reply


def test_info_shows_the_quantization_breakdown(smollm_package, tmp_path):
    p = run("info", str(smollm_package), env_home=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "llama" in p.stdout and "Q4_1" in p.stdout and "Q8_0" in p.stdout
    data = json.loads(run("info", str(smollm_package), "--json", env_home=tmp_path).stdout)
    assert 130e6 < data["parameters"] < 140e6
    assert 4.0 < data["bits_per_weight"] < 9.0


def test_missing_model(tmp_path):
    assert_one_line_error(run("info", str(tmp_path / "nope.gguf"), env_home=tmp_path), "nope.gguf")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    proc = run("generate", str(bad), "-p", "hi", env_home=tmp_path / "home")
    assert_one_line_error(proc, "gguf")
    assert not any((tmp_path / "home").rglob("*.safetensors"))


def test_truncated_gguf_leaves_no_cache_entry(tmp_path):
    from edgert.paths import default_model_gguf

    data = default_model_gguf().read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) // 3])
    home = tmp_path / "home"
    assert_one_line_error(run("generate", str(bad), "-p", "hi", env_home=home))
    leftovers = list((home / "models").iterdir()) if (home / "models").exists() else []
    assert leftovers == []


def test_convert_refuses_existing_output(smollm_package, tmp_path):
    from edgert.paths import default_model_gguf

    out = tmp_path / "out"
    out.mkdir()
    assert_one_line_error(run("convert", str(default_model_gguf()), "-o", str(out),
                              env_home=tmp_path), "exists")


def test_empty_prompt(smollm_package, tmp_path):
    assert_one_line_error(run("generate", str(smollm_package), "-p", "  ", env_home=tmp_path),
                          "empty prompt")


def test_debug_shows_traceback(tmp_path):
    p = run("--debug", "info", str(tmp_path / "nope.gguf"), env_home=tmp_path)
    assert p.returncode != 0 and "Traceback" in p.stderr


# -------------------------------------------------------------------------------------------
# Core ML: `convert --to coreml`, then `chat` / `generate --engine coreml` (the numpy MIL
# interpreter here) against the MLX engine on the same GGUF
# -------------------------------------------------------------------------------------------

COREML_CONTEXT = 256


@pytest.fixture(scope="module")
def coreml_package(tmp_path_factory) -> Path:
    """The default model exported by the CLI (all 30 blocks; a few minutes on 2 cores)."""
    from edgert.paths import default_model_gguf

    root = tmp_path_factory.mktemp("coreml")
    out = root / "SmolLM2.mlpackage"
    p = run("convert", str(default_model_gguf()), "--to", "coreml", "-o", str(out),
            "--context", str(COREML_CONTEXT), env_home=root, timeout=1200)
    assert p.returncode == 0, p.stderr
    assert f"wrote {out}" in p.stdout and "context 256" in p.stdout
    assert sorted(x.name for x in root.iterdir()) == ["SmolLM2.mlpackage"]  # no temp folder
    return out


def test_coreml_export_decodes_like_mlx(coreml_package, smollm_package):
    """The exported program, run op by op, gives the MLX engine's greedy tokens and logits
    (fp16 Core ML vs float32 MLX) through prefill and several decode steps."""
    import mlx.core as mx
    import numpy as np

    from edgert.coreml_engine import load_coreml
    from edgert.generation import generate_step
    from edgert.package import load

    coreml, tok = load_coreml(coreml_package, backend="interpreter")
    assert coreml.context == COREML_CONTEXT and coreml.manifest["num_hidden_layers"] == 30
    model, mlx_tok = load(smollm_package)
    prompt = mx.array(tok.encode("The capital of France is"), dtype=mx.uint32)
    assert prompt.tolist() == mlx_tok.encode("The capital of France is")
    ours = list(generate_step(prompt, coreml, max_tokens=6))
    ref = list(generate_step(prompt, model, max_tokens=6))
    assert [t for t, _ in ours] == [t for t, _ in ref]
    for (_, a), (_, b) in zip(ours, ref):  # logprobs (vocab,)
        a, b = np.array(a), np.array(b)
        top = np.argsort(b)[-50:]  # where the probability mass is
        assert np.abs(a[top] - b[top]).max() < 0.1, np.abs(a[top] - b[top]).max()


def _replies(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if "tok/s" not in line]


def test_chat_engine_coreml_matches_mlx(coreml_package, smollm_package, tmp_path):
    stdin = "What is the capital of France?\n/exit\n"
    # greedy: chat samples with the model's recommended settings unless told otherwise
    mlx = run("chat", str(smollm_package), "-n", "8", "--temp", "0", env_home=tmp_path,
              stdin=stdin)
    coreml = run("chat", "--engine", "coreml", str(coreml_package), "-n", "8", "--temp", "0",
                 env_home=tmp_path, stdin=stdin, timeout=900)
    assert mlx.returncode == 0 and coreml.returncode == 0, coreml.stderr
    assert "Paris" in mlx.stdout
    assert _replies(coreml.stdout) == _replies(mlx.stdout)
    assert coreml.stdout.count("tok/s") == 2  # one stats line: prompt and generation


def test_coreml_convert_errors(tmp_path):
    from edgert.paths import default_model_gguf

    gguf = str(default_model_gguf())
    existing = tmp_path / "exists.mlpackage"
    existing.mkdir()
    assert_one_line_error(run("convert", gguf, "--to", "coreml", "-o", str(existing),
                              env_home=tmp_path), "exists", "--force")
    assert_one_line_error(run("convert", gguf, "--to", "coreml", "-o",
                              str(tmp_path / "long.mlpackage"), "--context", "100000",
                              env_home=tmp_path), "context 100000", "8192")
    assert_one_line_error(run("convert", gguf, "--to", "coreml", "-o",
                              str(tmp_path / "m.mlmodel"), env_home=tmp_path), ".mlpackage")
    assert_one_line_error(run("convert", gguf, "-o", str(tmp_path / "mlx"), "--context", "64",
                              env_home=tmp_path), "--to coreml")
    hf = tmp_path / "phi3"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "phi3", "hidden_size": 64}))
    assert_one_line_error(run("convert", str(hf), "--to", "coreml", "-o",
                              str(tmp_path / "phi3.mlpackage"), env_home=tmp_path), "phi3")
    assert_one_line_error(run("chat", "--engine", "coreml", str(tmp_path / "none.mlpackage"),
                              env_home=tmp_path, stdin="/exit\n"), "no such core ml package")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.mlpackage", "phi3"]
