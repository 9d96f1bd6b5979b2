"""An audit of edgert's promise on bad input, run through the real CLI (`python -m edgert`):

    .venv/bin/python bench/audit.py [--json audit.json] [--only SUBSTRING] [--fuzz 200]

It crafts damaged GGUF files, HF safetensors folders, MLX and Core ML packages, misuses the
CLI, interrupts conversions with SIGINT / SIGTERM / SIGHUP, and fills the disk (a file-size
limit); then checks each run: a non-zero exit (128 + n for signal n), exactly one line on
stderr, no traceback, not the generic "run with --debug" fallback, no hang, and nothing
half-written (no temporary siblings in the output folder or the cache, no output unless the
run succeeded, an existing output untouched). Prints counts per group and every failure.
`--fuzz N` adds N byte-mutated GGUF headers through `convert`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

TEMP = re.compile(r"^\..+\.(\d+-)?[A-Za-z0-9_]{8}(\.partial|\.old)?$")


@dataclass
class Case:
    group: str
    name: str
    args: list
    stdin: bytes | None = None
    out: Path | None = None  # must not exist afterwards (or keep its digest, if it existed)
    signal_after: tuple[int, float] | None = None  # (signal, seconds or a glob to wait for)
    wait_for: str | None = None  # glob under `out.parent` that shows writing started
    fsize: int | None = None  # RLIMIT_FSIZE bytes: a full disk
    timeout: float = 300
    expect_ok: bool = False
    may_succeed: bool = False  # a mutation may leave the file valid: then the output is complete


@dataclass
class Result:
    case: Case
    rc: int
    stderr: str
    seconds: float
    problems: list = field(default_factory=list)
    note: str = ""


def digest(path: Path) -> str | None:
    if not path.exists():
        return None
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def leftovers(*folders: Path) -> list[str]:
    found = []
    for folder in folders:
        if folder and folder.is_dir():  # the cache recursively; an output's own folder
            found += [str(p) for p in folder.rglob(".*") if TEMP.match(p.name)]
    return found


def run_case(case: Case, home: Path) -> Result:
    env = dict(os.environ, EDGERT_HOME=str(home), NO_COLOR="1", COLUMNS="200")
    before = digest(case.out) if case.out else None

    def limits():
        if case.fsize:
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.fsize, case.fsize))

    t0 = time.time()
    argv = [a if isinstance(a, bytes) else str(a) for a in case.args]
    proc = subprocess.Popen([sys.executable, "-m", "edgert", *argv], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=limits)
    sent = False
    if case.signal_after:
        sig, delay = case.signal_after
        if case.wait_for:
            end = time.time() + 120
            while (not list(case.out.parent.glob(case.wait_for)) and time.time() < end
                   and proc.poll() is None):
                time.sleep(0.02)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(sig)
            sent = True
    try:
        _, err = proc.communicate(case.stdin, timeout=case.timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        rc = None
    r = Result(case, rc, err.decode("utf-8", "replace"), time.time() - t0)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if rc is None:
        r.problems.append("hang")
    elif case.expect_ok or (case.signal_after and not sent) or (case.may_succeed and rc == 0):
        if rc != 0:  # (the first two: expected to succeed, or finished before the signal)
            r.problems.append(f"exit {rc}")
        if case.out is not None and case.args[0] == "convert" and not (
                case.out / "config.json").is_file() and case.out.suffix != ".mlpackage":
            r.problems.append("succeeded without a complete output")
    elif case.signal_after and rc == -case.signal_after[0]:
        r.note = "the signal's default action: it came before edgert's handlers were installed"
    else:
        if rc == 0:
            r.problems.append("exit 0")
        elif rc < 0 or rc > 128 and not case.signal_after:
            r.problems.append(f"killed by a signal (exit {rc})")
        elif case.signal_after and rc != 128 + case.signal_after[0]:
            r.problems.append(f"exit {rc} after signal {case.signal_after[0]}")
        if len(lines) != 1:
            r.problems.append(f"{len(lines)} lines on stderr")
        if "Traceback" in r.stderr:
            r.problems.append("traceback")
        if "run with --debug" in r.stderr:
            r.problems.append("generic error")
    if left := leftovers(home) + [str(p) for p in (case.out.parent.glob(".*") if case.out
                                                   else []) if TEMP.match(p.name)]:
        r.problems.append(f"left behind: {left[:3]}")
    if case.out is not None:
        after = digest(case.out)
        if before is not None and after != before:
            r.problems.append("existing output changed")
        if before is None and after is not None and rc != 0:
            r.problems.append("output written although the run failed")
    return r


# ------------------------------------------------------------------ crafting inputs


def gguf_cases(work: Path) -> list[Case]:
    import gguf
    from test_convert_gguf import patched, tiny_gguf

    src = work / "tiny.gguf"
    tiny_gguf(src, layers=2)
    data = src.read_bytes()
    cases = []

    def add(name, path):
        out = work / "out" / name / "pkg"
        out.parent.mkdir(parents=True)
        cases.append(Case("gguf", name, ["convert", path, "-o", out], out=out))
        cases.append(Case("gguf", name + " (info, cache)", ["info", path]))

    def raw(name, blob):
        p = work / f"{name}.gguf"
        p.write_bytes(blob)
        add(name, p)

    def field_(name, key, value):
        def edit(r):
            r.fields[key].parts[-1][0] = value
        add(name, patched(src, work / f"{name}.gguf", edit))

    raw("empty", b"")
    raw("bad-magic", b"GGML" + data[4:])
    raw("version-7", data[:4] + (7).to_bytes(4, "little") + data[8:])
    raw("big-endian", data[:4] + (3).to_bytes(4, "big") + data[8:])
    for n in (3, 10, 23, 30, 200, 2000, len(data) // 2, len(data) - 1):
        raw(f"truncated-{n}", data[:n])
    raw("tensor-count-2^50", data[:8] + (1 << 50).to_bytes(8, "little") + data[16:])
    raw("kv-count-2^50", data[:16] + (1 << 50).to_bytes(8, "little") + data[24:])
    field_("block-count-2^31", "llama.block_count", 1 << 31)
    field_("block-count-1000", "llama.block_count", 1000)
    field_("block-count-0", "llama.block_count", 0)
    field_("heads-0", "llama.attention.head_count", 0)
    field_("kv-heads-3", "llama.attention.head_count_kv", 3)
    field_("kv-heads-0", "llama.attention.head_count_kv", 0)
    field_("hidden-65", "llama.embedding_length", 65)
    field_("ffn-0", "llama.feed_forward_length", 0)
    field_("vocab-129", "llama.vocab_size", 129)
    field_("context-0", "llama.context_length", 0)

    def edit_string(r):
        r.fields["general.architecture"].parts[3][0] = 1 << 62
    add("string-length-2^62", patched(src, work / "s.gguf", edit_string))

    def tensor_edit(name, fn):
        add(name, patched(src, work / f"{name}.gguf", fn))

    def off(i, value):
        def edit(r):
            r.tensors[i].field.parts[-1][0] = value(r)
        return edit

    tensor_edit("offset-beyond-end", off(-1, lambda r: 1 << 40))
    tensor_edit("offset-plus-one", off(3, lambda r: int(r.tensors[3].field.parts[-1][0]) + 1))
    tensor_edit("offset-overlap", off(3, lambda r: int(r.tensors[2].field.parts[-1][0])))

    def type_edit(r):
        r.tensors[2].field.parts[4][0] = 250
    tensor_edit("tensor-type-250", type_edit)

    def dims_edit(r):
        r.tensors[2].field.parts[3][0] = 1 << 40
    tensor_edit("tensor-dims-2^40", dims_edit)

    for name, meta in [("rope-linear-no-factor", {"llama.rope.scaling.type": "linear"}),
                       ("rope-type-unknown", {"llama.rope.scaling.type": "ntk-weird"}),
                       ("alignment-0", {"general.alignment": 0}),
                       ("alignment-3", {"general.alignment": 3})]:
        p = work / f"{name}.gguf"
        try:
            tiny_gguf(p, layers=1, meta=meta)
        except Exception:  # noqa: BLE001 - gguf-py itself may refuse to write it
            continue
        add(name, p)
    arch = work / "arch.gguf"
    w = gguf.GGUFWriter(arch, "mamba9")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    add("unknown-architecture", arch)
    d = work / "dir.gguf"
    d.mkdir()
    add("a-folder-named-gguf", d)
    add("missing-file", work / "nope.gguf")
    return cases


def hf_cases(work: Path) -> list[Case]:
    import torch
    import transformers

    base = work / "hf-base"
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    cases = []

    def variant(name, edit):
        folder = work / f"hf-{name}"
        shutil.copytree(base, folder)
        edit(folder)
        out = work / "out" / f"hf-{name}" / "pkg"
        out.parent.mkdir(parents=True)
        cases.append(Case("hf", name, ["convert", folder, "-o", out], out=out))

    def config_edit(**kw):
        def edit(folder):
            c = json.loads((folder / "config.json").read_text())
            for k, v in kw.items():
                if v is None:
                    c.pop(k, None)
                else:
                    c[k] = v
            (folder / "config.json").write_text(json.dumps(c))
        return edit

    def write(name, data):
        return lambda folder: (folder / name).write_bytes(data)

    def st_header(header, length=None, data=b""):
        blob = json.dumps(header).encode()
        n = len(blob) if length is None else length
        return write("model.safetensors", n.to_bytes(8, "little") + blob + data)

    variant("config-not-json", write("config.json", b"{ not json"))
    variant("config-a-list", write("config.json", b"[1, 2]"))
    variant("config-not-utf8", write("config.json", b"{\"a\": \"\xff\"}"))
    variant("layers-10^9", config_edit(num_hidden_layers=10**9))
    variant("layers-5", config_edit(num_hidden_layers=5))
    variant("heads-0", config_edit(num_attention_heads=0))
    variant("heads-string", config_edit(num_attention_heads="4"))
    variant("hidden-missing", config_edit(hidden_size=None))
    variant("vocab-negative", config_edit(vocab_size=-5))
    variant("model-type-unknown", config_edit(model_type="mamba9"))
    variant("model-type-list", config_edit(model_type=["llama"]))
    variant("rope-linear-no-factor", config_edit(rope_scaling={"rope_type": "linear"}))
    variant("rope-factor-nan", config_edit(rope_scaling={"rope_type": "linear",
                                                         "factor": float("nan")}))
    variant("rope-theta-0", config_edit(rope_theta=0))
    variant("quant-method-unknown", config_edit(quantization_config={"quant_method": "zz"}))
    variant("header-length-2^60", st_header({}, 1 << 60))
    variant("header-not-json", write("model.safetensors", (8).to_bytes(8, "little") + b"{{{{{{{{"))
    variant("header-a-list", st_header([1]))
    variant("entry-short", st_header({"model.norm.weight": {
        "dtype": "F32", "shape": [64], "data_offsets": [0, 200]}}, data=bytes(200)))
    variant("entry-past-end", st_header({"model.norm.weight": {
        "dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, data=bytes(16)))
    variant("entry-dtype-unknown", st_header({"model.norm.weight": {
        "dtype": "Q9", "shape": [64], "data_offsets": [0, 256]}}, data=bytes(256)))
    variant("entry-shape-negative", st_header({"model.norm.weight": {
        "dtype": "F32", "shape": [-64], "data_offsets": [0, 256]}}, data=bytes(256)))
    variant("entries-overlap", st_header({
        "model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]},
        "model.embed_tokens.weight": {"dtype": "F32", "shape": [2], "data_offsets": [248, 256]}},
        data=bytes(256)))
    variant("truncated", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:5000]))
    variant("no-safetensors", lambda f: (f / "model.safetensors").unlink())
    for name, target in [("index-dotdot", "../outside.safetensors"),
                         ("index-absolute", str(work / "hf-base" / "model.safetensors")),
                         ("index-missing-file", "model-00009.safetensors")]:
        variant(name, write("model.safetensors.index.json",
                            json.dumps({"weight_map": {"lm_head.weight": target}}).encode()))
    variant("index-not-json", write("model.safetensors.index.json", b"nope"))
    return cases


def package_cases(work: Path, smollm: Path) -> list[Case]:
    """Damaged copies of the SmolLM2 package (files linked, the damaged one rewritten)."""
    cases = []

    def variant(name, edit, args=("-p", "Hello", "-n", "2")):
        folder = work / f"pkg-{name}"
        folder.mkdir()
        for f in smollm.iterdir():
            (folder / f.name).symlink_to(f)
        edit(folder)
        cases.append(Case("package", name, ["generate", folder, *args]))

    def config_edit(fn):
        def edit(folder):
            c = json.loads((smollm / "config.json").read_text())
            fn(c)
            (folder / "config.json").unlink()
            (folder / "config.json").write_text(json.dumps(c))
        return edit

    def replace(name, data):
        def edit(folder):
            (folder / name).unlink()
            (folder / name).write_bytes(data)
        return edit

    q = lambda **kw: config_edit(lambda c: c["quantization"].update(**kw))  # noqa: E731
    variant("group-size-0", q(group_size=0))
    variant("group-size-16", q(group_size=16))
    variant("bits-7", q(bits=7))
    variant("bits-0", q(bits=0))
    variant("mode-unknown", q(mode="int4"))
    variant("override-group-0", config_edit(lambda c: c["quantization"].update(
        {"model.layers.0.mlp.up_proj": {"bits": 4, "group_size": 0}})))
    variant("override-a-number", config_edit(lambda c: c["quantization"].update(
        {"model.layers.0.mlp.up_proj": 3})))
    variant("no-quantization-block", config_edit(lambda c: (c.pop("quantization"),
                                                            c.pop("quantization_config", None))))
    variant("layers-1000", config_edit(lambda c: c.update(num_hidden_layers=1000)))
    variant("layers-10^9", config_edit(lambda c: c.update(num_hidden_layers=10**9)))
    variant("heads-0", config_edit(lambda c: c.update(num_attention_heads=0)))
    variant("kv-heads-7", config_edit(lambda c: c.update(num_key_value_heads=7)))
    variant("head-dim-0", config_edit(lambda c: c.update(head_dim=0)))
    variant("rope-linear-no-factor", config_edit(lambda c: c.update(
        rope_scaling={"rope_type": "linear"})))
    variant("model-type-dict", config_edit(lambda c: c.update(model_type={})))
    variant("config-not-json", replace("config.json", b"{{"))
    variant("config-a-string", replace("config.json", b"\"llama\""))
    variant("tokenizer-not-json", replace("tokenizer.json", b"{ nope"))
    variant("tokenizer-wrong-shape", replace("tokenizer.json", b"{\"model\": {\"type\": \"BPE\"}}"))
    tok = json.loads((smollm / "tokenizer.json").read_text())
    tok["model"]["merges"] = tok["model"]["merges"][:10] + [["<nope>", "<never>"]]
    variant("tokenizer-merges-unknown", replace("tokenizer.json", json.dumps(tok).encode()))
    variant("tokenizer-config-not-json", replace("tokenizer_config.json", b"]"))
    st = (smollm / "model.safetensors").read_bytes()[:4096]
    variant("weights-truncated", replace("model.safetensors", st))
    variant("weights-header-2^60", replace("model.safetensors", (1 << 60).to_bytes(8, "little")
                                           + b"{}"))
    variant("weights-missing", lambda f: (f / "model.safetensors").unlink())
    variant("context-64-long-prompt", config_edit(lambda c: c.update(
        max_position_embeddings=64)), args=("-p", "word " * 300, "-n", "2"))
    return cases


def coreml_cases(work: Path) -> list[Case]:
    from edgert.coreml_manifest import manifest_path

    cases = []

    def variant(name, manifest: bytes | None):
        pkg = work / f"{name}.mlpackage"
        pkg.mkdir()
        if manifest is not None:
            manifest_path(pkg).parent.mkdir(parents=True)
            manifest_path(pkg).write_bytes(manifest)
        cases.append(Case("coreml", name, ["generate", pkg, "-p", "hi"]))
        cases.append(Case("coreml", name + " (chat)", ["chat", "--engine", "coreml", pkg],
                          stdin=b"hi\n"))

    base = {"format": "edgert-coreml", "format_version": 1}
    variant("no-manifest", None)
    variant("manifest-not-json", b"{")
    variant("manifest-wrong-format", json.dumps({"format": "x"}).encode())
    variant("manifest-newer", json.dumps(dict(base, format_version=99)).encode())
    variant("manifest-missing-fields", json.dumps(base).encode())
    variant("manifest-context-0", json.dumps(dict(
        base, context_length=0, vocab_size=10, functions={"prefill": {"max_length": 8}},
        causal_mask={"masked_value": -1e4})).encode())
    cases.append(Case("coreml", "not-a-folder", ["generate", work / "none.mlpackage", "-p", "x"]))
    return cases


def cli_cases(work: Path, smollm: Path, tiny: Path) -> list[Case]:
    cases = []
    for opt, v in [("--temp", "-1"), ("--temp", "nan"), ("--temp", "inf"), ("--top-p", "2"),
                   ("--top-p", "-0.1"), ("--top-k", "-5"), ("--min-p", "5"),
                   ("--repetition-penalty", "0"), ("--repetition-penalty", "-1"),
                   ("--temp", "abc"), ("--top-k", "1.5")]:
        cases.append(Case("cli", f"generate {opt} {v}", ["generate", smollm, "-p", "hi", opt, v]))
        cases.append(Case("cli", f"chat {opt} {v}", ["chat", smollm, opt, v], stdin=b"hi\n"))
    cases += [
        Case("cli", "invalid UTF-8 -p", ["generate", smollm, "-p", b"caf\xe9 \xff"]),
        Case("cli", "invalid UTF-8 stdin", ["generate", smollm, "-p", "-"], stdin=b"\xff\xfe"),
        Case("cli", "invalid UTF-8 --system", ["generate", smollm, "-p", "hi", "--system",
                                               b"\xff"]),
        Case("cli", "empty prompt", ["generate", smollm, "-p", "  "]),
        Case("cli", "no prompt", ["generate", smollm]),
        Case("cli", "unknown option", ["generate", smollm, "--nope"]),
        Case("cli", "unknown command", ["frobnicate"]),
        Case("cli", "coreml bad suffix", ["convert", tiny, "--to", "coreml", "-o", work / "x.pkg"]),
        Case("cli", "--target without coreml", ["convert", tiny, "-o", work / "y", "--target",
                                                "iOS18"]),
        Case("cli", "bad override", ["convert", tiny, "-o", work / "z", "--override", "x=q"]),
        Case("cli", "bench MODEL and --synthetic", ["bench", smollm, "--synthetic", "qwen3-8b"]),
        Case("cli", "verify missing reference", ["verify", smollm, "-r", work / "none"]),
    ]
    blocker = work / "a-file"
    blocker.write_text("")
    cases.append(Case("cli", "output under a file (mlx)",
                      ["convert", tiny, "-o", blocker / "pkg"]))
    cases.append(Case("cli", "output under a file (coreml)",
                      ["convert", tiny, "--to", "coreml", "-o", blocker / "m.mlpackage"]))
    existing = work / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    cases.append(Case("cli", "existing output (mlx)", ["convert", tiny, "-o", existing],
                      out=existing))
    existing_ml = work / "existing.mlpackage"
    existing_ml.mkdir()
    (existing_ml / "keep.txt").write_text("mine")
    cases.append(Case("cli", "existing output (coreml)", ["convert", tiny, "--to", "coreml",
                                                          "-o", existing_ml], out=existing_ml))
    return cases


def disk_cases(work: Path, smollm_gguf: Path, tiny: Path) -> list[Case]:
    cases = []
    for n, size in [(1, 1 << 20), (2, 16 << 20)]:
        out = work / f"full-{n}" / "pkg"
        out.parent.mkdir()
        cases.append(Case("disk", f"full disk at {size >> 20} MiB (mlx)",
                          ["convert", smollm_gguf, "-o", out], out=out, fsize=size))
    out = work / "full-coreml" / "m.mlpackage"
    out.parent.mkdir()
    cases.append(Case("disk", "full disk at 8 KiB (coreml)",
                      ["convert", tiny, "--to", "coreml", "-o", out], out=out, fsize=8 << 10))
    out = work / "full-cache"
    cases.append(Case("disk", "full disk in the cache", ["info", smollm_gguf], fsize=4 << 20))
    return cases


def signal_cases(work: Path, smollm_gguf: Path, tiny: Path, smollm: Path) -> list[Case]:
    cases = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        name = signal.Signals(sig).name
        cases.append(Case("signal", f"generate, {name} while generating",
                          ["generate", smollm, "-p", "Tell me a long story.", "-n", "5000"],
                          signal_after=(sig, 8.0)))
        if sig != signal.SIGINT:  # Ctrl-C at chat's prompt is its way out (exit 0)
            cases.append(Case("signal", f"chat, {name} at the prompt", ["chat", smollm],
                              signal_after=(sig, 8.0)))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        for delay in (0.0, 0.5):
            name = f"{signal.Signals(sig).name} +{delay}s"
            out = work / f"sig-{sig}-{delay}" / "pkg"
            out.parent.mkdir()
            cases.append(Case("signal", f"convert mlx, {name}", ["convert", smollm_gguf, "-o", out],
                              out=out, signal_after=(sig, delay), wait_for=".pkg.*.partial"))
    for sig in (signal.SIGINT, signal.SIGTERM):
        for delay in (0.5, 2.0, 4.0, 6.0, 9.0):  # from the import of coremltools to the save
            out = work / f"sigc-{sig}-{delay}" / "m.mlpackage"
            out.parent.mkdir()
            cases.append(Case("signal", f"convert coreml, {signal.Signals(sig).name} +{delay}s",
                              ["convert", tiny, "--to", "coreml", "-o", out], out=out,
                              signal_after=(sig, delay)))
    stale = work / "stale"
    stale.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (stale / f".pkg.{dead.pid}-abcd1234.partial").mkdir()
    cases.append(Case("signal", "stale partial of a dead process swept",
                      ["convert", tiny, "-o", stale / "pkg"], out=stale / "pkg", expect_ok=True))
    return cases


def fuzz_cases(work: Path, n: int, seed: int = 0) -> list[Case]:
    from test_convert_gguf import tiny_gguf

    src = work / "fuzz-seed.gguf"
    tiny_gguf(src, layers=1)
    data = src.read_bytes()
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        blob = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            blob[rng.randrange(min(len(blob), 2048))] = rng.randrange(256)
        p = work / f"fuzz-{i}.gguf"
        p.write_bytes(bytes(blob))
        out = work / "out" / f"fuzz-{i}" / "pkg"
        out.parent.mkdir(parents=True)
        cases.append(Case("fuzz", f"gguf mutation {i}", ["convert", p, "-o", out], out=out,
                          may_succeed=True))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", default=None, help="run cases whose group/name contain this")
    ap.add_argument("--fuzz", type=int, default=0)
    args = ap.parse_args()
    from edgert.convert.api import convert_file
    from edgert.paths import default_model_gguf

    with tempfile.TemporaryDirectory(prefix="edgert-audit-") as tmp:
        work = Path(tmp)
        smollm_gguf = default_model_gguf()
        smollm = convert_file(smollm_gguf, work / "smollm", progress=False)
        tiny = work / "tiny-ok.gguf"
        from test_convert_gguf import tiny_gguf

        tiny_gguf(tiny, layers=1)
        cases = (gguf_cases(work) + hf_cases(work) + package_cases(work, smollm)
                 + coreml_cases(work) + cli_cases(work, smollm, tiny)
                 + disk_cases(work, smollm_gguf, tiny) + signal_cases(work, smollm_gguf, tiny, smollm)
                 + fuzz_cases(work, args.fuzz))
        if args.only:
            cases = [c for c in cases if args.only in f"{c.group} {c.name}"]
        results, counts = [], Counter()
        for c in cases:
            home = work / "home" / str(len(results))
            home.mkdir(parents=True)
            r = run_case(c, home)
            results.append(r)
            counts[(c.group, "clean" if not r.problems else "failed")] += 1
            last = (r.stderr.strip().splitlines() or [""])[-1][:150]
            mark = "ok  " if not r.problems else "FAIL"
            print(f"{mark} [{c.group}] {c.name}: rc={r.rc} {r.seconds:.1f}s "
                  f"{'; '.join(r.problems)}{r.note} | {last}", flush=True)
    groups = sorted({c.group for c in cases})
    print("\ngroup     runs  clean  failed")
    for g in groups:
        clean, failed = counts[(g, "clean")], counts[(g, "failed")]
        print(f"{g:9s} {clean + failed:4d}  {clean:5d}  {failed:6d}")
    total = len(results)
    bad = sum(1 for r in results if r.problems)
    print(f"{'total':9s} {total:4d}  {total - bad:5d}  {bad:6d}")
    if args.json:
        args.json.write_text(json.dumps([{
            "group": r.case.group, "name": r.case.name, "rc": r.rc, "seconds": round(r.seconds, 2),
            "problems": r.problems, "note": r.note, "stderr": r.stderr[-500:]}
            for r in results], indent=1))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
