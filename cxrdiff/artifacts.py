"""Step folders that describe themselves (`manifest.json`) and writes that never leave half-files.

Every step writes one folder whose `manifest.json` names the step, the cxrdiff version, the resolved
config, its inputs (with the hash of their own manifests), the seed and the files. Readers check the
step name so that a folder of the wrong kind is refused with a message, not misread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

from cxrdiff import __version__
from cxrdiff.errors import TEMPFAIL, InputError

try:
    import fcntl
except ImportError:  # not POSIX: claims are judged by their pid and host alone
    fcntl = None

MANIFEST = "manifest.json"
_HOST = socket.gethostname()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _target(path: str | os.PathLike) -> Path:
    """Where a write to `path` lands: through a symlink (an --out linked to a larger disk) into its target,
    never replacing the link by a real file or folder beside it."""
    return Path(os.path.realpath(path))


def _pid_gone(name: str) -> bool:
    """Whether the process that named a temporary `.NAME.tmp-PID` / `.NAME.old-PID` has ended."""
    pid = name.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def clean_stale(path: Path) -> None:
    """Remove what a killed writer of `path` left beside it (`.NAME.tmp-PID`, and `.NAME.old-PID` once
    `path` is back); when the kill fell between the two renames of `atomic_dir`, so that only the old
    folder is there, put it back."""
    if not path.parent.is_dir():
        return
    for leftover in sorted(path.parent.glob(f".{glob.escape(path.name)}.*-*")):
        kind = leftover.name[len(path.name) + 2 :].rsplit("-", 1)[0]
        if kind not in ("tmp", "old") or not _pid_gone(leftover.name):
            continue
        if kind == "old" and not os.path.lexists(path):
            os.replace(leftover, path)
        elif leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _naming(exc: OSError, path: Path) -> OSError:
    """`exc` with the path being written when it names none (a full disk fails a write() on an open file,
    which knows no name), so the one-line error says where: `PATH: No space left on device`."""
    if exc.filename is not None:
        return exc
    code = exc.errno
    if code is None and "No space left on device" in str(exc):  # pyarrow's write errors carry no errno
        code = errno.ENOSPC
    if code is None:
        return exc
    return type(exc)(code, os.strerror(code), os.fspath(path))


@contextlib.contextmanager
def _writing(tmp: Path, path: Path) -> Iterator[None]:
    """The block that writes `tmp` and renames it onto `path`: an OSError names `path` (`_naming`), and `tmp`
    (a file or a folder) is gone afterwards whether the block renamed it or failed."""
    try:
        yield
    except OSError as exc:
        named = _naming(exc, path)
        if named is exc:
            raise
        raise named from exc
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = _target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with _writing(tmp, path):
        yield tmp
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that becomes `path` (replacing an old one) only when complete; what a killed
    earlier writer left beside `path` is cleaned first (`clean_stale`)."""
    path = _target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = _tmp_name(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with _writing(tmp, path):
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)


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
        unfinished = _claimed_step(folder)
        if unfinished is not None:
            steps = (step,) if isinstance(step, str) else tuple(step or ())
            other = f", not {wanted}" if steps and unfinished not in steps else ""
            raise InputError(
                f"{folder}: an unfinished '{unfinished}' run{other} (no {MANIFEST} yet); re-run the same "
                f"`cxrdiff {unfinished}` command to finish it"
            )
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


