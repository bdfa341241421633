"""The data set's vocabulary and the on-disk form of latents, shared by every step.

Latents are stored in Parquet as raw little-endian float16 bytes plus their shape: compact, exact,
and readable with nothing but numpy (`latent_from_bytes`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxrdiff.errors import InputError

# CheXpert's 14 labels, in the column order of mimic-cxr-2.0.0-chexpert.csv.
LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

# MS-CXR's 8 categories, in the paper's table order.
MS_CXR_CATEGORIES: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Lung Opacity",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
)

# The words whose tokens ground each category (the paper's code, matched by substring): MS-CXR's 8, then the
# other box classes of the public sets (NIH ChestX-ray14's Infiltration, Mass, Nodule).
CLASS_WORDS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis", "atelectatic"),
    "Cardiomegaly": ("cardiomegaly", "cardiac"),
    "Consolidation": ("consolidation", "consolidations", "consolidative"),
    "Edema": ("edema",),
    "Lung Opacity": ("opacity", "opacities", "opacification"),
    "Pleural Effusion": ("pleural", "effusion", "effusions"),
    "Pneumonia": ("pneumonia",),
    "Pneumothorax": ("pneumothorax", "pneumothoraces"),
    "Infiltration": ("infiltrate", "infiltrates", "infiltration", "infiltrative"),
    "Mass": ("mass", "masses"),
    "Nodule": ("nodule", "nodules", "nodular"),
}

VIEWS_KEPT: tuple[str, ...] = ("PA", "AP")
TEST_PATIENT_FOLDER = "p19"


def latent_to_bytes(latent: np.ndarray) -> bytes:
    """A latent (C, H, W) as little-endian float16 bytes, C order."""
    return np.ascontiguousarray(latent, dtype="<f2").tobytes()


def latent_from_bytes(data: bytes, shape: Sequence[int]) -> np.ndarray:
    """Inverse of `latent_to_bytes` (float32 out, for arithmetic)."""
    return np.frombuffer(data, dtype="<f2").reshape(tuple(int(s) for s in shape)).astype(np.float32)


def patient_folder(subject_id: int) -> str:
    """MIMIC's top folder: the first two digits of the subject id, e.g. 19012345 → 'p19'."""
    return f"p{str(int(subject_id))[:2]}"


# --- the MIMIC-CXR and MS-CXR tables ----------------------------------------------------------

METADATA_COLUMNS: tuple[str, ...] = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT_COLUMNS: tuple[str, ...] = ("dicom_id", "study_id", "subject_id", "split")
CHEXPERT_COLUMNS: tuple[str, ...] = ("subject_id", "study_id", *LABELS)
MS_CXR_FILE_COLUMNS: tuple[str, ...] = (  # the released CSV's full header, in order
    "dicom_id",
    "category_name",
    "label_text",
    "path",
    "x",
    "y",
    "w",
    "h",
    "image_width",
    "image_height",
)
MS_CXR_COLUMNS: tuple[str, ...] = tuple(c for c in MS_CXR_FILE_COLUMNS if c != "path")  # required to read
MIMIC_TABLES: dict[str, tuple[str, ...]] = {
    "metadata": METADATA_COLUMNS,
    "split": SPLIT_COLUMNS,
    "chexpert": CHEXPERT_COLUMNS,
}


def find_table(root: str | os.PathLike, kind: str) -> Path:
    """`mimic-cxr-2.0.0-<kind>.csv` (or .csv.gz, or another version's) in a MIMIC-CXR-JPG root."""
    root = Path(root)
    for name in (f"mimic-cxr-2.0.0-{kind}.csv.gz", f"mimic-cxr-2.0.0-{kind}.csv"):
        if (root / name).is_file():
            return root / name
    found = sorted(root.glob(f"mimic-cxr-*-{kind}.csv*"))
    if not found:
        raise InputError(f"{root}: no mimic-cxr-2.0.0-{kind}.csv(.gz) (is --mimic the MIMIC-CXR-JPG root?)")
    return found[-1]


def files_root(root: str | os.PathLike) -> Path:
    """The folder holding pXX/ patient groups: `root/files` when present, else `root` itself."""
    root = Path(root).absolute()
    return root / "files" if (root / "files").is_dir() else root


