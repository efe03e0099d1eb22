"""Preprocess subjects into the cache: load and check, resample, normalise intensity, crop foreground.

    python -m data.prepare --manifest cohort/manifest.csv --cache cache/ [--spacing 2 2 2] [--modality mri] [--workers 4]
        [--config launch/finetune_tiny_cpu.yaml] [--shard I/N] [--skip_bad]

writes one cache entry per subject (see data/cache.py) and cache/index-<name>.csv: the input
table plus `cache_image` and `cache_mask` columns, which the datasets read. With --shard I/N it prepares
rows I::N only, and the last of the N shards writes the index (data/shard.py).
"""
from __future__ import annotations

import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import numpy as np
import pandas as pd
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRange, SpatialResample, Spacingd
from tqdm import tqdm

from core.cli import parse_config
from core.config import to_dict
from core.errors import ConfigError, InputError, NiftiError, cli_entry, failed_on, first_line, restated, working_on
from data import cache, pet
from data.brain import brain_mask, foreground_box, foreground_mask
from data.nifti import Volume, load_mask, load_volume
from data.prep_config import CHANNELS_VERSION, PREP_VERSION, PrepConfig

# A further channel must cover this share of the first channel's head; less means another field of view
# or another scanner space, which no resampling can repair.
MIN_COVERAGE = 0.9

# ---- volume operations -------------------------------------------------------------------------

