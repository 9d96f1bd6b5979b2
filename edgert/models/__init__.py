"""Architectures, one module per HF model_type, each the single home of what is specific to it
(see base.py for what a module declares). Modules are found by scanning this package: each
lists the HF model_types it serves (MODEL_TYPES) and, optionally, llama.cpp's architecture
name (GGUF.architecture). Readers, writers and the runtime ask here; they keep no tables."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from types import ModuleType

from ..errors import UnsupportedError

_SHARED = {"base", "cache", "rope", "switch"}  # pieces, not architectures


@functools.cache
def _modules() -> tuple[ModuleType, ...]:
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _SHARED)
    mods = (importlib.import_module(f"{__name__}.{n}") for n in names)
    return tuple(m for m in mods if hasattr(m, "MODEL_TYPES"))


@functools.cache
def _by_model_type() -> dict[str, ModuleType]:
    return {t: m for m in _modules() for t in m.MODEL_TYPES}


def supported() -> tuple[str, ...]:
    """Every HF model_type edgert runs."""
    return tuple(_by_model_type())


def architecture(model_type: str | None) -> ModuleType:
    """The module of an HF model_type; UnsupportedError naming the supported ones."""
    module = _by_model_type().get(model_type)
    if module is None:
        raise UnsupportedError(
            f"unknown architecture {model_type!r} (supported: {', '.join(supported())})")
    return module


def for_gguf(gguf_arch: str | None) -> ModuleType:
    """The module whose GGUF spec has llama.cpp architecture `gguf_arch`."""
    found = {m.GGUF.architecture: m for m in _modules() if getattr(m, "GGUF", None)}
    if gguf_arch not in found:
        raise UnsupportedError(f"unknown architecture {gguf_arch!r} "
                               f"(supported: {', '.join(sorted(found))})")
    return found[gguf_arch]


def get_classes(model_type: str):
    """(Model, ModelArgs) for an HF model_type."""
    module = architecture(model_type)
    return module.Model, module.ModelArgs
