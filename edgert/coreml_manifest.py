"""The contract between a Core ML package and what runs it (edgert's Core ML engine, the Swift
bridge): where the manifest lives inside a `.mlpackage`, its format name and version, the
function and state names. The writer (edgert.convert.coreml_writer) produces it; the runtime
only reads it through `read_manifest`."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import EdgertError, UnsupportedError

MANIFEST_FORMAT = "edgert-coreml"
MANIFEST_VERSION = 2  # 2: chat_format, weights_sha256, a kind per state; reads 1 too
MANIFEST_AUTHOR = "com.edgert"  # package items live in <pkg>/Data/com.edgert/
FUNCTIONS = ("prefill", "decode")
STATES = ("key_cache", "value_cache")
# positional (rewindable); a sliding window's last positions, shifted along (not rewindable);
# carried forward (not rewindable)
STATE_KINDS = ("kv_cache", "window", "recurrent")
WEIGHTS = ("Data", "com.apple.CoreML", "weights")  # weight files, hashed into weights_sha256
# Fields a runtime needs, as paths into the manifest, each a positive integer or a number.
REQUIRED = {("context_length",): int, ("vocab_size",): int,
            ("functions", "prefill", "max_length"): int, ("causal_mask", "masked_value"): float}


def manifest_path(pkg: Path) -> Path:
    """Where the manifest sits inside a package (tokenizer/ lies next to it). Not at the
    package root: there, `manifest.json` and Core ML's own `Manifest.json` collide on
    case-insensitive file systems (macOS default)."""
    return Path(pkg) / "Data" / MANIFEST_AUTHOR / "manifest.json"


def weights_sha256(pkg: Path) -> str:
    """SHA-256 (hex) of the package's weight files (weights/*.bin, by name), the key under
    which the Swift bridge caches the compiled model."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(pkg).joinpath(*WEIGHTS).glob("*.bin")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def read_manifest(pkg: Path) -> dict:
    """The edgert manifest of a `.mlpackage` (Data/com.edgert/manifest.json)."""
    pkg = Path(pkg)
    if not pkg.is_dir():
        raise EdgertError(f"{pkg}: no such Core ML package (expected a .mlpackage folder)")
    path = manifest_path(pkg)
    if not path.is_file():
        raise EdgertError(f"{pkg}: not an edgert Core ML package (no {path.relative_to(pkg)})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EdgertError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise EdgertError(f"{path}: format {got!r}, not {MANIFEST_FORMAT!r}")
    if manifest.get("format_version", 0) > MANIFEST_VERSION:
        raise UnsupportedError(f"{pkg}: manifest version {manifest['format_version']} is newer "
                               f"than this edgert reads ({MANIFEST_VERSION})")
    check_fields(manifest, path)
    return manifest


def check_fields(manifest: dict, path: Path) -> None:
    """Every REQUIRED field present with a usable value (one line naming the first missing)."""
    for keys, kind in REQUIRED.items():
        v = manifest
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        ok = (isinstance(v, int) and not isinstance(v, bool) and v > 0 if kind is int
              else isinstance(v, (int, float)) and not isinstance(v, bool))
        if not ok:
            raise EdgertError(f"{path}: field {'.'.join(keys)} is missing or invalid ({v!r})")