def resample(image: Volume, mask: Volume | None, spacing) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Resample to `spacing` mm: image trilinear, mask nearest then re-binarised.

    Returns image [X,Y,Z] float32, mask [X,Y,Z] float32 0/1 or None, and the new affine. MONAI keeps
    the axis directions and the first voxel's world position, so every voxel of the new grid maps
    to the same world point as the matching position of the old one.
    """
    if np.allclose(image.spacing, spacing, rtol=1e-4, atol=0):
        return image.array, (mask.array if mask else None), image.affine
    arrays = {"image": (image.array, "bilinear")} | ({"mask": (mask.array, "nearest")} if mask is not None else {})
    out, new_affine = _spacingd(arrays, image.affine, spacing)
    msk = (out["mask"] > 0.5).astype(np.float32) if mask is not None else None
    return out["image"], msk, new_affine


def resample_mask(mask: Volume, image: Volume, spacing) -> np.ndarray:
    """A 0/1 mask checked to lie on `image`'s grid -> [X', Y', Z'] bool where `resample` puts a lesion mask: through
    the image's affine, never the mask's own (within check_same_grid's tolerance, that can give another shape)."""
    if np.allclose(image.spacing, spacing, rtol=1e-4, atol=0):
        return mask.array > 0.5
    out, _ = _spacingd({"mask": (mask.array, "nearest")}, image.affine, spacing)
    return out["mask"] > 0.5  # [X', Y', Z']


def _spacingd(arrays: Mapping[str, tuple[np.ndarray, str]], affine: np.ndarray, spacing) -> tuple[dict, np.ndarray]:
    """MONAI's Spacingd of arrays [X, Y, Z] (each with its mode) all on `affine`, so onto one grid of `spacing` mm
    -> ({name: [X', Y', Z'] float32}, the new affine)."""
    keys = list(arrays)
    reference = torch.as_tensor(affine, dtype=torch.float64)
    data = {k: MetaTensor(torch.from_numpy(arrays[k][0])[None], affine=reference.clone()) for k in keys}  # [1, X, Y, Z]
    out = Spacingd(keys, pixdim=tuple(spacing), mode=[arrays[k][1] for k in keys], padding_mode="border",
                   dtype=np.float32)(data)
    new_affine = out[keys[0]].affine.numpy().astype(np.float64)
    return {k: out[k].as_tensor()[0].numpy().astype(np.float32, copy=False) for k in keys}, new_affine


class Brain(NamedTuple):
    """The TBR reference's brain on the prepared grid, and what it is (recorded in the cache metadata)."""
    mask: np.ndarray  # [X, Y, Z] bool
    source: str


def normalise(image: np.ndarray, fg: np.ndarray, cfg: PrepConfig, modality: str | None = None) -> tuple[np.ndarray, dict]:
    """Intensity normalisation of an MRI or CT channel -> (image [X,Y,Z] float32, stats incl. the pad value).

    CT: HU window -> [0, 1] (MONAI ScaleIntensityRange). MRI: clip to percentiles of the
    foreground, then z-score with the foreground mean/std; background is set to the clipped minimum.
    MONAI's NormalizeIntensity(nonzero=True) would use nonzero voxels, not this foreground, hence by hand.
    PET is `normalise_pet`. `modality` defaults to cfg.modality.
    """
    if (modality or cfg.modality) == "ct":
        lo, hi = cfg.ct_window
        out = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(image)
        return np.asarray(out, dtype=np.float32), {"window": [lo, hi], "pad_value": 0.0}
    lo, hi = np.percentile(image[fg], cfg.mri_percentiles)
    clipped = np.clip(image, lo, hi)
    mean, std = float(clipped[fg].mean()), float(clipped[fg].std())
    if not std > 1e-6 * max(abs(mean), 1.0):
        raise InputError(f"foreground intensity is constant ({mean:g}); nothing to normalise")
    out = ((clipped - mean) / std).astype(np.float32)
    background = float((lo - mean) / std)
    out[~fg] = background
    return out, {"clip": [float(lo), float(hi)], "mean": mean, "std": std, "pad_value": background}


def normalise_pet(image: np.ndarray, brain: Brain | None, lesion: np.ndarray | None, spacing, row: Mapping,
                  cfg: PrepConfig, where: str) -> tuple[np.ndarray, dict]:
    """A PET channel [X,Y,Z] -> SUV (body weight, from the row's dose, weight and time unless the file is
    SUV already), then TBR over normal-appearing brain (`brain` [X,Y,Z] bool, already cut to the voxels the
    PET covers, minus the lesion: data/pet.py) unless --prep.pet.scale suv."""
    factor = 1.0 if cfg.pet.units == "suv" else pet.suv_from_row(row, cfg.pet, where)
    suv = (image * factor).astype(np.float32)
    stats = {"units": cfg.pet.units, "suv_factor": factor, "scale": cfg.pet.scale, "pad_value": 0.0}
    if cfg.pet.scale == "suv":
        return suv, stats
    region = pet.reference_region(brain.mask, lesion, spacing, cfg.pet)
    tbr, ref = pet.to_tbr(suv, region, where)
    reference = {"brain": brain.source, "lesion_excluded": lesion is not None and bool(lesion.any()),
                 "lesion_margin_mm": cfg.pet.lesion_margin_mm}
    return tbr, {**stats, "reference_suv": ref, "reference_voxels": int(region.sum()), "reference": reference}


def onto_grid(volume: Volume, affine: np.ndarray, shape, spacing) -> tuple[np.ndarray, np.ndarray]:
    """A further channel on the first channel's prepared grid (`affine`, `shape`) -> (image [X,Y,Z] float32,
    inside [X,Y,Z] bool: the voxels its own field of view covers).

    A channel acquired on the first one's grid goes through the same Spacingd, so it lands on the same
    voxels exactly; any other grid is resampled through the two affines (world mm) by MONAI's SpatialResample.
    """
    img, _, own_affine = resample(volume, None, spacing)
    if img.shape == tuple(shape) and np.allclose(own_affine, affine, atol=1e-4):
        return img, np.ones(shape, bool)
    src = MetaTensor(torch.from_numpy(volume.array)[None], affine=torch.as_tensor(volume.affine, dtype=torch.float64))
    dst = torch.as_tensor(affine, dtype=torch.float64)
    out = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=np.float32)(src, dst_affine=dst, spatial_size=shape)
    ones = MetaTensor(torch.ones(tuple(src.shape)), affine=src.affine.clone())
    inside = SpatialResample(mode="nearest", padding_mode="zeros", dtype=np.float32)(ones, dst_affine=dst, spatial_size=shape)
    return (out.as_tensor()[0].numpy().astype(np.float32, copy=False),  # [X, Y, Z]
            inside.as_tensor()[0].numpy() > 0.5)


# ---- one subject -------------------------------------------------------------------------------