def parse_id(value: object) -> int:
    """A MIMIC id as an int; the 'p' / 's' prefixes that paths carry (p10000032, s50414267) are stripped."""
    text = str(value).strip()
    if text[:1] in ("p", "s"):
        text = text[1:]
    return int(float(text)) if "." in text else int(text)


def check_columns(path: str | os.PathLike, required: Sequence[str]) -> list[str]:
    """Read only a CSV's header and refuse it, naming file and column, if a required column is missing."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        columns = list(pd.read_csv(path, nrows=0).columns)
    except Exception as exc:  # pandas raises parser, unicode and gzip errors alike
        raise InputError(f"{path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}")
    return columns


def read_table(
    path: str | os.PathLike, required: Sequence[str], optional: Sequence[str] = (), unique: Sequence[str] = ()
):
    """A MIMIC / MS-CXR CSV (plain or .gz) as a DataFrame of the named columns; ids as int64; rows repeated
    whole dropped (`drop_duplicate_rows`, listed in `frame.attrs["duplicates"]`), rows that share `unique`
    but differ elsewhere refused."""
    import pandas as pd

    path = Path(path)
    columns = check_columns(path, required)
    usecols = [*required, *(c for c in optional if c in columns and c not in required)]
    try:
        frame = pd.read_csv(path, usecols=usecols, dtype={"dicom_id": str})
    except Exception as exc:
        raise InputError(f"{path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
    for column in ("subject_id", "study_id"):
        if column in frame.columns:
            frame[column] = _ids(path, column, frame[column])
    if "dicom_id" in frame.columns:
        if frame["dicom_id"].isna().any():
            raise InputError(f"{path}: line {csv_line(frame['dicom_id'].isna().idxmax())}: column 'dicom_id' is empty")
        frame["dicom_id"] = frame["dicom_id"].astype(str).str.strip()
        bad = ~frame["dicom_id"].str.fullmatch(IMAGE_ID)
        if bad.any():
            raise InputError(
                f"{path}: column 'dicom_id' has {frame['dicom_id'][bad].iloc[0]!r}, not an image id (letters, "
                "digits, '-' and '_', such as MIMIC's five groups of 8 hex digits)"
            )
    return drop_duplicate_rows(frame, path, unique)


def _id_or_none(value: object) -> int:
    return int(value) if value is not None and value == value else -1  # skipped.csv's "no id"


def csv_line(index: int) -> int:
    """The file line of a CSV row read with pandas' default index (the header is line 1)."""
    return int(index) + 2


def drop_duplicate_rows(frame, path: str | os.PathLike, unique: Sequence[str] = (), part: str | None = None):
    """`frame` without rows that repeat an earlier row whole (a table concatenated twice, a copied line):
    dropped, not refused, because they carry nothing new and keeping them would count an image, study or
    box twice. Each is listed in `frame.attrs["duplicates"]` as a skipped.csv row (reason `duplicate row`,
    the file lines in `detail`) for the step to write. Rows that share the `unique` columns but differ
    elsewhere are refused (one line naming the file, both lines and the key): which one is right is not
    ours to guess. Any tabular reader (MIMIC, MS-CXR, COCO, NIH, Open-i, a plain CSV) calls this."""
    repeated = frame.duplicated(keep="first")
    rows = []
    if repeated.any():
        groups = frame.groupby(list(frame.columns), dropna=False, sort=False).ngroup()
        first_index = {g: i for i, g in reversed(list(groups.items()))}
        for index in frame.index[repeated]:
            row = frame.loc[index]
            rows.append(
                {
                    "part": part or Path(path).name,
                    "dicom_id": str(row.get("dicom_id", row.get("image_id", ""))),
                    "subject_id": _id_or_none(row.get("subject_id")),
                    "study_id": _id_or_none(row.get("study_id")),
                    "reason": "duplicate row",
                    "detail": f"line {csv_line(index)} repeats line {csv_line(first_index[groups[index]])}",
                    "path": os.fspath(path),
                }
            )
    kept = frame[~repeated]
    if unique:
        clash = kept.duplicated(list(unique), keep=False)
        if clash.any():
            lines = [csv_line(i) for i in kept.index[clash][:2]]
            key = ", ".join(f"{c} {kept.loc[kept.index[clash][0], c]}" for c in unique)
            raise InputError(
                f"{path}: lines {lines[0]} and {lines[1]} share {key} but differ; keep one (cxrdiff drops only"
                " rows repeated whole)"
            )
    kept = kept.copy()
    kept.attrs["duplicates"] = rows
    return kept