def damaged_file(folder: str | os.PathLike) -> str | None:
    """What is wrong with a finished step folder's files, as `FILE: what` (None when nothing is): a file its
    manifest lists that is missing or not of the listed size, or a Parquet table whose footer does not read
    (a cut copy, a disk error). Cheap: sizes and footers only. A step reusing a folder checks it first."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    listed = read_manifest(folder).get("files") or {}
    for name, size in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            return f"{path}: missing (listed in {folder / MANIFEST})"
        if isinstance(size, int) and path.stat().st_size != size:
            return f"{path}: {path.stat().st_size} bytes, {size} when written"
        if path.suffix == ".parquet":
            try:
                pq.read_metadata(path)
            except Exception as exc:  # pyarrow raises ArrowInvalid, OSError and others for a damaged file
                return f"{path}: not a readable Parquet file ({str(exc).strip().splitlines()[0]})"
    return None


def _claimed_step(folder: Path) -> str | None:
    """The step whose unfinished run holds `folder` (its claim file), None when there is no readable claim."""
    try:
        claim = json.loads((folder / CLAIM).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return str(claim["step"]) if isinstance(claim, dict) and claim.get("step") else None


# --- the one way a step owns its --out folder ---------------------------------------------------

CLAIM = ".cxrdiff-claim.json"  # hidden: written when a step starts a folder, replaced by the manifest's key
PART = CLAIM + ".part-{index}-of-{count}"  # one shard's lock, beside the shared claim (see `StepFolder`)
FINALIZE = CLAIM + ".finalize"  # held by whoever writes the table and manifest of a sharded folder


class OtherSettings(InputError):
    """The folder holds this step's run, made with other settings (report catches it to recompute)."""


def input_identity(path: str | os.PathLike) -> str:
    """What an input contributes to a settings key: its content, never its path alone.

    A step folder (and a Parquet table in one) counts by the sha256 of its manifest, which the step rewrites
    whenever it rewrites its files (so a retrained model or re-prepared data changes the key); any other
    file by the sha256 of its bytes; any other folder (a base model) by `folder_fingerprint`."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".parquet" and (found := manifest_hash(path.parent)):
            return found
        return "sha256:" + content_hash(path)
    if found := manifest_hash(path):
        return found
    if path.is_dir():
        return folder_fingerprint(path)
    return os.fspath(path.resolve())  # absent: the step that reads it refuses it


FOLDER_PREFIX = "files:"
_HEAD_BYTES = 1 << 20  # files up to this size are hashed whole; larger ones by their header or first MiB
_FILE_HASHES: dict[tuple[str, int, int, int], str] = {}  # (path, size, mtime_ns, inode) → sha256, this process


def content_hash(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, kept for this process by (path, size, mtime, inode): a file read twice in
    one run (the VAE's weights, a prompt file) is hashed once."""
    path = Path(path)
    stat = path.stat()
    key = (os.fspath(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = file_sha256(path)
    return _FILE_HASHES[key]


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """A cheap fingerprint of a folder without a manifest (a base model): per file (hidden ones left out)
    its relative path, size and modification time, and the sha256 of its first MiB (a safetensors file's
    whole header, with every tensor's name, dtype, shape and offset). A model rebuilt, re-downloaded or
    replaced in place gets new times, so a new fingerprint; reading a few MiB keeps it cheap for 5 GB of
    weights (hashing them whole would take a minute per step)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        stat = path.stat()
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\0{_head_hash(path)}\n".encode())
    return FOLDER_PREFIX + digest.hexdigest()


def _head_hash(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
        if path.suffix == ".safetensors" and len(head) >= 8:  # the JSON header may be longer than a MiB
            size = int.from_bytes(head[:8], "little")
            if 8 + size > len(head) and size < 1 << 30:
                head += handle.read(8 + size - len(head))
    return hashlib.sha256(head).hexdigest()


def settings_key(settings: Mapping[str, Any]) -> str:
    """sha256 of the settings that decide a step's outputs (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=_json_default).encode()).hexdigest()


def _jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(settings), sort_keys=True, default=_json_default))


class InUse(InputError):
    """The folder is claimed by a process that is still running (never removed or taken over). Exit code 75
    (EX_TEMPFAIL): not a fault of the command, which succeeds once the other process is done."""

    exit_code = TEMPFAIL