def _cell(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        return None
    return str(value)


def _source_paths(row: Mapping, cfg: PrepConfig) -> tuple[str, list[str | None], str | None]:
    """(subject, one path per image channel (None: missing), mask path or None)."""
    return str(row["subject_id"]), [_cell(row.get(c)) for c in cfg.image_columns()], _cell(row.get("mask"))


def source_files(row: Mapping, cfg: PrepConfig) -> list[str]:
    """Every file a row's cache entry is prepared from: its image channels, its mask, its (PET TBR) brain mask."""
    _, image_paths, mask_path = _source_paths(row, cfg)
    return [p for p in (*image_paths, mask_path, _brain_path(row, cfg)) if p]


def _digest(hashes: cache.HashIndex, path: str, role: str) -> str:
    try:
        return hashes.digest(path)
    except FileNotFoundError:
        raise NiftiError(f"{role} {path}: file not found") from None
    except OSError as e:
        raise NiftiError(f"{role} {path}: cannot read ({e.strerror})") from None


def _brain_path(row: Mapping, cfg: PrepConfig) -> str | None:
    """The row's brain-mask file, when preparing reads one (a PET channel in TBR) and the row gives one."""
    return _cell(row.get("brain_mask")) if cfg.uses_brain_mask() else None


def subject_key(row: Mapping, cfg: PrepConfig, hashes: cache.HashIndex) -> str:
    """Cache key of a subject: content of its image, mask and (PET TBR) brain-mask files, the PET columns it
    reads, and the preprocessing parameters. One image channel gives the key it had before channels existed."""
    subject, image_paths, mask_path = _source_paths(row, cfg)
    if image_paths[0] is None:
        raise NiftiError(f"subject {subject}: no {cfg.image_columns()[0]} image (the first channel sets the grid)")
    parts = [_digest(hashes, p, col) if p else "missing" for p, col in zip(image_paths, cfg.image_columns())]
    parts += [f"{c}={row.get(c)}" for c in cfg.acquisition_columns()]
    if _brain_path(row, cfg):
        parts.append("brain_mask=" + _digest(hashes, _brain_path(row, cfg), "brain_mask"))
    mask_digest = _digest(hashes, mask_path, "mask") if mask_path else None
    return cache.entry_key("|".join(parts), mask_digest, cfg.key())


def _check_lesion(entry: cache.CacheEntry, subject: str, require_lesion: bool) -> cache.CacheEntry:
    # An entry built with require_lesion=False may hold an empty mask; a later strict call must still fail.
    if require_lesion and entry.meta.get("has_mask") and entry.meta.get("mask_voxels", 0) == 0:
        raise NiftiError(f"subject {subject}: mask {entry.meta['source_mask']} is empty; expected a lesion")
    return entry


def _first_channel(subject: str, image_path: str, mask_path: str | None, cfg: PrepConfig, require_lesion: bool):
    """Load, check and resample the first channel (and the mask): the grid every other channel joins."""
    with working_on(f"{cfg.image_columns()[0]} {image_path}"):
        image = load_volume(image_path)
    with working_on(f"mask {mask_path}"):
        mask = load_mask(mask_path, image, require_lesion=require_lesion) if mask_path else None
    if float(image.array.min()) == float(image.array.max()):
        raise NiftiError(f"image {image_path}: constant intensity {float(image.array.min()):g}; nothing to normalise")
    img, msk, affine = resample(image, mask, cfg.spacing)  # [X', Y', Z'] each
    if require_lesion and mask is not None and not msk.any():
        raise NiftiError(f"subject {subject}: the lesion in mask {mask_path} ({int(mask.array.sum())} voxels) "
                         f"vanishes when resampled to {list(cfg.spacing)} mm; use a finer spacing")
    return image, img, msk, affine


def _brain(row: Mapping, cfg: PrepConfig, image: Volume, first: np.ndarray, fg: np.ndarray, affine) -> Brain | None:
    """The PET TBR reference's brain [X', Y', Z']: the row's brain_mask file (checked like the lesion mask:
    0/1, not empty, on the first image's grid), else data.brain.brain_mask of the first channel. None
    without a PET channel in TBR."""
    if not cfg.uses_brain_mask():
        return None
    path = _brain_path(row, cfg)
    if path:
        try:
            with working_on(f"brain_mask {path}"):
                drawn = load_mask(path, image, role="brain_mask")
        except InputError as e:  # the file alone is named there; say whose and which column, as channels do
            raise NiftiError(restated(f"subject {row['subject_id']} brain_mask {path}", path, e)) from None
        return Brain(resample_mask(drawn, image, cfg.spacing), f"brain_mask column: {path}")
    spacing = [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)]
    p = cfg.pet
    source = (f"estimated: data.brain.brain_mask of {cfg.image_columns()[0]} (head eroded {p.brain_erode_mm:g} mm, "
              "Otsu's brighter class, largest component)")
    return Brain(brain_mask(first, spacing, head=fg, modality=cfg.channels()[0][1], head_erode_mm=p.brain_erode_mm),
                 source)


