"""MODEL as a Hugging Face repo id: resolved with `huggingface_hub` into its cache.

Forms (a path that exists on disk always wins; one starting with `/`, `.` or `~` is never an id):

    org/name                   the repo's snapshot (an MLX package or HF model folder, as a local
                               folder would be); a repo without config.json but with GGUF files
                               is a GGUF repo, its file chosen as below without a tag
    org/name:Q4_K_M            a GGUF repo, llama.cpp's `-hf` convention: the first model file
                               whose name holds the tag (case-insensitive) followed by `.` or `-`;
                               without a tag Q4_K_M, then Q8_0, then the first model file
    org/name/dir/file.gguf     that file of the repo (llama.cpp's `--hf-file`)
    org/name/dir/M.mlpackage   that Core ML package of the repo; a repo with neither
                               config.json nor GGUF files but one or more `.mlpackage` folders
                               (or a package at its root) gives its first: served, chatted and
                               generated through the Core ML engine
    org/name@revision...       any of the above at a branch, tag or commit (huggingface_hub's
                               `revision`: offline it is looked up in the cache's refs/ and
                               snapshots/), e.g. `org/name@v1.0:Q4_K_M`; default main

A GGUF split by llama.cpp's gguf-split (`m-00001-of-00003.gguf`) is named by its first part;
every part is fetched next to it and the converter reads them all. A GGUF file is then
converted into edgert's cache on first use, like a local one. Offline (`HF_HUB_OFFLINE=1`)
only what the hub cache holds is used; an id, revision or file that is not there is a
one-line EdgertError naming it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from .errors import EdgertError

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_REV = r"refs/pr/\d+|[A-Za-z0-9][A-Za-z0-9_.-]*"
_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>{_REV}))?"
                 rf"(?::(?P<tag>[A-Za-z0-9_.-]+)"
                 rf"|/(?P<file>(?:{_PART}/)*{_PART}\.(?:gguf|mlpackage)))?$")
# the files of a folder repo that a model needs (weights, configs, tokenizer, chat template)
FOLDER_FILES = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt",
                "*.jsonl", "*.jinja"]
DEFAULT_TAGS = ("Q4_K_M", "Q8_0")  # llama.cpp's choice when -hf gives no tag
NOT_A_MODEL = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class RepoId(NamedTuple):
    repo: str
    tag: str | None = None
    file: str | None = None  # a .gguf file or a .mlpackage folder of the repo
    revision: str | None = None  # a branch, tag or commit; None is main


def parse_repo_id(model: str | Path | None) -> RepoId | None:
    """The repo id `model` names, or None where it is a local path (existing, or written as
    one) or not shaped like an id."""
    if model is None:
        return None
    s = str(model)
    if s.startswith(("/", ".", "~")) or Path(s).expanduser().exists():
        return None
    m = _ID.match(s)
    if m is None or "--" in m["repo"] or ".." in s:
        return None
    if (m["tag"] is None and m["file"] is None and m["rev"] is None
            and s.lower().endswith((".gguf", ".mlpackage"))):
        return None  # dir/file.gguf: a missing local file, not a repo named so
    return RepoId(m["repo"], m["tag"], m["file"], m["rev"])


def local_path(model: str | Path | None) -> str | Path | None:
    """`model` as a local path: a repo id resolved into the hub cache (downloaded unless
    offline), anything else unchanged."""
    rid = parse_repo_id(model)
    return model if rid is None else resolve(rid, str(model))


def resolve(rid: RepoId, given: str) -> Path:
    """The local snapshot folder or GGUF file for `rid` (`given` names it in errors)."""
    try:
        import huggingface_hub as hf
        from huggingface_hub import constants, errors
    except ImportError:  # a declared dependency; an install without it still says so plainly
        raise EdgertError(f"{given}: Hugging Face repo ids need huggingface_hub "
                          "(pip install huggingface_hub)") from None
    try:
        return _locate(hf, rid, given)
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled,
            errors.IncompleteSnapshotError):
        if rid.revision is not None and (refs := cached_refs(rid.repo)) is not None:
            raise EdgertError(f"{given}: revision {rid.revision!r} is not in the Hugging Face "
                              f"cache (it holds {', '.join(refs) or 'no named revision'})"
                              + (" and downloads are off (HF_HUB_OFFLINE)"
                                 if constants.HF_HUB_OFFLINE else "")) from None
        raise EdgertError(f"{given}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                          "and downloads are off (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE
                          else f"{given}: not in the Hugging Face cache and the Hub cannot be "
                               "reached") from None
    except errors.GatedRepoError:
        raise EdgertError(f"{given}: the repo is gated; accept its terms on huggingface.co "
                          "and log in (hf auth login or HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise EdgertError(f"{given}: no revision {rid.revision!r} in the repo") from None
    except errors.RepositoryNotFoundError:
        raise EdgertError(f"{given}: no such repo on the Hugging Face Hub (or it is private: "
                          "log in with hf auth login or HF_TOKEN)") from None
    except errors.EntryNotFoundError:
        raise EdgertError(f"{given}: no such file in the repo") from None
    except errors.HfHubHTTPError as e:
        raise EdgertError(f"{given}: the Hugging Face Hub answered "
                          f"{str(e).splitlines()[0]}") from None


def _locate(hf, rid: RepoId, given: str) -> Path:
    name, files, rev = rid.file, [], rid.revision
    if name is not None and name.endswith(".mlpackage"):
        return _coreml_package(hf, rid, name, repo_files(rid.repo, rev), given)
    if name is None:
        files = repo_files(rid.repo, rev)
        if rid.tag is None and "config.json" in files:
            return Path(hf.snapshot_download(rid.repo, revision=rev,
                                             allow_patterns=FOLDER_FILES))
        name = choose_gguf(files, rid.tag)
        if name is None and rid.tag is None and (pkg := coreml_package_in(files)) is not None:
            return _coreml_package(hf, rid, pkg, files, given)
    if name is None:
        ggufs = sorted(f for f in files if f.endswith(".gguf"))
        what = (f"no GGUF file matching {rid.tag!r}" if rid.tag else
                "neither config.json, a GGUF model file nor a .mlpackage")
        raise EdgertError(f"{given}: {what} in the repo"
                          + (f" (it has {', '.join(ggufs[:8])})" if ggufs else ""))
    first = Path(hf.hf_hub_download(rid.repo, name, revision=rev))
    if (m := _SPLIT.search(name)) and int(m[2]) > 1:
        _fetch_split_parts(hf, rid, name, int(m[1]), int(m[2]), given)
    return first


def _fetch_split_parts(hf, rid: RepoId, name: str, no: int, count: int, given: str) -> None:
    """The other parts of a split GGUF, fetched into the same snapshot folder as `name` (the
    reader finds them there by llama.cpp's naming)."""
    from huggingface_hub import errors

    if no != 1:
        raise EdgertError(f"{given}: {name} is part {no} of {count} of a split GGUF; name "
                          f"its first part ({_SPLIT.sub(f'-00001-of-{count:05d}.gguf', name)})")
    for i in range(2, count + 1):
        part = _SPLIT.sub(f"-{i:05d}-of-{count:05d}.gguf", name)
        try:
            hf.hf_hub_download(rid.repo, part, revision=rid.revision)
        except (errors.EntryNotFoundError, errors.LocalEntryNotFoundError):
            raise EdgertError(f"{given}: part {i} of {count} of the split GGUF ({part}) is "
                              "not in the repo" + (" cache" if _offline() else "")) from None


def coreml_package_in(files: list[str]) -> str | None:
    """The Core ML package a repo's `files` hold: "" for a package at the root (Core ML's
    Manifest.json there), else the first `.mlpackage` folder; None if there is none."""
    if "Manifest.json" in files:
        return ""
    found = sorted({f.split(".mlpackage/", 1)[0] + ".mlpackage" for f in files
                    if ".mlpackage/" in f})
    return found[0] if found else None


def _coreml_package(hf, rid: RepoId, pkg: str, files: list[str], given: str) -> Path:
    if pkg and not any(f.startswith(pkg + "/") for f in files):
        raise EdgertError(f"{given}: no Core ML package {pkg} in the repo")
    folder = Path(hf.snapshot_download(rid.repo, revision=rid.revision,
                                       allow_patterns=[f"{pkg}/*"] if pkg else None))
    return folder / pkg if pkg else folder


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_refs(repo: str) -> list[str] | None:
    """The named revisions (refs/) the hub cache holds for `repo`; None if it holds no copy
    of the repo at all."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    if not folder.is_dir():
        return None
    refs = folder / "refs"
    return sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*")
                  if p.is_file()) if refs.is_dir() else []


def repo_files(repo: str, revision: str | None = None) -> list[str]:
    """The repo's file paths at `revision` (None: main): listed by the Hub, or (offline, or the
    Hub unreachable) those of the cached snapshot of that revision."""
    import huggingface_hub as hf
    from huggingface_hub import constants
    from huggingface_hub import errors

    if not constants.HF_HUB_OFFLINE:
        try:
            return hf.list_repo_files(repo, revision=revision)
        except errors.HfHubHTTPError as e:
            if getattr(e.response, "status_code", 0) < 500:
                raise
        except (errors.OfflineModeIsEnabled, OSError):
            pass  # no connection: what the cache holds
    folder = Path(hf.snapshot_download(repo, revision=revision, local_files_only=True))
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() or p.is_symlink())


def is_model_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith(".gguf") and not any(w in name for w in NOT_A_MODEL)


def first_shard(path: str) -> bool:
    m = _SPLIT.search(path)
    return m is None or int(m[1]) == 1


def choose_gguf(files: list[str], tag: str | None) -> str | None:
    """The GGUF model file llama.cpp's `-hf repo[:tag]` picks among `files` (see the module
    docstring); None if none fits."""
    candidates = [f for f in files if is_model_file(f) and first_shard(f)]
    for t in ([tag] if tag else DEFAULT_TAGS):
        pattern = re.compile(re.escape(t) + r"[.-]", re.IGNORECASE)
        for f in candidates:
            if pattern.search(f):
                return f
    return candidates[0] if candidates and not tag else None


def display_name(model: str | Path | None) -> str | None:
    """The name a repo id is served under (the id as given); None for a local path."""
    return str(model) if parse_repo_id(model) is not None else None