class StepFolder:
    """An `--out` folder claimed by one step: new, this step's unfinished run (resume), or finished.

    `claim` refuses, with one line naming what is there, a file, a stranger's folder, another step's
    folder, this step's folder made with other settings, and a folder a running process has claimed
    (`InUse`, whatever its settings: two processes never write one folder). A step then writes its files
    atomically and calls `finish`, which writes the manifest last (with the settings and their key).

    The claim file appears whole and already locked (written under a temporary name, locked, then
    hard-linked into place, which fails when a claim is there), and its owner holds an exclusive `flock`
    on it until `finish` or its exit: the kernel drops the lock when the process dies, however it dies,
    so a locked claim is a live run and an unlocked one a leftover that the next run of the same settings
    resumes. Where the file system has no locks, the claim's pid and host decide (a claim from another
    host then counts as live).

    Shards (`claim(part=(i, n))`, `cxrdiff.shards`) share a folder: the claim then records the settings
    only (created exclusively, held by nobody, marked `shared`) and each shard locks its own part file
    beside it, so the same shard twice is refused while different shards run side by side, and a run of the
    whole folder is refused while any shard runs (and the other way round). Whoever completes the last part
    writes the table and the manifest inside `finalizing()`, which one process at a time holds.
    """

    def __init__(self, out: Path, step: str, settings: dict[str, Any], state: str, manifest: dict | None) -> None:
        self.out, self.step, self.settings = out, step, settings
        self.key = settings_key(settings)
        self.state = state  # "new" | "resume" | "finished"
        self.manifest = manifest
        self.part: tuple[int, int] | None = None

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
        part: tuple[int, int] | None = None,
    ) -> StepFolder:
        """Claim `out` for `step` with these settings (see the class docstring); `create=False` only checks
        what the folder holds (not whether its claim is live: the other processes of an `accelerate` run
        check what their main process claimed).

        `take_over=True`: this step's folder made with other settings is not refused but restarted as an
        unfinished run with these settings (its manifest removed, its files left for the step to reuse or
        replace) — for a step whose outputs are all re-derived on every run, such as the report. A folder
        in use by a running process is refused all the same.

        `part=(i, n)`: claim shard i of n of a shared folder (see the class docstring)."""
        out, settings = Path(out), _jsonable(settings)
        key = settings_key(settings)
        if part is not None and create:
            return cls._claim_part(out, step, settings, part)
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
        for _ in range(_CLAIM_TRIES):
            found = _inspect_claim(out) if out.is_dir() else None
            if create and found is not None and found.owner == "live":
                _refuse_in_use(out, step, found, settings, key)
            manifest = _finished_manifest(out, step, settings, key)
            if manifest is not None:
                return cls(out, step, settings, "finished", manifest)
            entries = _entries(out)
            if found is not None and entries:  # an unfinished run whose process is gone (or is this one)
                _refuse_unfinished(out, step, found.data, settings, key)
                folder = cls(out, step, settings, "resume", None)
            elif entries:
                _refuse_foreign(out, step, entries)
            else:  # empty, or only a claim nobody is running: nothing written yet, so nothing to mix
                folder = cls(out, step, settings, "new", None)
            if not create or (found is not None and found.owner == "this process" and found.data.get("key") == key):
                return folder
            if _take(out, _claim_record(step, key, settings), found):
                running = _live_parts(out)
                if running:  # a shard started between our look and our claim: it keeps the folder
                    _release(_path_ident(out / CLAIM))
                    raise InUse(f"--out {out}: in use by shard(s) {', '.join(running)} of a sharded '{step}' run")
                return folder
        raise InputError(f"--out {out}: other processes keep claiming and releasing it; try again")

    @classmethod
    def _claim_part(cls, out: Path, step: str, settings: dict[str, Any], part: tuple[int, int]) -> StepFolder:
        """Join (or start) the shared run of these settings in `out`, then lock shard `part`."""
        key = settings_key(settings)
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out}: exists and is not a folder")
        shared = {**_claim_record(step, key, settings), "shared": True}
        for _ in range(_CLAIM_TRIES):
            found = _inspect_claim(out) if out.is_dir() else None
            joins = found is not None and found.data.get("shared") and found.data.get("key") == key
            if found is not None and found.owner == "live" and not joins:
                _refuse_in_use(out, step, found, settings, key)
            manifest = _finished_manifest(out, step, settings, key)
            if manifest is not None:
                return cls(out, step, settings, "finished", manifest)
            entries = _entries(out)
            if found is not None and entries and not joins:
                _refuse_unfinished(out, step, found.data, settings, key)
            elif found is None and entries:
                _refuse_foreign(out, step, entries)
            if not joins:
                if not _take(out, shared, found):
                    continue
                _release(_path_ident(out / CLAIM))  # the shared claim is held by nobody: the parts are
            held = _take_part(out, part)
            again = _inspect_claim(out)
            if again is None or not again.data.get("shared") or again.data.get("key") != key:
                _release_part(out, part, held)  # a run of the whole folder came between: look again
                continue
            folder = cls(out, step, settings, "resume" if entries else "new", None)
            folder.part = part
            return folder
        raise InputError(f"--out {out}: other processes keep claiming and releasing it; try again")

    def release_part(self) -> None:
        """This shard is done (its part file removed and its lock dropped); the folder stays unfinished."""
        if self.part is not None:
            path = self.out / PART.format(index=self.part[0], count=self.part[1])
            _release_part(self.out, self.part, _path_ident(path))

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """A block that one process at a time runs in this folder (the others wait): the shards of one run
        build its plan once, and write its table and manifest once."""
        fd = os.open(self.out / FINALIZE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def finalizing(self) -> Iterator[bool]:
        """`exclusive()`, yielding True when this process is to write the table and the manifest, False when
        another already did (the folder is then finished)."""
        with self.exclusive():
            if (self.out / MANIFEST).is_file():
                self.manifest, self.state = read_manifest(self.out, self.step), "finished"
                yield False
            else:
                yield True

    def reopen(self) -> None:
        """Make this folder an unfinished run again (a finished run extended, a report re-rendered): the
        claim is taken first, then the manifest removed, so the folder is never without an owner."""
        for _ in range(_CLAIM_TRIES):
            found = _inspect_claim(self.out)
            if found is not None and found.owner == "live":
                _refuse_in_use(self.out, self.step, found, self.settings, self.key)
            if _take(self.out, _claim_record(self.step, self.key, self.settings), found):
                break
        else:
            raise InputError(f"--out {self.out}: other processes keep claiming and releasing it; try again")
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
        """Write the manifest (last, once every listed file is complete), then drop the claim and its lock."""
        manifest = write_manifest(
            self.out,
            self.step,
            config=config,
            inputs=inputs,
            seed=seed,
            files=files,
            extra={**dict(extra or {}), "settings": self.settings, "settings_key": self.key},
        )
        found = _inspect_claim(self.out)
        with contextlib.suppress(FileNotFoundError):
            (self.out / CLAIM).unlink()
        if found is not None:
            _release(found.ident)
        for path in [*self.out.glob(PART.format(index="*", count="*")), self.out / FINALIZE]:
            ident = _path_ident(path)
            path.unlink(missing_ok=True)
            _release(ident)
        self.state, self.manifest = "finished", manifest
        return manifest


# --- the claim file: created whole and locked, live while locked ---------------------------------

_CLAIM_TRIES = 20  # rounds of look-and-take before giving up on a folder that other processes keep changing
_HELD: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) of a claim file this process holds → its locked fd