def _channels(row: Mapping, cfg: PrepConfig, subject: str, image_paths: list, first: np.ndarray, fg: np.ndarray,
              msk, affine, brain: Brain | None) -> tuple[list, list]:
    """Every image channel on the first one's grid, normalised by its modality -> ([X,Y,Z] arrays, stats).
    A channel's statistics (percentiles, mean, the TBR reference) see only the voxels its own field of view
    covers: the rest are zeros of the resampling, not tissue."""
    spacing = [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)]
    arrays, stats = [], []
    for k, ((column, modality), path) in enumerate(zip(cfg.channels(), image_paths)):
        where = f"subject {subject} {column} {path}"
        if path is None:  # only after the first channel, and only with --missing_image zero (manifest checks)
            arrays.append(np.zeros_like(first))
            stats.append({"column": column, "modality": modality, "source": None, "missing": True, "pad_value": 0.0})
            continue
        inside = np.ones(first.shape, bool)  # [X', Y', Z']
        img = first
        if k > 0:
            with working_on(f"{column} {path}"):
                img, inside = onto_grid(load_volume(path), affine, first.shape, cfg.spacing)
            covered = float(inside[fg].mean()) if fg.any() else 1.0
            if covered < MIN_COVERAGE:
                raise NiftiError(f"{where}: covers {covered:.0%} of the head in {cfg.image_columns()[0]} (by the "
                                 f"two files' affines); expected >= {MIN_COVERAGE:.0%}: are they in one scanner space?")
        seen = Brain(brain.mask & inside, brain.source) if brain is not None else None
        try:
            if modality == "pet":
                out, st = normalise_pet(img, seen, msk, spacing, row, cfg, where)
            else:
                out, st = normalise(img, fg & inside, cfg, modality)
        except InputError as e:
            raise NiftiError(restated(where, path, e)) from None
        out[~inside] = st["pad_value"]
        arrays.append(out)
        stats.append({"column": column, "modality": modality, "source": path, **st})
    return arrays, stats


def build_entry(row: Mapping, cfg: PrepConfig, cache_dir, key: str, *, require_lesion: bool = True) -> cache.CacheEntry:
    """Do the work for one subject and write its cache entry (no cache lookup)."""
    subject, image_paths, mask_path = _source_paths(row, cfg)
    image, first, msk, affine = _first_channel(subject, image_paths[0], mask_path, cfg, require_lesion)
    fg = foreground_mask(first, cfg.channels()[0][1])  # [X', Y', Z'] bool: the head, from the first channel
    brain = _brain(row, cfg, image, first, fg, affine)  # [X', Y', Z'] or None: the TBR reference's brain
    arrays, stats = _channels(row, cfg, subject, image_paths, first, fg, msk, affine, brain)

    if cfg.crop_foreground:
        start, end = foreground_box(fg, msk, cfg.foreground_margin)
    else:
        start, end = [0, 0, 0], list(first.shape)
    window = tuple(slice(s, e) for s, e in zip(start, end))
    img = np.stack([a[window] for a in arrays])  # [C, X, Y, Z]
    msk = msk[window] if msk is not None else None
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ np.array(start, dtype=np.float64) + affine[:3, 3]  # voxel `start` is the new origin

    meta = {
        "subject_id": subject,
        "source_image": image_paths[0],
        "source_mask": mask_path,
        "source_shape": list(image.shape),
        "source_spacing": list(image.spacing),
        "resampled_shape": [int(s) for s in fg.shape],
        "crop_start": start,
        "crop_end": end,
        "shape": [int(s) for s in img.shape[1:]],
        "spacing": [float(s) for s in np.linalg.norm(crop_affine[:3, :3], axis=0)],
        "affine": crop_affine.tolist(),
        "mask_voxels": int(msk.sum()) if msk is not None else None,
        "intensity": {k: v for k, v in stats[0].items() if k not in ("column", "modality", "source")},
        "pad_value": stats[0]["pad_value"],
        "prep": to_dict(cfg),
        "prep_key": cfg.key(),
        "prep_version": PREP_VERSION,
        "channels_version": CHANNELS_VERSION,
    }
    if len(arrays) > 1:
        meta["channels"] = stats
        meta["pad_values"] = [st["pad_value"] for st in stats]
    return cache.write_entry(cache_dir, key, img, None if msk is None else msk[None], meta)


