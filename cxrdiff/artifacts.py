"""Step folders that describe themselves (`manifest.json`) and writes that never leave half-files.

Every step writes one folder whose `manifest.json` names the step, the cxrdiff version, the resolved
config, its inputs (with the hash of their own manifests), the seed and the files. Readers check the
step name so that a folder of the wrong kind is refused with a message, not misread.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cxrdiff import __version__
from cxrdiff.errors import InputError

MANIFEST = "manifest.json"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that becomes `path` (replacing an old one) only when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_hash(folder: str | os.PathLike) -> str | None:
    """The sha256 of a folder's manifest: what a later step records to know its input changed."""
    path = Path(folder) / MANIFEST
    return file_sha256(path) if path.is_file() else None


def write_manifest(
    folder: str | os.PathLike,
    step: str,
    config: Mapping[str, Any] | None = None,
    inputs: Mapping[str, str | os.PathLike] | None = None,
    seed: int | None = None,
    files: list[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `folder/manifest.json` last, once every file it lists is complete."""
    folder = Path(folder)
    listed = (
        sorted(files)
        if files is not None
        else sorted(
            p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
        )
    )
    manifest = {
        "step": step,
        "cxrdiff_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "config": dict(config or {}),
        "inputs": {
            name: {"path": os.fspath(Path(p).resolve()), "manifest_sha256": manifest_hash(p)}
            for name, p in (inputs or {}).items()
        },
        "seed": seed,
        "files": {name: (folder / name).stat().st_size for name in listed if (folder / name).is_file()},
        **dict(extra or {}),
    }
    write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike, step: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read a step folder's manifest, refusing a missing folder or one written by another step."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    path = folder / MANIFEST
    if not path.is_file():
        wanted = f"a '{step}' output folder" if isinstance(step, str) else "a cxrdiff output folder"
        raise InputError(f"{folder}: no {MANIFEST}; expected {wanted}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or "step" not in manifest:
        raise InputError(f"{path}: not a cxrdiff manifest (no 'step')")
    steps = (step,) if isinstance(step, str) else step
    if steps and manifest["step"] not in steps:
        raise InputError(
            f"{folder}: this is a '{manifest['step']}' folder, expected "
            + " or ".join(f"'{s}'" for s in steps)
            + " output"
        )
    return manifest
