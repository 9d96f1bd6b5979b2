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
    p = run("chat", str(smollm_package), "-n", "40", env_home=tmp_path,
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
