"""Conversion entry points: a checkpoint in, an MLX package folder out."""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from edgert.errors import EdgertError
from edgert.hub import local_path
from edgert.paths import cached_package_for, default_model_gguf

from .canonical import CanonicalModel, TensorRecord
from .gguf_reader import read_gguf
from .mlx_writer import OutputExistsError, write_mlx_package


def read_source(src: Path, *, bits: int | None = None, group_size: int | None = None,
                overrides: dict[str, dict] | None = None, requantize: bool = False,
                scale_dtype: str = "float16") -> CanonicalModel:
    """The CanonicalModel of a checkpoint: a GGUF file, or an HF folder with config.json.

    `bits` / `group_size` / `overrides` ask for layouts other than the source's (module path
    or fnmatch pattern -> {"bits", "group_size"}; bits 0 = float); float checkpoints default
    to 4-bit group 64. `requantize` lets GGUF types with no exact MLX layout through by
    dequantizing and re-quantizing them (their error is reported). `src` may also be a
    Hugging Face repo id (edgert.hub)."""
    src = Path(local_path(src))
    kw = dict(bits=bits, group_size=group_size, overrides=overrides, scale_dtype=scale_dtype)
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise EdgertError(f"{src}: a folder without config.json is not a model")
        from .hf_reader import read_hf_folder

        return read_hf_folder(src, **kw)
    if not src.exists():
        raise EdgertError(f"{src}: no such file or folder")
    return read_gguf(src, requantize=requantize, **kw)


@contextmanager
def progress_bar(label: str,
                 total: int | None = None) -> Iterator[Callable[[str, int, int], None]]:
    """A transient rich bar on stderr; yields update(description, done, total), total 0 or
    None meaning unknown (coreml_writer's Progress)."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda description, done, total: bar.update(
            task, description=description, completed=done, total=total or None)


@contextmanager
def _progress(total: int, label: str,
              enabled: bool) -> Iterator[Callable[[TensorRecord], None] | None]:
    if not enabled:
        yield None
        return
    with progress_bar(label, total) as update:
        done = itertools.count(1)
        yield lambda record: update(label, next(done), total)


def convert_file(src: Path, out: Path, *, force: bool = False, progress: bool = True,
                 **options) -> Path:
    """Convert a checkpoint (a .gguf file; an HF model folder) into an MLX package at `out`.

    `options` go to `read_source` (bits, group_size, overrides, requantize, scale_dtype).
    An existing `out` is refused unless `force`; nothing is left behind on failure."""
    src, out = Path(local_path(src)), Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists (use --force to replace it)")
    model = read_source(src, **options)
    with _progress(model.tensor_count, f"converting {src.name}", progress) as on_tensor:
        return write_mlx_package(model, out, force=force, on_tensor=on_tensor)


def ensure_package(model: str | Path | None = None, *, progress: bool = True) -> Path:
    """The MLX package folder for `model`: a package folder as is; a .gguf file converted once
    into edgert's cache (edgert.paths.cached_package_for) and reused; None for the default
    model (SmolLM2-135M-Instruct); a Hugging Face repo id (edgert.hub) resolved into the hub
    cache first."""
    src = default_model_gguf() if model is None else Path(local_path(model)).expanduser()
    if src.is_dir():
        if (src / "config.json").is_file():
            return src
        raise EdgertError(f"{src} is not an MLX package (no config.json)")
    if not src.exists():
        raise EdgertError(f"{src}: no such file or folder")
    if src.suffix.lower() != ".gguf":
        raise EdgertError(f"{src}: expected a .gguf file or an MLX package folder")
    cache = cached_package_for(src)
    if (cache / "config.json").is_file():
        return cache
    try:
        # a leftover folder without config.json is not a package: replace it
        return convert_file(src, cache, force=cache.exists(), progress=progress)
    except OutputExistsError:
        if (cache / "config.json").is_file():  # a concurrent conversion finished first
            return cache
        raise
