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


# --- the one way a step owns its --out folder ---------------------------------------------------

CLAIM = ".cxrdiff-claim.json"  # hidden: written when a step starts a folder, replaced by the manifest's key


class OtherSettings(InputError):
    """The folder holds this step's run, made with other settings (report catches it to recompute)."""


def input_identity(path: str | os.PathLike) -> str:
    """What an input contributes to a settings key: a step folder's manifest hash (so a retrained model or
    re-prepared data changes the key), else the resolved path (a base model, a CSV, a single image)."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    return manifest_hash(folder) or os.fspath(path.resolve())


def settings_key(settings: Mapping[str, Any]) -> str:
    """sha256 of the settings that decide a step's outputs (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=_json_default).encode()).hexdigest()


def _jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(settings), sort_keys=True, default=_json_default))


class StepFolder:
    """An `--out` folder claimed by one step: new, this step's unfinished run (resume), or finished.

    `claim` refuses, with one line naming what is there, a file, a stranger's folder, another step's
    folder, and this step's folder made with other settings. A step then writes its files atomically and
    calls `finish`, which writes the manifest last (with the settings and their key).
    """

    def __init__(self, out: Path, step: str, settings: dict[str, Any], state: str, manifest: dict | None) -> None:
        self.out, self.step, self.settings = out, step, settings
        self.key = settings_key(settings)
        self.state = state  # "new" | "resume" | "finished"
        self.manifest = manifest

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    @classmethod
    def claim(
        cls,
        out: str | os.PathLike,
        step: str,
        settings: Mapping[str, Any],
        create: bool = True,
        take_over: bool = False,
    ) -> StepFolder:
        """Claim `out` for `step` with these settings (see the class docstring); `create=False` only checks.

        `take_over=True`: this step's folder made with other settings is not refused but restarted as an
        unfinished run with these settings (its manifest removed, its files left for the step to reuse or
        replace) — for a step whose outputs are all re-derived on every run, such as the report."""
        out, settings = Path(out), _jsonable(settings)
        key = settings_key(settings)
        if take_over:
            try:
                return cls.claim(out, step, settings, create=create)
            except OtherSettings:
                folder = cls(out, step, settings, "finished", None)
                if create:
                    folder.reopen()
                folder.state = "resume"
                return folder
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a folder")
        if (out / MANIFEST).is_file():
            manifest = read_manifest(out, step)
            _refuse_other(
                out, step, "a finished", manifest.get("settings"), manifest.get("settings_key"), settings, key
            )
            return cls(out, step, settings, "finished", manifest)
        claim = _read_claim(out)
        entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if claim is not None and entries != [CLAIM]:
            if claim.get("step") != step:
                raise InputError(f"--out {out}: holds an unfinished '{claim.get('step')}' run; choose a new folder")
            _refuse_other(out, step, "an unfinished", claim.get("settings"), claim.get("key"), settings, key)
            return cls(out, step, settings, "resume", None)
        strangers = [name for name in entries if name != CLAIM]
        if strangers:
            shown = ", ".join(strangers[:3]) + (", ..." if len(strangers) > 3 else "")
            raise InputError(f"--out {out}: not empty and not a '{step}' folder (has {shown}); choose a new folder")
        folder = cls(out, step, settings, "new", None)
        if create:
            write_json(out / CLAIM, {"step": step, "key": key, "settings": settings})
        return folder

    def reopen(self) -> None:
        """Make this folder an unfinished run again (a finished run extended, a report re-rendered): the
        claim is written first, then the manifest removed, so the folder is never without an owner."""
        write_json(self.out / CLAIM, {"step": self.step, "key": self.key, "settings": self.settings})
        (self.out / MANIFEST).unlink(missing_ok=True)
        self.state, self.manifest = "resume", None

    def finish(
        self,
        config: Mapping[str, Any],
        inputs: Mapping[str, str | os.PathLike] | None = None,
        seed: int | None = None,
        files: list[str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write the manifest (last, once every listed file is complete) and drop the claim."""
        manifest = write_manifest(
            self.out,
            self.step,
            config=config,
            inputs=inputs,
            seed=seed,
            files=files,
            extra={**dict(extra or {}), "settings": self.settings, "settings_key": self.key},
        )
        with contextlib.suppress(FileNotFoundError):
            (self.out / CLAIM).unlink()
        self.state, self.manifest = "finished", manifest
        return manifest


def _read_claim(out: Path) -> dict[str, Any] | None:
    path = out / CLAIM
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: unreadable; delete it if the folder is yours") from None


def _refuse_other(
    out: Path, step: str, what: str, old: Mapping[str, Any] | None, old_key: str | None, new: dict, key: str
) -> None:
    if old_key == key:
        return
    old = dict(old or {})
    changed = [
        f"{k} {_short(old.get(k))} → {_short(new.get(k))}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    detail = (
        "; ".join(changed[:4]) + ("; ..." if len(changed) > 4 else "")
        if old
        else "settings not recorded: made by cxrdiff 0.1"
    )
    raise OtherSettings(
        f"--out {out}: holds {what} '{step}' run made with other settings ({detail}); choose a new folder"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