def prepare_subject(row: Mapping, cfg: PrepConfig, cache_dir, *, require_lesion: bool = True) -> cache.CacheEntry:
    """Cache entry for one manifest row (subject_id, image, optional mask); a cache hit returns at once."""
    hashes = cache.HashIndex(cache_dir)
    key = subject_key(row, cfg, hashes)
    hashes.save()
    entry = cache.lookup(cache_dir, key)
    if entry is None:
        entry = build_entry(row, cfg, cache_dir, key, require_lesion=require_lesion)
    return _check_lesion(entry, str(row["subject_id"]), require_lesion)


# ---- a table -----------------------------------------------------------------------------------

class PrepareFailed(RuntimeError):
    """Preparing a subject failed, not for bad input (a full disk, a bug): names the subject and the file that
    failed (its first image when no file is known)."""


def _build_in_worker(args) -> tuple[cache.CacheEntry | None, InputError | None]:
    row, cfg, cache_dir, key, require_lesion = args
    try:
        return build_entry(row, cfg, cache_dir, key, require_lesion=require_lesion), None
    except InputError as e:  # returned, not raised, so one bad subject does not stop the pool
        return None, e
    except Exception as e:  # not bad input: raised on naming the subject and file (a rank tells every rank)
        subject, image_paths, _ = _source_paths(row, cfg)
        failed = failed_on(e, f"{cfg.image_columns()[0]} {image_paths[0]}")  # the first image, if none is known
        raise PrepareFailed(f"subject {subject} {failed}: {first_line(e, typed=True)}") from e


def _init_worker() -> None:
    torch.set_num_threads(1)  # the parallelism is across subjects


class Prepared(NamedTuple):
    """What preparing some rows did, by row position: their entries, their errors, and the rows whose
    entry this call built (the other entries came from the cache)."""
    entries: dict[int, cache.CacheEntry]
    errors: dict[int, InputError]
    built: set[int]


def _hash_rows(rows: list[dict], cfg: PrepConfig, cache_dir: Path, stop: bool, progress: bool, hash_part: str | None,
               entries: dict, errors: dict) -> dict[str, list[int]]:
    """Fill `entries` with cache hits and `errors` with unreadable rows (with `stop`, up to the first one);
    return key -> rows still to build."""
    todo: dict[str, list[int]] = {}
    hashes = cache.HashIndex(cache_dir, part=hash_part)
    # `with`: a raise closes (and, leave=False, clears) the bar, so the CLI's error gets a line of its own.
    with tqdm(rows, desc="hash", unit="subject", disable=not progress, leave=False) as bar:
        for i, row in enumerate(bar):
            try:
                key = subject_key(row, cfg, hashes)
            except InputError as e:
                errors[i] = e
                if stop:
                    break
                continue
            hit = cache.lookup(cache_dir, key)
            if hit is not None:
                entries[i] = hit
            else:
                todo.setdefault(key, []).append(i)
    hashes.save()
    return todo


def _build_jobs(jobs: list[tuple], stop: bool, workers: int, progress: bool, desc: str,
                on_first: Callable[[float, int], None] | None) -> list[tuple]:
    """(entry, error) per job, in job order; serially with `stop`, up to the first bad subject. An error that
    is not bad input propagates. `on_first(seconds, jobs left)` is called once the first job is done: the
    measured time a volume takes here."""
    outcomes = []
    t0 = time.perf_counter()

    def done(outcome, bar) -> None:
        outcomes.append(outcome)
        bar.update()
        if on_first is not None and len(outcomes) == 1:
            on_first(time.perf_counter() - t0, len(jobs) - 1)

    with tqdm(total=len(jobs), desc=desc, unit="subject", disable=not progress or not jobs) as bar:
        if workers > 0 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker) as pool:
                for r in pool.map(_build_in_worker, jobs):
                    done(r, bar)
            return outcomes
        for job in jobs:
            done(_build_in_worker(job), bar)
            if stop and outcomes[-1][1] is not None:
                break
    return outcomes


