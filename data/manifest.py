"""Manifests: which subjects, which files, which labels. CSV, folder scan or MSD/MONAI datalist in,
one validated DataFrame out.

Standard columns (any other column is clinical data and passes through untouched):
  subject_id  one row per subject (string; "007" stays "007")
  patient_id  groups subjects for patient-level splits (default: subject_id)
  site        acquisition site (default: "site0")
  image, mask absolute paths to NIfTI files (relative paths are resolved against the manifest's folder);
              with several image channels (PrepConfig.images, --images t1ce,flair,pet) those columns replace
              `image`, and PET in Bq/mL adds its dose, weight and time columns
  brain_mask  optional: a 0/1 brain mask on the first image's grid, the TBR reference of a PET channel
              (data/pet.py; without it the brain is estimated); a blank cell means none
  label       1 = tumour progression, 0 = radiation necrosis
  time, event survival time (> 0) and event indicator (1 = event, 0 = censored)
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import ConfigError, ManifestError, first_line
from data.prep_config import PrepConfig

STANDARD_COLUMNS = ("subject_id", "patient_id", "site", "image", "mask", "brain_mask", "label", "time", "event")
STRING_COLUMNS = ("subject_id", "patient_id", "site", "image", "mask", "brain_mask")
IMAGE_COLUMNS = ("image", "mask")  # what a lesion-level run reads besides its targets
DEFAULT_SITE = "site0"
MAX_LISTED = 5


def read_manifest(path, *, columns: tuple[str, ...] = IMAGE_COLUMNS, purpose: str = "this run",
                  check_files: bool = True, prep: PrepConfig | None = None) -> pd.DataFrame:
    """Read and validate a manifest CSV that must have subject_id and `columns` (image and mask paths,
    targets: label, time, event; models/tasks.py says which a task needs); see the module docstring.
    `purpose` names what needs them in the error, e.g. "--task survival". "image" in `columns` stands for
    the image channels of `prep` (default: the one column `image`) and any PET columns they need."""
    unknown = sorted(set(columns) - set(STANDARD_COLUMNS))
    if unknown:
        raise ConfigError(f"read_manifest: {unknown} are not standard columns {list(STANDARD_COLUMNS)}")
    prep = prep or PrepConfig()
    images = prep.image_columns() if "image" in columns else []
    numeric = prep.acquisition_columns() if images else []
    path = Path(path)
    where = f"manifest {path}"
    df = _read_csv(path, where, strings=images)
    required = ("subject_id", *[c for c in columns if c != "image"], *images, *numeric)
    missing = [c for c in required if c not in df.columns]
    if missing:
        flag = " (named by --images)" if set(missing) & set(images) - {"image"} else ""
        raise ManifestError(f"{where}: missing column(s) {missing}{flag} required for {purpose}; found {list(df.columns)}")

    _check_not_empty(df, "subject_id", where)
    if "patient_id" not in df.columns:
        df["patient_id"] = df["subject_id"]
    if "site" not in df.columns:
        df["site"] = DEFAULT_SITE
    _check_not_empty(df, "patient_id", where)
    _check_not_empty(df, "site", where)
    _check_unique_subjects(df, where)

    path_columns = [c for c in (*images, "mask") if c in required]
    _check_and_mark_missing_images(df, images, prep.missing_image, where)
    if "mask" in required:
        _check_not_empty(df, "mask", where)
    base = path.parent.absolute()
    for col in dict.fromkeys([*images, "image", "mask", "brain_mask"]):
        if col in df.columns:  # an optional mask column is resolved too; its blanks stay missing
            df[col] = [_absolute(p, base) if isinstance(p, str) and p else np.nan for p in df[col]]
    if check_files:  # a brain mask is checked where a row gives one
        _check_files_exist(df, path_columns + (["brain_mask"] if "brain_mask" in df.columns else []), where)
    pet = [c for c, m in prep.channels() if m == "pet"] if numeric else []
    has_pet = np.array([any(isinstance(v, str) and v for v in vals) for vals in zip(*(df[c] for c in pet))]) \
        if pet else np.zeros(len(df), bool)
    for col in numeric:  # needed where a row has a PET image (a subject without PET may leave them empty)
        df[col] = _positive_column(df, col, where, has_pet)

    if "label" in required:
        df["label"] = _binary_column(df, "label", where, "0 or 1 (1 = tumour progression, 0 = radiation necrosis)")
    if "time" in required:
        df["time"] = _time_column(df, where)
    if "event" in required:
        df["event"] = _binary_column(df, "event", where, "0 (censored) or 1 (event)")
    return _standard_first(df)


def _check_and_mark_missing_images(df: pd.DataFrame, images: list[str], policy: str, where: str) -> None:
    """The first channel is never missing (it sets the grid); a later one is refused, or with
    --missing_image zero recorded in a 0/1 column missing_<column> (a clinical feature when fused)."""
    if not images:
        return
    _check_not_empty(df, images[0], where)
    for col in images[1:]:
        empty = [i for i, v in enumerate(df[col]) if not isinstance(v, str) or not v]
        if policy == "zero":
            df[f"missing_{col}"] = np.isin(np.arange(len(df)), empty).astype(np.int64)
        elif empty:
            raise ManifestError(f"{where}: empty {col} in {_list_rows(df, empty, show_value=False)}; "
                                "every channel is needed (--missing_image zero fills a missing one with zeros)")


def scan_folder(path, pattern: str = "**/*.nii*") -> pd.DataFrame:
    """One row per NIfTI under `path`; subject_id is the relative path without .nii/.nii.gz."""
    root = Path(path).absolute()
    if not root.is_dir():
        raise ManifestError(f"folder {root}: not a directory")
    files = [
        p for p in root.glob(pattern)
        # Hidden files are skipped: macOS "._x.nii.gz" forks, and half-written temporaries.
        if p.is_file() and _strip_nifti_suffix(p.name) is not None
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    if not files:
        raise ManifestError(f"folder {root}: no .nii/.nii.gz files match {pattern!r}")
    rels = sorted(p.relative_to(root).as_posix() for p in files)
    ids = [_strip_nifti_suffix(r) for r in rels]
    df = pd.DataFrame({"subject_id": ids, "patient_id": ids, "site": DEFAULT_SITE, "image": [str(root / r) for r in rels]})
    _check_unique_subjects(df, f"folder {root}")
    return df


def read_datalist(path, key: str = "training", *, base_dir=None, check_files: bool = True) -> pd.DataFrame:
    """Read an MSD/MONAI JSON datalist section, e.g. {"training": [{"image": ..., "label": ...}]}.

    An entry's "label" that is a path is the lesion mask (MSD convention) and becomes `mask`;
    a numeric "label" is the class label. Paths are relative to `base_dir`, else the JSON's
    "base_dir" key (itself relative to the JSON's folder), else the JSON's folder.
    """
    path = Path(path)
    where = f"datalist {path}"
    if not path.is_file():
        raise ManifestError(f"{where}: file not found")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{where}: cannot parse JSON ({e})") from None
    if not isinstance(doc, dict) or key not in doc:
        keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ManifestError(f"{where}: no key {key!r}; found {keys}")
    entries = doc[key]
    if not isinstance(entries, list) or not entries:
        raise ManifestError(f"{where}: {key!r} must be a non-empty list of entries")
    base = path.parent.absolute() / (base_dir if base_dir is not None else doc.get("base_dir", ""))

    rows = []
    for i, entry in enumerate(entries, start=1):
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"].strip():
            raise ManifestError(f"{where}: {key}[{i - 1}] must be a path or an object with one \"image\" path; got {entry!r}")
        row = dict(entry)
        if isinstance(row.get("label"), str):
            row["mask"] = row.pop("label")
        row["image"] = _absolute(row["image"], base)
        if "mask" in row:
            if not isinstance(row["mask"], str) or not row["mask"].strip():
                raise ManifestError(f"{where}: {key}[{i - 1}] mask/label must be a path; got {row['mask']!r}")
            row["mask"] = _absolute(row["mask"], base)
        rows.append(row)
    df = pd.DataFrame(rows)

    if "subject_id" not in df.columns:
        names = [_strip_nifti_suffix(Path(p).name) or Path(p).name for p in df["image"]]
        if len(set(names)) < len(names):  # same file name in different folders: keep the folders
            names = [_strip_nifti_suffix(os.path.relpath(p, base)) or p for p in df["image"]]
        df.insert(0, "subject_id", names)
    df["subject_id"] = df["subject_id"].astype(str)
    df["patient_id"] = df["patient_id"].astype(str) if "patient_id" in df.columns else df["subject_id"]
    if "site" not in df.columns:
        df["site"] = DEFAULT_SITE
    _check_unique_subjects(df, where)
    if check_files:
        _check_files_exist(df, [c for c in ("image", "mask") if c in df.columns], where)
    return _standard_first(df)


def read_any(path, prep: PrepConfig | None = None) -> pd.DataFrame:
    """A folder of NIfTIs, a manifest .csv (pretrain columns: the image channels of `prep`) or a .json datalist."""
    path = Path(path)
    if path.is_dir():
        return scan_folder(path)
    if not path.exists():
        raise ManifestError(f"{path}: no such file or folder; expected a folder of NIfTIs, a .csv manifest or a .json datalist")
    if path.suffix.lower() == ".csv":
        return read_manifest(path, columns=("image",), purpose="pretraining", prep=prep)
    if path.suffix.lower() == ".json":
        return read_datalist(path)
    raise ManifestError(f"{path}: expected a folder of NIfTIs, a .csv manifest or a .json datalist")


def one_sample_per_image(df: pd.DataFrame, prep: PrepConfig) -> list[tuple[pd.DataFrame, PrepConfig]]:
    """Pretraining on several sequences: each sequence of each subject is its own single-channel sample.

    Returns one (table, prep) per image channel: the table's rows that have that sequence, its path in
    `image` and subject_id "<subject>/<column>", and prep reading that one column with its own modality.
    A subject missing a sequence just has no sample of it. One channel: [(df, prep)], unchanged.
    The encoder thus learns every sequence with one 1-channel patch embedding, which fine-tuning
    inflates to the labelled cohort's channels; no sequence embedding, as fine-tuning would have none.
    """
    channels = prep.channels()
    if len(channels) == 1:
        return [(df, prep)]
    parts = []
    for column, modality in channels:
        rows = df[[isinstance(v, str) and v != "" for v in df[column]]].copy()
        rows["subject_id"] = rows["subject_id"].astype(str) + "/" + column
        rows["image"] = rows[column]
        rows = rows.drop(columns=[c for c, _ in channels if c != "image"])
        parts.append((rows.reset_index(drop=True), replace(prep, images=(f"image:{modality}",))))
    return parts


# Columns that data.prepare adds (cache paths): never clinical features.
DERIVED_COLUMNS = ("cache_image", "cache_mask")
NOT_CLINICAL = frozenset(STANDARD_COLUMNS + DERIVED_COLUMNS)  # whatever the manifest's values


def clinical_columns(df: pd.DataFrame, prep: PrepConfig | None = None) -> list[str]:
    """Every column that is not a standard, derived, image-channel or PET-acquisition column of `prep`, nor a
    column of image paths (image_path_columns: a sequence this run does not read)."""
    skip = NOT_CLINICAL | set(image_path_columns(df))
    if prep is not None:
        skip |= set(prep.image_columns()) | set(prep.acquisition_columns())
    return [c for c in df.columns if c not in skip]


def check_not_image_paths(df: pd.DataFrame, columns: list[str], where: str) -> None:
    """ManifestError naming the given clinical columns that hold image paths (image_path_columns)."""
    named = list(dict.fromkeys(c for c in columns if c in df.columns))  # a name given twice is checked once
    paths = image_path_columns(df[named])
    if paths:
        other = next((c for c in paths if c != "image"), "")  # `image` is the run's first image already
        raise ManifestError(f"{where}: column(s) {paths} hold image paths, not clinical values; read them as images "
                            f"with --images" + (f" (e.g. --images image,{other})" if other else ""))


def image_path_columns(df: pd.DataFrame) -> list[str]:
    """The columns whose every non-empty value is a NIfTI file name (data.nifti.NIFTI_SUFFIXES): image channels,
    such as a FLAIR column a T1-CE-only run leaves unread, never clinical variables. Encoded as one, each path
    would be a category of its own, a per-subject identifier that a fusion head can memorise."""
    from data.nifti import NIFTI_SUFFIXES
    found = []
    for col in df.columns:
        if pd.api.types.is_numeric_dtype(df[col]) or pd.api.types.is_bool_dtype(df[col]):
            continue
        values = df[col].dropna().astype(str).str.strip()
        values = values[values != ""]
        if len(values) and values.str.lower().str.endswith(NIFTI_SUFFIXES).all():
            found.append(col)
    return found


def _read_csv(path: Path, where: str, strings=()) -> pd.DataFrame:
    if not path.is_file():
        raise ManifestError(f"{where}: file not found")
    try:
        with warnings.catch_warnings():
            # More fields than header names: pandas would silently use or drop a column.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(path, index_col=False)
            # Read again as raw text so ids and paths keep their exact spelling ("007", "NA").
            raw = pd.read_csv(path, index_col=False, dtype=str, keep_default_na=False)
            header = pd.read_csv(path, nrows=1, header=None, dtype=str, keep_default_na=False).iloc[0]
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{where}: file is empty; expected a header row and one row per subject") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError, OSError) as e:
        raise ManifestError(f"{where}: cannot parse CSV ({first_line(e)})") from None
    # Header names are stripped ("label " is "label"); blank names keep pandas' "Unnamed: N".
    names = {old: new.strip() or old for old, new in zip(df.columns, header)}
    stripped = list(names.values())
    dupes = sorted({n for n in stripped if stripped.count(n) > 1})
    if dupes:
        raise ManifestError(f"{where}: duplicate column name(s) {dupes}")
    df = df.rename(columns=names)
    raw = raw.rename(columns=names)
    if df.empty:
        raise ManifestError(f"{where}: no data rows; expected one row per subject")
    for col in dict.fromkeys([*STRING_COLUMNS, *strings]):  # paths and ids keep their exact spelling
        if col in df.columns:
            df[col] = raw[col].str.strip()
    return df


def _check_not_empty(df: pd.DataFrame, col: str, where: str) -> None:
    bad = [i for i, v in enumerate(df[col]) if not isinstance(v, str) or not v]
    if bad:
        raise ManifestError(f"{where}: empty {col} in {_list_rows(df, bad, show_value=False)}")


def _check_unique_subjects(df: pd.DataFrame, where: str) -> None:
    counts = df["subject_id"].value_counts()
    dupes = sorted(counts[counts > 1].index)
    if dupes:
        raise ManifestError(f"{where}: duplicate subject_id(s) {_head(dupes)}")


def _check_files_exist(df: pd.DataFrame, columns: list[str], where: str) -> None:
    missing = [f"{s} {col} {p}" for col in columns for s, p in zip(df["subject_id"], df[col])
               if isinstance(p, str) and not os.path.isfile(p)]  # an empty cell is --missing_image's to judge
    if missing:
        raise ManifestError(f"{where}: {len(missing)} missing file(s): {_head(missing)}")


def _binary_column(df: pd.DataFrame, col: str, where: str, expected: str) -> pd.Series:
    values = pd.to_numeric(df[col], errors="coerce")
    bad = [i for i, v in enumerate(values) if not (v == 0 or v == 1)]
    if bad:
        raise ManifestError(f"{where}: {col} must be {expected}; bad {_list_rows(df, bad, col)}")
    return values.astype(np.int64)


def _positive_column(df: pd.DataFrame, col: str, where: str, needed: np.ndarray) -> pd.Series:
    values = pd.to_numeric(df[col], errors="coerce").astype(np.float64)
    bad = [i for i, v in enumerate(values) if needed[i] and not (np.isfinite(v) and v >= 0)]
    if bad:
        raise ManifestError(f"{where}: PET column {col} must be a number >= 0 (or --prep.pet.units suv); "
                            f"bad {_list_rows(df, bad, col)}")
    return values


def _time_column(df: pd.DataFrame, where: str) -> pd.Series:
    values = pd.to_numeric(df["time"], errors="coerce").astype(np.float64)
    bad = [i for i, v in enumerate(values) if not (np.isfinite(v) and v > 0)]
    if bad:
        raise ManifestError(f"{where}: time must be a number > 0; bad {_list_rows(df, bad, 'time')}")
    return values


def _list_rows(df: pd.DataFrame, rows: list[int], col: str | None = None, show_value: bool = True) -> str:
    """'row 3 (subject s3): abc' for each bad row; rows are 1-based data rows (header excluded)."""
    items = []
    for i in rows:
        item = f"row {i + 1}" + (f" (subject {df['subject_id'].iloc[i]})" if df["subject_id"].iloc[i] else "")
        if show_value:
            v = df[col].iloc[i]
            item += f": {'(empty)' if pd.isna(v) or v == '' else v}"
        items.append(item)
    return _head(items)


def _head(items: list) -> str:
    shown = ", ".join(str(x) for x in items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def _absolute(p: str, base: Path) -> str:
    return os.path.normpath(base / Path(p).expanduser())


def _strip_nifti_suffix(name: str) -> str | None:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _standard_first(df: pd.DataFrame) -> pd.DataFrame:
    """The standard columns first, then the others (clinical, image channels) in file order; no derived ones."""
    order = [c for c in STANDARD_COLUMNS if c in df.columns] + [c for c in df.columns if c not in NOT_CLINICAL]
    return df[order].reset_index(drop=True)
