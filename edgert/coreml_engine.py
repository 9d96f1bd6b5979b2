"""Run an edgert Core ML package (`.mlpackage`) through the same generation loop as MLX.

`load_coreml(path)` returns (model, tokenizer) that `edgert.generation.stream_generate` and
`edgert.chat.ChatSession` take as they take an MLX model: the model is called as
`model(ids (1, L), cache=cache) -> logits (1, 1, vocab)` and `make_cache()` gives the KV state.
Two runners execute the package:

    coremltools   Core ML itself (macOS 15+): one MLModel per function, one shared MLState
    interpreter   edgert's numpy MIL interpreter, anywhere (slow; for verification)

The tokenizer comes from the package (the files the manifest lists under Data/com.edgert/).
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from .coreml_manifest import manifest_path, read_manifest  # noqa: F401 (re-exported)
from .errors import EdgertError, UnsupportedError

BACKENDS = ("auto", "coremltools", "interpreter")


def coreml_runtime_available() -> bool:
    """Core ML runs stateful models on macOS 15 and later only."""
    if sys.platform != "darwin":
        return False
    try:
        return int(platform.mac_ver()[0].split(".")[0]) >= 15
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Runners: predict(function, inputs, state) -> logits, and make_state()
# ---------------------------------------------------------------------------------------------


class InterpreterRunner:
    """The numpy MIL interpreter (edgert.mil_interpreter)."""

    name = "interpreter"

    def __init__(self, pkg: Path):
        from .mil_interpreter import InterpreterSession

        self.session = InterpreterSession(pkg)

    def make_state(self):
        return self.session.make_state()

    def predict(self, function: str, inputs: dict, state) -> np.ndarray:
        return self.session.predict(function, inputs, state=state)["logits"]


class CoreMLToolsRunner:
    """Core ML through coremltools: each function loaded as its own MLModel; the KV state made
    once and passed to both (the functions declare the same states)."""

    name = "coremltools"

    def __init__(self, pkg: Path, compute_units: str = "ALL"):
        import coremltools as ct

        units = getattr(ct.ComputeUnit, compute_units)
        self.models = {fn: ct.models.MLModel(str(pkg), function_name=fn, compute_units=units)
                       for fn in ("prefill", "decode")}

    def make_state(self):
        return self.models["decode"].make_state()

    def predict(self, function: str, inputs: dict, state) -> np.ndarray:
        return np.asarray(self.models[function].predict(inputs, state=state)["logits"])


def make_runner(pkg: Path, backend: str = "auto", compute_units: str = "ALL"):
    if backend not in BACKENDS:
        raise EdgertError(f"unknown Core ML backend {backend!r} (one of {', '.join(BACKENDS)})")
    if backend == "auto":
        backend = "coremltools" if coreml_runtime_available() else "interpreter"
    if backend == "coremltools":
        if not coreml_runtime_available():
            raise UnsupportedError("Core ML runs stateful packages on macOS 15+ only "
                                   "(use the interpreter backend elsewhere)")
        return CoreMLToolsRunner(pkg, compute_units)
    return InterpreterRunner(pkg)


# ---------------------------------------------------------------------------------------------
# The model adapter the generation loop calls
# ---------------------------------------------------------------------------------------------


class CoreMLCache:
    """The package's states plus how many positions hold tokens. Where every state is a KV
    cache, trimming only moves the offset back: the causal mask hides every slot at or past
    it, and the next call overwrites them. A package with recurrent states (a hybrid model)
    cannot trim; it is snapshotted instead (each state read out and written back)."""

    def __init__(self, state, context: int, names: tuple[str, ...] = (),
                 trimmable: bool = True, nbytes: int = 0):
        self.core_state, self.context = state, context
        self.names, self.trimmable = names, trimmable
        self.nbytes = nbytes  # of the states (what a snapshot copies), for the prefix cache
        self.offset = 0

    def snapshot(self):
        read = (self.core_state.__getitem__ if isinstance(self.core_state, dict)
                else self.core_state.read_state)  # an interpreter dict, or an MLState
        return self.offset, {n: np.array(read(n)) for n in self.names}

    def restore(self, snap) -> None:
        self.offset, arrays = snap
        for name, value in arrays.items():
            if isinstance(self.core_state, dict):
                self.core_state[name] = value.copy()
            else:
                self.core_state.write_state(name, value)

    @property
    def state(self) -> list:
        return []  # nothing for mx.eval: Core ML has already run

    def trim(self, n: int) -> int:
        if not self.trimmable:
            return 0  # recurrent states only go forward (restore a snapshot instead)
        n = min(self.offset, n)
        self.offset -= n
        return n


def causal_mask(position: int, length: int, context: int, masked: float) -> np.ndarray:
    """(1, 1, L, context) fp16: row i (the token at position + i) sees keys j <= position + i."""
    rows = position + np.arange(length)[:, None]  # (L, 1)
    visible = np.arange(context)[None, :] <= rows  # (L, context)
    return np.where(visible, 0.0, masked).astype(np.float16)[None, None]


class CoreMLModel:
    """A Core ML package as a model for edgert.generation: `model(ids, cache=[CoreMLCache])`
    runs `prefill` (L > 1) or `decode` (L == 1) and returns the last position's logits."""

    def __init__(self, pkg: str | Path, backend: str = "auto", compute_units: str = "ALL"):
        self.path = Path(pkg)
        self.manifest = read_manifest(self.path)
        self.context: int = self.manifest["context_length"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.prefill_max: int = self.manifest["functions"]["prefill"]["max_length"]
        self._masked = float(self.manifest["causal_mask"]["masked_value"])
        self.sources = input_sources(self.path, self.manifest)  # extra input -> ids -> values
        self.runner = make_runner(self.path, backend, compute_units)

    @property
    def backend(self) -> str:
        return self.runner.name

    def make_cache(self) -> list[CoreMLCache]:
        states = self.manifest["functions"]["decode"]["states"]
        rewinds = all(s.get("kind", "kv_cache") == "kv_cache" for s in states)
        return [CoreMLCache(self.runner.make_state(), self.context,
                            tuple(s["name"] for s in states), rewinds,
                            sum(int(s.get("bytes", 0)) for s in states))]

    def __call__(self, inputs: mx.array, cache: list[CoreMLCache] | None = None) -> mx.array:
        """ids (1, L) -> logits (1, 1, vocab) float32 of the last position."""
        if cache is None:
            cache = self.make_cache()
        (c,) = cache
        ids = np.array(inputs, dtype=np.int32).reshape(1, -1)  # (1, L)
        L = ids.shape[1]
        if c.offset + L > self.context:
            raise EdgertError(f"{c.offset + L} tokens do not fit the package's context of "
                              f"{self.context} (re-export with a larger --context)")
        for start in range(0, L, self.prefill_max):  # chunks the prefill function accepts
            chunk = ids[:, start:start + self.prefill_max]  # (1, n)
            n = chunk.shape[1]
            feeds = {"input_ids": chunk, "position": np.array([c.offset], np.int32),
                     "causal_mask": causal_mask(c.offset, n, self.context, self._masked),
                     **{name: values(chunk) for name, values in self.sources.items()}}
            logits = self.runner.predict("decode" if n == 1 else "prefill", feeds, c.core_state)
            c.offset += n
        return mx.array(np.asarray(logits, np.float32).reshape(1, 1, -1))


SOURCE_KINDS = ("embedding_rows",)


def input_sources(pkg: Path, manifest: dict) -> dict:
    """The package's extra inputs (beyond input_ids, position, causal_mask) as functions of a
    chunk's ids (1, L) -> the values to feed. "embedding_rows": the rows of a table in a file
    of the package (memory-mapped; dequantized, fp16), e.g. Gemma 4's per-layer embeddings.
    A missing or short file, or a source this engine does not know, raises a one-line error."""
    from .mapped_rows import MappedRows

    folder = manifest_path(pkg).parent
    out = {}
    for spec in manifest["functions"]["decode"]["inputs"][3:]:
        src, name = spec.get("source") or {}, spec.get("name")
        if src.get("kind") not in SOURCE_KINDS:
            raise UnsupportedError(f"{pkg}: input {name!r} has source {src.get('kind')!r}, "
                                   f"which this engine does not provide")
        path = folder / str(src.get("path", ""))
        if not path.resolve().is_relative_to(folder.resolve()) or path == folder:
            raise EdgertError(f"{pkg}: input {name!r} names a file outside the package "
                              f"({src.get('path')!r})")
        try:
            shape = tuple(int(d) for d in src["shape"])
            rows = MappedRows.open(path, src["tensor"], shape, src.get("quantization"))
        except (KeyError, TypeError, ValueError) as e:
            raise EdgertError(f"{pkg}: input {name!r}: bad source in the manifest ({e})") from None
        width = spec["shape"][-1]
        if width != shape[1]:
            raise EdgertError(f"{pkg}: input {name!r} takes rows of {width}, its table has "
                              f"{shape[1]}")
        out[name] = _row_lookup(rows, shape[0], name)
    return out


def _row_lookup(rows, vocab: int, name: str):
    def values(ids: np.ndarray) -> np.ndarray:
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise EdgertError(f"token id {int(ids.max())} is outside the {vocab} rows of "
                              f"{name}")
        return np.array(rows(mx.array(ids), mx.float32)).astype(np.float16)  # (1, L, cols)
    return values


def is_coreml_package(model) -> bool:
    """Whether `model` names a Core ML package folder (a `.mlpackage`, or a folder holding
    edgert's Core ML manifest)."""
    if model is None:
        return False
    path = Path(model).expanduser()
    return path.suffix == ".mlpackage" or (path.is_dir() and manifest_path(path).is_file())


def load_tokenizer_from_package(pkg: Path, manifest: dict):
    """The tokenizer stored in the package, with the manifest's BOS and stop tokens."""
    from .tokenizer import load_tokenizer

    folder = manifest_path(pkg).parent
    names = manifest.get("tokenizer_files", [])
    if not names:
        raise EdgertError(f"{pkg}: the package holds no tokenizer files")
    dirs = {(folder / n).parent for n in names}
    missing = [n for n in names if not (folder / n).is_file()]
    if missing or len(dirs) != 1:
        raise EdgertError(f"{pkg}: tokenizer file missing: {missing[0] if missing else names}")
    tok = load_tokenizer(dirs.pop())
    if tok.bos_token_id is None and manifest.get("bos_token_id") is not None:
        tok.bos_token_id = manifest["bos_token_id"]
    tok.eos_token_ids |= set(manifest.get("stop_token_ids", []))
    return tok


def load_coreml(pkg: str | Path, backend: str = "auto", compute_units: str = "ALL"):
    """(CoreMLModel, Tokenizer) for an edgert `.mlpackage`."""
    model = CoreMLModel(pkg, backend, compute_units)
    return model, load_tokenizer_from_package(model.path, model.manifest)