@dataclasses.dataclass(frozen=True)
class _Found:
    data: dict[str, Any]
    owner: str  # "this process" | "live" (another running process) | "none" (a leftover)
    ident: tuple[int, int]


def _claim_record(step: str, key: str, settings: dict[str, Any]) -> dict[str, Any]:
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    return {"step": step, "key": key, "settings": settings, "pid": os.getpid(), "host": _HOST, "started": started}


def _inspect_claim(out: Path) -> _Found | None:
    """The claim in `out` (None when there is none) and who holds it."""
    path = out / CLAIM
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InputError(f"{path}: unreadable ({exc.strerror}); delete it if the folder is yours") from None
    try:
        ident = _ident(fd)
        try:
            with os.fdopen(os.dup(fd), "rb") as handle:
                data = json.loads(handle.read())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):  # OSError: a folder by that name
            data = None
        if not isinstance(data, dict):
            raise InputError(f"{path}: unreadable; delete it if the folder is yours")
        if ident in _HELD:
            return _Found(data, "this process", ident)
        if data.get("shared"):  # held by nobody: live while one of its shards runs
            return _Found(data, "live" if _live_parts(out) else "none", ident)
        return _Found(data, "live" if _locked_elsewhere(fd, data) else "none", ident)
    finally:
        os.close(fd)