# An image id becomes a file name (files/pXX/pN/sN/<dicom_id>.jpg): MIMIC's are five groups of 8 hex digits
# joined by '-'; anything of letters, digits, '-' and '_' is taken, never a path ('/', '..').
IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def _ids(path: Path, column: str, values):
    """A subject or study id column as int64 (they become folder names); one line naming the first bad value."""

    def bad(value: object) -> bool:
        try:
            return not 0 <= parse_id(value) < 2**63
        except (TypeError, ValueError, OverflowError):
            return True

    try:
        ids = values.map(parse_id).astype("int64")
    except (TypeError, ValueError, OverflowError):
        ids = None
    if ids is None or (ids < 0).any():
        value = next(v for v in values if bad(v))
        raise InputError(f"{path}: column '{column}' has {value!r}, not an id (a whole number, 'p' or 's' first)")
    return ids


def read_metadata(path: str | os.PathLike):
    """mimic-cxr-2.0.0-metadata.csv: one row per image (dicom_id, subject_id, study_id, ViewPosition, Rows, Columns)."""
    frame = read_table(path, METADATA_COLUMNS, optional=("Rows", "Columns"), unique=("dicom_id",))
    frame["ViewPosition"] = frame["ViewPosition"].fillna("").astype(str).str.strip()
    return frame


def read_split(path: str | os.PathLike):
    """mimic-cxr-2.0.0-split.csv: the official train/validate/test split per image."""
    return read_table(path, SPLIT_COLUMNS, unique=("dicom_id",))


def read_chexpert(path: str | os.PathLike):
    """mimic-cxr-2.0.0-chexpert.csv: 14 labels per study as float32 (1, 0, -1 uncertain, NaN blank)."""
    frame = read_table(path, CHEXPERT_COLUMNS, unique=("subject_id", "study_id"))
    for label in LABELS:
        try:
            frame[label] = frame[label].astype("float32")
        except (TypeError, ValueError):
            raise InputError(f"{path}: column '{label}' has a value that is not 1, 0, -1 or blank") from None
    return frame


def read_ms_cxr(path: str | os.PathLike):
    """MS_CXR_Local_Alignment CSV: one row per box (x, y, w, h in original pixels); v1.1.0's `split` kept.
    A box repeated whole is dropped (it would be scored twice); an empty or non-number cell is refused."""
    import pandas as pd

    frame = read_table(path, MS_CXR_COLUMNS, optional=("path", "split"))
    for column in ("category_name", "label_text"):
        empty = frame[column].isna() | frame[column].astype(str).str.strip().eq("")
        if empty.any():
            raise InputError(f"{path}: line {csv_line(empty.idxmax())}: column '{column}' is empty")
    for column in ("x", "y", "w", "h", "image_width", "image_height"):
        numbers = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        bad = numbers.isna() | ~np.isfinite(numbers)
        if bad.any():
            index = bad.idxmax()
            value = frame.loc[index, column]
            what = "is empty" if value != value or not str(value).strip() else f"has {value!r}, not a number"
            raise InputError(f"{path}: line {csv_line(index)}: column '{column}' {what}")
        frame[column] = numbers
    return frame


def read_keyed_csv(path: Path, flag: str, key: str, value: str, keys: Sequence[str]) -> list[tuple[str, str]]:
    """The (key, value) rows of a small CSV that a user gives with `flag` (`--prompt-source file:`,
    `--coco-words`), each key one of `keys`: a fault is one line naming the flag and the file."""
    import pandas as pd

    if not path.is_file():
        raise InputError(f"{flag}{path}: file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{flag}{path}: not a readable CSV ({exc})") from None
    missing = {key, value} - set(table.columns)
    if missing:
        raise InputError(f"{flag}{path}: missing column(s) {', '.join(sorted(missing))}")
    unknown = sorted(set(table[key]) - set(keys))
    if unknown:
        raise InputError(f"{flag}{path}: unknown {key}(s) {', '.join(map(repr, unknown[:3]))}")
    return list(zip(table[key], table[value], strict=True))
