"""Issue 14's classes of bad input, signals and limits: each ends in one EdgertError line (one
line on stderr and a non-zero exit from the CLI), nothing half-written. The files are written
by gguf-py, transformers and safetensors' own layout, then damaged."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest

from edgert import signals
from edgert.convert.api import convert_file
from edgert.convert.hf_reader import read_hf_folder
from edgert.errors import EdgertError
from edgert.generation import generate_step
from edgert.package import load_model
from test_cli import assert_one_line_error, run
from test_convert_gguf import assert_no_leftovers, assert_refused, patched, tiny_gguf


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "tiny.gguf"
    tiny_gguf(src, layers=2)
    return src


@pytest.fixture(scope="module")
def tiny_pkg(tiny_src, tmp_path_factory) -> Path:
    return convert_file(tiny_src, tmp_path_factory.mktemp("pkg") / "tiny", progress=False)


def copy_package(pkg: Path, dst: Path, edit_config=None) -> Path:
    """`pkg` linked file by file into `dst`, config.json rewritten by `edit_config(dict)`."""
    dst.mkdir()
    for f in pkg.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    config = json.loads((pkg / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def refused(fn, *words):
    with pytest.raises(EdgertError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message
    for w in words:
        assert w in message, message
    return message


def hf_folder(folder: Path, layers: int = 2) -> Path:
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------ 1. counts are checked


def set_field(key, value):
    def edit(r):
        r.fields[key].parts[-1][0] = value
    return edit


@pytest.mark.parametrize("key,value,words", [
    ("llama.block_count", 1 << 31, ["num_hidden_layers = 2147483648", "beyond any real model"]),
    ("llama.block_count", 1000, ["num_hidden_layers = 1000", "995 more", "2 layers"]),
    ("llama.attention.head_count", 0, ["num_attention_heads = 0", "positive integer"]),
    ("llama.attention.head_count_kv", 3, ["not a multiple"]),
    ("llama.vocab_size", 129, ["vocab_size = 129", "embed_tokens"]),
    ("llama.embedding_length", 65, ["hidden_size = 65"]),
])
def test_gguf_counts_checked_against_tensors(tiny_src, tmp_path, key, value, words):
    bad = patched(tiny_src, tmp_path / "bad.gguf", set_field(key, value))
    assert_refused(bad, tmp_path, str(bad), *words)


def test_hf_config_counts_checked(tmp_path):
    folder = hf_folder(tmp_path / "hf")
    edit_json(folder / "config.json", lambda c: c.update(num_hidden_layers=10**9))
    refused(lambda: read_hf_folder(folder), "config.json", "num_hidden_layers = 1000000000")
    edit_json(folder / "config.json", lambda c: c.update(num_hidden_layers=2,
                                                         num_attention_heads=0))
    refused(lambda: read_hf_folder(folder), "num_attention_heads = 0")


@pytest.mark.parametrize("edit,words", [
    (lambda c: c.update(num_hidden_layers=1000), ["num_hidden_layers = 1000", "995 more"]),
    (lambda c: c.update(num_attention_heads=0), ["num_attention_heads = 0"]),
    (lambda c: c.update(vocab_size=-1), ["vocab_size = -1"]),
    (lambda c: c.update(hidden_size="64"), ["hidden_size = '64'"]),
])
def test_package_config_counts_checked(tiny_pkg, tmp_path, edit, words):
    pkg = copy_package(tiny_pkg, tmp_path / "p", edit)
    refused(lambda: load_model(pkg), str(pkg / "config.json"), *words)


# ------------------------------------------------------------------ 2. the quantization block


@pytest.mark.parametrize("edit,words", [
    (lambda q: q.update(group_size=0), ["group_size = 0"]),
    (lambda q: q.update(bits=7), ["bits = 7"]),
    (lambda q: q.update(mode="int4"), ["mode 'int4'"]),
    (lambda q: q.update({"model.layers.0.mlp.up_proj": {"group_size": 0}}),
     ["'model.layers.0.mlp.up_proj'", "group_size = 0"]),
    (lambda q: q.update({"model.layers.0.mlp.up_proj": 3}), ["neither a layout"]),
])
def test_quantization_block_validated(tiny_pkg, tmp_path, edit, words):
    pkg = copy_package(tiny_pkg, tmp_path / "p", lambda c: edit(c["quantization"]))
    refused(lambda: load_model(pkg), str(pkg / "config.json"), *words)


def test_group_size_zero_is_one_line_not_sigfpe(tiny_pkg, tmp_path):
    pkg = copy_package(tiny_pkg, tmp_path / "p",
                       lambda c: c["quantization"].update(group_size=0))
    p = run("generate", str(pkg), "-p", "hi", "--raw", "-n", "2", env_home=tmp_path)
    assert p.returncode == 1
    assert_one_line_error(p, "group_size = 0")


# ------------------------------------------------------------------ 3/4. one signal policy


def test_sigterm_during_convert_leaves_nothing(smollm_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, EDGERT_HOME=str(tmp_path), NO_COLOR="1")
    proc = subprocess.Popen([sys.executable, "-m", "edgert", "convert", str(smollm_gguf),
                             "-o", str(out / "pkg")], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not list(out.glob(".pkg.*.partial")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(out.glob(".pkg.*.partial")), "the conversion never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "terminated (SIGTERM)", err
    assert "Traceback" not in err
    assert list(out.iterdir()) == []


def test_stale_partials_of_dead_processes_are_swept(tiny_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        stale = out / f".pkg.{dead.pid}-abcd1234.partial"
        busy = out / f".other.{live.pid}-abcd1234.partial"
        legacy = out / ".older.mlpackage.abcd1234"  # an older version's Core ML work folder
        mine = out / "keep.partial"  # not edgert's name pattern: left alone
        for d in (stale, busy, legacy, mine):
            (d / "x").mkdir(parents=True)
        old = time.time() - 2 * 3600
        os.utime(legacy, (old, old))
        convert_file(tiny_src, out / "pkg", progress=False)
        left = sorted(p.name for p in out.iterdir())
        assert left == sorted([busy.name, mine.name, "pkg"])
    finally:
        live.kill()


@pytest.fixture
def signal_policy():
    saved = {s: signal.getsignal(s) for s in signals.POLICY}
    # a suite started in the background (nohup, `cmd &`) inherits SIGINT ignored, which
    # install() rightly keeps; these tests are about the handler, so start from the default
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signals.install()
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    signals._pending = None


def test_interrupt_swallowed_by_coremltools_still_stops_the_export(tiny_src, tmp_path,
                                                                    monkeypatch, signal_policy):
    """coremltools' bare `except:` clauses can eat a Ctrl-C; the export must still stop
    before anything is committed, and leave nothing."""
    from edgert.convert import coreml_writer
    from edgert.convert.api import read_source

    class Swallowed:
        def save(self, path):
            Path(path).mkdir()
            try:  # what a bare except in coremltools does to the signal
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
            except:  # noqa: E722
                pass

    monkeypatch.setattr(coreml_writer, "convert_multifunction", lambda *a, **k: Swallowed())
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        coreml_writer.write_coreml(read_source(tiny_src), out / "m.mlpackage", context=64)
    assert signals.pending() == signal.SIGINT
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------ 5. prompt vs context


def test_prompt_longer_than_context_is_refused(tiny_pkg):
    model, config = load_model(tiny_pkg)
    limit = config["max_position_embeddings"]
    prompt = mx.array(np.arange(limit + 44) % 100, dtype=mx.uint32)
    refused(lambda: next(generate_step(prompt, model)), f"({limit + 44} tokens)",
            f"context of {limit} tokens")
    # a prompt that fits generates only up to the context
    fits = mx.array(np.arange(limit - 3) % 100, dtype=mx.uint32)
    assert len(list(generate_step(fits, model, max_tokens=50))) == 4


def test_prompt_longer_than_context_cli_and_chat(smollm_package, tmp_path):
    pkg = copy_package(smollm_package, tmp_path / "p",
                       lambda c: c.update(max_position_embeddings=64))
    p = run("generate", str(pkg), "-p", "word " * 200, "-n", "4", env_home=tmp_path)
    assert_one_line_error(p, "context of 64 tokens")
    from edgert.chat import ChatSession
    from edgert.package import load

    session = ChatSession(*load(pkg))
    refused(lambda: list(session.reply("word " * 200, 4, {})), "context of 64 tokens")


# ------------------------------------------------------------------ 6. paths leave the folder


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/outside.safetensors"])
def test_index_naming_files_outside_the_folder(tmp_path, name):
    folder = hf_folder(tmp_path / "hf")
    shutil.copy(folder / "model.safetensors", tmp_path / "outside.safetensors")
    weights = json.loads(json.dumps({"weight_map": {"lm_head.weight": name}}))
    (folder / "model.safetensors.index.json").write_text(json.dumps(weights))
    refused(lambda: read_hf_folder(folder), "outside the model folder", name)


# ------------------------------------------------------------------ generic errors, named


def write_safetensors(path: Path, header: dict, data: bytes, length: int | None = None):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def st_folder(tmp_path: Path, header: dict, data: bytes, length: int | None = None) -> Path:
    folder = hf_folder(tmp_path / "hf")
    write_safetensors(folder / "model.safetensors", header, data, length)
    return folder


def test_safetensors_header_length_absurd(tmp_path):
    folder = st_folder(tmp_path, {}, b"", length=1 << 60)
    refused(lambda: read_hf_folder(folder), "model.safetensors", "header of 1152921504606846976")


def test_safetensors_entry_shorter_than_its_shape(tmp_path):
    header = {"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 200]},
              "model.embed_tokens.weight": {"dtype": "F32", "shape": [2],
                                            "data_offsets": [200, 208]}}
    folder = st_folder(tmp_path, header, bytes(208))
    refused(lambda: read_hf_folder(folder), "model.norm.weight holds 200 bytes",
            "needs 256")
    header["model.norm.weight"]["data_offsets"] = [0, 256]
    header["model.embed_tokens.weight"]["data_offsets"] = [248, 256]
    folder = st_folder(tmp_path / "2", header, bytes(256))
    refused(lambda: read_hf_folder(folder), "overlap")


def test_config_not_json(tmp_path):
    folder = hf_folder(tmp_path / "hf")
    (folder / "config.json").write_text("{ not json")
    p = run("convert", str(folder), "-o", str(tmp_path / "out"), env_home=tmp_path)
    assert_one_line_error(p, "config.json", "not valid JSON")
    assert not (tmp_path / "out").exists()


def test_corrupt_tokenizer_json(smollm_package, tmp_path):
    from edgert.tokenizer import load_tokenizer

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    refused(lambda: load_tokenizer(bad), "tokenizer.json", "corrupt tokenizer")
    tok = json.loads((smollm_package / "tokenizer.json").read_text())
    tok["model"]["merges"].append(["<not a token>", "neither"])
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    refused(lambda: load_tokenizer(bad), "tokenizer.json", "corrupt tokenizer")


def test_invalid_utf8_prompt(smollm_package, tmp_path):
    env = dict(os.environ, EDGERT_HOME=str(tmp_path), NO_COLOR="1")
    p = subprocess.run([sys.executable, "-m", "edgert", "generate", str(smollm_package), "-p",
                        b"caf\xe9 \xff"], capture_output=True, env=env, timeout=300)
    p.stderr = p.stderr.decode()
    assert_one_line_error(p, "not valid UTF-8")
    p = subprocess.run([sys.executable, "-m", "edgert", "generate", str(smollm_package), "-p",
                        "-"], input=b"\xff\xfe", capture_output=True, env=env, timeout=300)
    p.stderr = p.stderr.decode()
    assert_one_line_error(p, "not valid UTF-8")


def test_coreml_manifest_missing_fields(tmp_path):
    from edgert.coreml_manifest import manifest_path

    pkg = tmp_path / "m.mlpackage"
    manifest_path(pkg).parent.mkdir(parents=True)
    manifest_path(pkg).write_text(json.dumps({"format": "edgert-coreml", "format_version": 1}))
    p = run("generate", str(pkg), "-p", "hi", env_home=tmp_path)
    assert_one_line_error(p, "manifest.json", "context_length")


def test_full_disk_and_unwritable_output(tiny_src, tmp_path, monkeypatch):
    from edgert.convert import mlx_writer

    def full(self, name, a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    with monkeypatch.context() as m:
        m.setattr(mlx_writer.ShardWriter, "add", full)
        refused(lambda: convert_file(tiny_src, tmp_path / "out" / "pkg", progress=False),
                "out/pkg", "No space left on device")
    assert_no_leftovers(tmp_path / "out")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    p = run("convert", str(tiny_src), "--to", "coreml", "-o", str(blocker / "m.mlpackage"),
            env_home=tmp_path)
    assert_one_line_error(p, "cannot write")


# ------------------------------------------------------------------ one line, not thousands


def test_missing_parameters_are_summarised(tiny_pkg, tmp_path):
    pkg = copy_package(tiny_pkg, tmp_path / "p", lambda c: (c.pop("quantization"),
                                                            c.pop("quantization_config")))
    refused(lambda: load_model(pkg), "no quantization block", "and ")
    weights = dict(mx.load(str(tiny_pkg / "model.safetensors")))
    for k in [k for k in weights if k.startswith("model.layers.1.")][:-1]:
        del weights[k]
    part = copy_package(tiny_pkg, tmp_path / "q")
    (part / "model.safetensors").unlink()
    mx.save_safetensors(str(part / "model.safetensors"), weights)
    message = refused(lambda: load_model(part), "missing (model.layers.1.")
    assert "more" in message


# ------------------------------------------------------------------ accepted although wrong


@pytest.mark.parametrize("how", ["off by one", "overlapping"])
def test_gguf_tensor_offsets_must_follow_each_other(tiny_src, tmp_path, how):
    def edit(r):
        parts = r.tensors[3].field.parts
        parts[-1][0] = (parts[-1][0] + 1 if how == "off by one"
                        else r.tensors[2].field.parts[-1][0])
    bad = patched(tiny_src, tmp_path / "bad.gguf", edit)
    assert_refused(bad, tmp_path, "data starts at offset", "aligned to 32")


def test_rope_scaling_linear_without_factor(tmp_path):
    src = tmp_path / "rope.gguf"
    tiny_gguf(src, layers=1, meta={"llama.rope.scaling.type": "linear"})
    assert_refused(src, tmp_path, "rope_type 'linear' needs a positive finite factor")


@pytest.mark.parametrize("option,value,word", [
    ("--temp", "-1", "temperature"), ("--temp", "nan", "temperature"),
    ("--top-p", "2", "top_p"), ("--top-k", "-5", "top_k"), ("--min-p", "5", "min_p"),
    ("--repetition-penalty", "0", "repetition_penalty")])
def test_sampling_options_out_of_range(tmp_path, option, value, word):
    p = run("generate", str(tmp_path / "never-loaded"), "-p", "hi", option, value,
            env_home=tmp_path)
    assert_one_line_error(p, word, value)


def test_weights_beyond_the_machines_memory(tiny_pkg, monkeypatch):
    import edgert.validate

    monkeypatch.setattr(edgert.validate, "physical_memory", lambda: 1000)
    refused(lambda: load_model(tiny_pkg), "the weights of", "more than this machine's")


def test_sigterm_ends_chat_while_ctrl_c_only_stops_a_reply():
    from edgert.signals import Interrupted, stop_requested

    assert stop_requested(Interrupted(signal.SIGTERM)) and stop_requested(
        Interrupted(signal.SIGHUP))
    assert not stop_requested(KeyboardInterrupt()) and not stop_requested(
        Interrupted(signal.SIGINT))


def test_signal_in_a_destructor_stays_pending(signal_policy, capfd):
    """A signal landing in __del__ cannot propagate there: no traceback is printed, and the
    next raise_pending (each generated token, each writer's commit) raises it."""
    import gc

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)

    x = Finalized()
    del x
    gc.collect()
    assert signals.pending() == signal.SIGTERM
    assert "Traceback" not in capfd.readouterr().err
    with pytest.raises(signals.Interrupted):
        signals.raise_pending()