def _locked_elsewhere(fd: int, data: Mapping[str, Any]) -> bool:
    """Whether another process holds the claim open `fd` refers to: its lock, else (no locks here) its pid."""
    if fcntl is None:
        return _pid_running(data)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks (some network mounts)
        return _pid_running(data)
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _pid_running(data: Mapping[str, Any]) -> bool:
    pid = data.get("pid")
    if not isinstance(pid, int):
        return False  # a claim without a pid: no run to wait for
    if data.get("host") != _HOST:
        return True  # cannot tell: the message says to delete the claim if that run is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _lock(fd: int, block_for: float = 0.0) -> bool:
    """An exclusive lock on `fd`: False when another process holds one; True also where there are no locks."""
    if fcntl is None:
        return True
    deadline = time.monotonic() + block_for
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        except OSError:
            return True


def _take(out: Path, record: dict[str, Any], found: _Found | None) -> bool:
    """Put this process's claim in place of `found` (None: where there is no claim), atomically; False
    when another process changed the claim meanwhile (the caller looks again)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / CLAIM
    old_fd = None
    if found is not None and found.ident not in _HELD:
        try:
            old_fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        # a brief wait: someone only testing the lock holds it shared for a moment
        if not _lock(old_fd, block_for=0.2) or _ident(old_fd) != found.ident:
            os.close(old_fd)
            return False
    try:
        if found is not None and _path_ident(path) != found.ident:
            return False  # replaced since we looked
        tmp = out / f"{CLAIM}.tmp-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _lock(fd)
            os.write(fd, (json.dumps(record, indent=2, sort_keys=True, default=_json_default) + "\n").encode())
            os.fsync(fd)
            if found is None:
                try:
                    os.link(tmp, path)  # fails when a claim appeared since we looked: create-exclusive
                except FileExistsError:
                    os.close(fd)
                    return False
                finally:
                    tmp.unlink()
            else:
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        _HELD[_ident(fd)] = fd
        if found is not None:
            _release(found.ident)
        return True
    finally:
        if old_fd is not None:
            os.close(old_fd)


def _live_parts(out: Path) -> list[str]:
    """The shards (`i/n`) another process is running in `out`."""
    live = []
    for path in sorted(out.glob(PART.format(index="*", count="*"))):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            if _ident(fd) not in _HELD and _locked_elsewhere(fd, _read_record(fd)):
                live.append(path.name.rsplit(".part-", 1)[1].replace("-of-", "/"))
        finally:
            os.close(fd)
    return live


def _read_record(fd: int) -> dict[str, Any]:
    try:
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = json.loads(handle.read() or b"{}")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _take_part(out: Path, part: tuple[int, int]) -> tuple[int, int]:
    """Lock shard `part`'s file in `out` (created if missing) for this process; InUse when another holds it."""
    path = out / PART.format(index=part[0], count=part[1])
    for _ in range(_CLAIM_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        ident = _ident(fd)
        if ident in _HELD:
            os.close(fd)
            return ident
        record = _read_record(fd)
        if not _lock(fd) or (fcntl is None and record and _pid_running(record)):
            os.close(fd)
            who = f"process {record.get('pid', '?')} on {record.get('host', '?')}"
            raise InUse(f"--out {out}: shard {part[0]}/{part[1]} is already running ({who}); each shard runs once")
        if _path_ident(path) != ident:  # removed by its finished owner since we opened it
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": _HOST, "started": started}).encode(), 0)
        _HELD[ident] = fd
        return ident
    raise InputError(f"--out {out}: shard {part[0]}/{part[1]}: other processes keep taking it; try again")


def _release_part(out: Path, part: tuple[int, int], ident: tuple[int, int] | None) -> None:
    path = out / PART.format(index=part[0], count=part[1])
    if ident is not None and ident in _HELD and _path_ident(path) == ident:
        path.unlink(missing_ok=True)
    if ident is not None:
        _release(ident)


def _release(ident: tuple[int, int] | None) -> None:
    fd = _HELD.pop(ident, None)
    if fd is not None:
        os.close(fd)


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _path_ident(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _refuse_in_use(out: Path, step: str, found: _Found, settings: dict, key: str) -> None:
    claim = found.data
    who = f"process {claim.get('pid', '?')} on {claim.get('host', '?')}"
    if claim.get("shared"):
        who = f"shard(s) {', '.join(_live_parts(out)) or '?'} of a sharded run"
    if claim.get("host") not in (None, _HOST) and fcntl is None:
        who += f" (delete {out / CLAIM} if that run is gone)"
    if claim.get("step") != step:
        raise InUse(f"--out {out}: in use by {who}, an unfinished '{claim.get('step')}' run; choose a new folder")
    if claim.get("key") != key:
        diff = _changed(dict(claim.get("settings") or {}), settings)
        raise InUse(f"--out {out}: in use by {who}, a '{step}' run with other settings ({diff}); choose a new folder")
    raise InUse(
        f"--out {out}: in use by {who}, a '{step}' run with these settings; let it finish (a re-run then "
        "finds it finished), or stop it and re-run to resume"
    )


def _finished_manifest(out: Path, step: str, settings: dict, key: str) -> dict[str, Any] | None:
    """The manifest of the finished run in `out` (None: none finished there); one of other settings is refused."""
    if not (out / MANIFEST).is_file():
        return None
    manifest = read_manifest(out, step)
    _refuse_other(out, step, "a finished", manifest.get("settings"), manifest.get("settings_key"), settings, key)
    return manifest


def _entries(out: Path) -> list[str]:
    """What `out` holds besides its claim files, sorted (none where it is not yet a folder)."""
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(CLAIM)) if out.is_dir() else []


def _refuse_unfinished(out: Path, step: str, claim: Mapping[str, Any], settings: dict, key: str) -> None:
    """Refuse to resume the unfinished run `claim` records unless it is this step's, with these settings."""
    if claim.get("step") != step:
        raise InputError(f"--out {out}: holds an unfinished '{claim.get('step')}' run; choose a new folder")
    _refuse_other(out, step, "an unfinished", claim.get("settings"), claim.get("key"), settings, key)


def _refuse_foreign(out: Path, step: str, entries: list[str]) -> NoReturn:
    """`out` holds files no cxrdiff run claims: never write among them."""
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise InputError(f"--out {out}: not empty and not a '{step}' folder (has {shown}); choose a new folder")


def _refuse_other(
    out: Path, step: str, what: str, old: Mapping[str, Any] | None, old_key: str | None, new: dict, key: str
) -> None:
    if old_key == key:
        return
    old = dict(old or {})
    detail = _changed(old, new) if old else "settings not recorded: made by cxrdiff 0.1"
    raise OtherSettings(
        f"--out {out}: holds {what} '{step}' run made with other settings ({detail}); choose a new folder"
    )


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """Up to four changed settings as `name old → new`."""
    changed = [
        f"{k} {_short(old.get(k))} → {_short(new.get(k))}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    return "; ".join(changed[:4]) + ("; ..." if len(changed) > 4 else "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