def prepare_rows(df: pd.DataFrame, cfg: PrepConfig, cache_dir, *, require_lesion: bool = True, stop: bool = False,
                 workers: int = 0, progress: bool = True, desc: str = "prepare", hash_part: str | None = None,
                 on_first: Callable[[float, int], None] | None = None) -> Prepared:
    """Prepare every row of `df` (or, with `stop`, up to its first bad one); nothing is raised for bad input.

    Subjects with identical files and parameters share one entry and are built once. `hash_part` names
    this writer's hash memo (a shard's own; data/cache.py HashIndex). Progress bars are closed on return."""
    cache_dir = Path(cache_dir)
    rows = [dict(r) for r in df.to_dict(orient="records")]
    entries: dict[int, cache.CacheEntry] = {}
    errors: dict[int, InputError] = {}
    todo = _hash_rows(rows, cfg, cache_dir, stop, progress, hash_part, entries, errors)
    if stop and errors:
        return Prepared(entries, errors, set())

    jobs = [(rows[idx[0]], cfg, cache_dir, key, require_lesion) for key, idx in todo.items()]
    built: set[int] = set()
    outcomes = _build_jobs(jobs, stop, workers, progress, desc, on_first)  # with `stop`, maybe fewer than jobs
    for (key, idx), (entry, err) in zip(todo.items(), outcomes):
        for i in idx:
            if err is None:
                entries[i] = entry
                built.add(i)
            else:
                errors[i] = err

    for i, entry in list(entries.items()):
        try:
            _check_lesion(entry, str(rows[i]["subject_id"]), require_lesion)
        except InputError as e:
            errors[i] = e
            del entries[i]
            built.discard(i)
    return Prepared(entries, errors, built)


def indexed(df: pd.DataFrame, paths: Mapping[int, tuple[str, str | None]], reasons: Mapping[int, str]
            ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """(the prepared rows of `df` + cache_image, cache_mask columns, rejected [(subject_id, reason)]), from
    row position -> (image path, mask path or None) and row position -> why it failed."""
    ok = sorted(paths)
    out = df.iloc[ok].copy().reset_index(drop=True)
    out["cache_image"] = [paths[i][0] for i in ok]
    out["cache_mask"] = [paths[i][1] for i in ok]
    subjects = df["subject_id"].astype(str).tolist()
    return out, [(subjects[i], reasons[i]) for i in sorted(reasons)]


def entry_paths(entry: cache.CacheEntry) -> tuple[str, str | None]:
    return str(entry.image_path), str(entry.mask_path) if entry.mask_path else None


def prepare_table(df: pd.DataFrame, cfg: PrepConfig, cache_dir, *, require_lesion: bool = True,
                  on_error: str = "raise", workers: int = 0, progress: bool = True
                  ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Prepare every row; returns (df + cache_image, cache_mask columns, rejected [(subject_id, reason)]).

    on_error="raise" re-raises the first InputError (in table order); "collect" drops bad rows from the
    returned table and lists them with the reason. Subjects with identical files and parameters share
    one entry and are built once. Progress bars are closed before anything is raised.
    """
    if on_error not in ("raise", "collect"):
        raise ConfigError(f"on_error: expected 'raise' or 'collect', got {on_error!r}")
    done = prepare_rows(df, cfg, cache_dir, require_lesion=require_lesion, stop=on_error == "raise",
                        workers=workers, progress=progress)
    if done.errors and on_error == "raise":
        raise done.errors[min(done.errors)]
    return indexed(df, {i: entry_paths(e) for i, e in done.entries.items()},
                   {i: str(e) for i, e in done.errors.items()})


# ---- CLI ---------------------------------------------------------------------------------------

@cli_entry
def main(argv: list[str] | None = None) -> int:
    from data.shard import Shard, command_parser, parse_shard, prepare_command, read_source  # they import this module
    # --config: a stage's YAML gives its prep: section, so every stage finds the entries made here
    cfg, ns = parse_config(PrepConfig, argv, parser=command_parser(__doc__.split("\n\n")[0]), section="prep")
    if ns.workers < 0:
        raise ConfigError(f"--workers: expected >= 0, got {ns.workers}")
    shard = parse_shard(ns.shard) if ns.shard else Shard()
    df, default_name = read_source(ns, cfg)
    print(prepare_command(df, cfg, Path(ns.cache), ns.name or default_name, shard=shard, workers=ns.workers,
                          skip_bad=ns.skip_bad, require_lesion=not ns.allow_empty_mask))
    return 0


if __name__ == "__main__":
    sys.exit(main())
