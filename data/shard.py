"""Preparing a table in shards, so that no one process hashes and prepares a whole corpus (issue 36).

- Inside a run (`prepare_shared`): each rank hashes and prepares rows rank::world with its share of the
  node's cores, then one collective (`gather`, e.g. accelerate's gather_object) hands every rank the whole
  table's cache paths. That collective is the only wait: its length is one rank's share, and a share that
  is measured to outlast the process group's timeout is said up front.
- As its own job (`python -m data.prepare --shard I/N`, launch/slurm_prepare_array.sh): rows I::N. Each
  shard writes its part of the index (cache/parts/index-<name>-<table>/I-of-N.json, carrying the table's
  stamp, I/N and the stat of each file its rows were prepared from); the shard that finds all N parts there,
  each covering its rows and made from the files as they are now, writes index-<name>.csv (and
  rejected-<name>.csv), so the full index appears once every shard is done, whichever finishes last; a failed
  shard leaves none, and a part left by an earlier run whose files have changed since is never assembled.

Cache entries are content-addressed and written whole (data/cache.py): shards meeting on one entry are safe,
and a later run finds every entry by its key and builds nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from core.atomic import write_json, write_text
from core.errors import ConfigError, InputError, RunStopped
from data.manifest import read_datalist, read_manifest, scan_folder
from data.prep_config import PrepConfig
from data.prepare import PrepareFailed, entry_paths, first_line, indexed, prepare_rows, source_files


@dataclass(frozen=True)
class Shard:
    """Rows index::count of a table; `show`: this process draws the progress bars (one per node)."""
    index: int = 0
    count: int = 1
    show: bool = True

    def rows(self, n: int) -> list[int]:
        return list(range(self.index, n, self.count))

    @property
    def part(self) -> str | None:
        """This shard's own hash memo (data/cache.py HashIndex); None when there is one shard."""
        return None if self.count == 1 else f"{self.index}of{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """`--shard I/N` -> Shard(I, N), with 0 <= I < N."""
    index, sep, count = str(text).partition("/")
    try:
        shard = Shard(int(index), int(count))
    except ValueError:
        shard = None
    if not sep or shard is None or not 0 <= shard.index < shard.count:
        raise ConfigError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/8 (rows I, I+N, I+2N, ...)")
    return shard


def cores_per_local_rank() -> int:
    """The cores this process may use, shared among the ranks of its node (torchrun's LOCAL_WORLD_SIZE)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def pool_size(workers: int) -> int:
    """Worker processes for prepare_rows: one core prepares in this process (no pool to start)."""
    if workers < 0:
        raise ConfigError(f"--prep_workers: expected >= 0 (0: the cores per local rank), got {workers}")
    workers = workers or cores_per_local_rank()
    return workers if workers > 1 else 0


def _alone(payload: list) -> list:
    return payload


def of_run(accelerator) -> tuple[Shard, Callable[[list], list]]:
    """This rank's Shard of a run and the gather its ranks meet in (accelerate's gather_object: every
    rank's list joined, over the run's process group and under its timeout)."""
    from accelerate.utils import gather_object
    shard = Shard(accelerator.process_index, accelerator.num_processes, accelerator.is_local_main_process)
    return shard, gather_object if accelerator.num_processes > 1 else _alone


def timeout_warning(shard: Shard, timeout_s: float | None, workers: int) -> Callable[[float, int], None]:
    """on_first for prepare_rows: once one volume is timed, say up front when this rank's share is expected
    to outlast the process group's timeout, which the other ranks wait under."""
    def check(seconds: float, left: int) -> None:
        expected = left * seconds / max(workers, 1)
        if shard.show and timeout_s and expected > timeout_s:
            minutes = expected / 60
            print(f"warning: rank {shard}: {left} volumes left to prepare at about {seconds:.2f} s each over "
                  f"{max(workers, 1)} worker(s), about {minutes:.0f} min, past the process group's timeout of "
                  f"{timeout_s / 60:g} min; the ranks waiting for this one may be stopped. Rerun with "
                  f"--dist_timeout_min {2 * minutes + 10:.0f}, or fill the cache first (python -m data.prepare "
                  "--shard I/N, launch/slurm_prepare_array.sh): a run whose cache is complete prepares nothing",
                  file=sys.stderr, flush=True)
    return check


def summary_line(n: int, prepared: list[int], cached: int, failed: int, seconds: float) -> str:
    """One line: volumes prepared (per shard), from cache, failed."""
    per = f" ({' + '.join(map(str, prepared))} on {len(prepared)} ranks)" if len(prepared) > 1 else ""
    return (f"data: {n} volumes: {sum(prepared)} prepared{per}, {cached} from cache, {failed} failed "
            f"in {seconds:.1f} s")


def prepare_shared(df: pd.DataFrame, cfg: PrepConfig, cache_dir, *, shard: Shard = Shard(),
                   gather: Callable[[list], list] | None = None, workers: int = 0, require_lesion: bool = True,
                   on_error: str = "raise", timeout_s: float | None = None) -> tuple[pd.DataFrame, list]:
    """prepare_table for one rank of a run: this rank prepares its share, `gather` (every rank calls it:
    list in, the ranks' lists joined out; None: one process) brings every share's cache paths to every rank.

    Returns what prepare_table does, on every rank. on_error="raise" raises the first bad row of the whole
    table on every rank, after the gather, so no rank is left waiting; "collect" drops bad rows and lists
    them. A rank whose preparing fails otherwise (a full disk, a bug) still reaches the gather, and every rank
    then raises RunStopped with one line naming that rank and the subject and file it was preparing.
    Rank 0 prints one line: prepared, from cache, failed. `workers`: see `pool_size`.
    """
    if on_error not in ("raise", "collect"):
        raise ConfigError(f"on_error: expected 'raise' or 'collect', got {on_error!r}")
    t0 = time.perf_counter()
    rows = shard.rows(len(df))
    pool = pool_size(workers)
    try:
        done = prepare_rows(df.iloc[rows], cfg, cache_dir, require_lesion=require_lesion, stop=on_error == "raise",
                            workers=pool, progress=shard.show,
                            desc=f"prepare {shard}" if shard.count > 1 else "prepare",
                            hash_part=shard.part, on_first=timeout_warning(shard, timeout_s, pool))
    except Exception as e:  # noqa: BLE001 - not only bad input: a full disk, a bug; said in the gather below
        crash = e
        mine = {"crash": f"rank {shard} stopped preparing its share: {_one_line(e)}",
                "bad_input": isinstance(e, InputError)}
    else:
        crash = None
        mine = {"paths": {rows[i]: entry_paths(e) for i, e in done.entries.items()},
                "errors": {rows[i]: e for i, e in done.errors.items()}, "built": len(done.built)}
    shares = (gather or _alone)([mine])  # the one wait: every rank has prepared its share, or failed to
    _stop_on_crash(shares, crash)
    paths = {i: p for s in shares for i, p in s["paths"].items()}
    errors = {i: e for s in shares for i, e in s["errors"].items()}
    if shard.index == 0:
        built = [s["built"] for s in shares]
        print(summary_line(len(df), built, len(paths) - sum(built), len(errors), time.perf_counter() - t0),
              flush=True)
    if errors and on_error == "raise":
        raise errors[min(errors)]
    out, rejected = indexed(df, paths, {i: str(e) for i, e in errors.items()})
    if shard.index == 0:
        for subject, reason in rejected:
            print(f"skipped {subject}: {reason}", file=sys.stderr)
    return out, rejected


def _one_line(e: Exception) -> str:
    return first_line(e) if isinstance(e, (InputError, PrepareFailed)) else f"{type(e).__name__}: {first_line(e)}"


def _stop_on_crash(shares: list[dict], crash: Exception | None) -> None:
    """Every rank raises the first crashed rank's line (bad input stays InputError: exit 2), so a rank that fails
    while preparing stops the run at the gather, not at the process group's timeout."""
    crashed = [s for s in shares if "crash" in s]
    if not crashed:
        return
    more = f" ({len(crashed)} ranks failed)" if len(crashed) > 1 else ""
    line = f"{crashed[0]['crash']}; every rank stops here{more}"
    raise (InputError if crashed[0]["bad_input"] else RunStopped)(line) from crash


# ---- --shard I/N as its own job ------------------------------------------------------------------

def table_stamp(df: pd.DataFrame, cfg: PrepConfig, require_lesion: bool) -> str:
    """What an index part belongs to: the table's rows and the preprocessing; parts of another table are
    never assembled with this one's."""
    text = df.to_csv(index=False) + cfg.key() + str(require_lesion)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parts_dir(cache_dir, name: str, stamp: str) -> Path:
    return Path(cache_dir) / "parts" / f"index-{name}-{stamp}"


def file_stamps(df: pd.DataFrame, rows: list[int], cfg: PrepConfig) -> dict[int, list]:
    """Row -> [[file, size, mtime_ns] for each file it is prepared from ([file] alone: missing)], taken before
    preparing: a part that carries them is later told from one whose files have changed since. No inode: on some
    cluster mounts (FUSE) it differs between the nodes the shards run on, and the index would never be written."""
    return {i: [_stat(f) for f in source_files(df.iloc[i], cfg)] for i in rows}


def _stat(path: str) -> list:
    try:
        st = os.stat(path)
    except OSError:
        return [path]
    return [path, st.st_size, st.st_mtime_ns]


def write_part(folder: Path, shard: Shard, stamp: str, paths: dict, reasons: dict, sources: dict) -> None:
    """Shard I/N's part of the index: what it belongs to (the table's stamp, I/N), its rows' cache paths and
    rejections, and the stamps of the files they were prepared from."""
    write_json(folder / f"{shard.index}-of-{shard.count}.json",
               {"stamp": stamp, "shard": str(shard), "paths": {str(i): p for i, p in paths.items()},
                "rejected": {str(i): r for i, r in reasons.items()}, "sources": {str(i): s for i, s in sources.items()}})


def read_parts(folder: Path, stamp: str, count: int, n_rows: int) -> tuple[dict, dict] | str:
    """Every shard's paths and rejections once all `count` parts are there and current; else why not."""
    paths, reasons = {}, {}
    for i in range(count):
        shard = Shard(i, count)
        try:
            part = json.loads((folder / f"{i}-of-{count}.json").read_text())
        except FileNotFoundError:
            return f"shard {shard} is not done yet (the last shard to finish writes it)"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            part = None
        why, done = _check_part(part, shard, stamp, n_rows)
        if why is not None:
            return f"shard {shard}'s part {why}: run shard {shard} again"
        paths |= done[0]
        reasons |= done[1]
    return paths, reasons


def _check_part(part, shard: Shard, stamp: str, n_rows: int) -> tuple[str | None, tuple[dict, dict] | None]:
    """(None, (paths, reasons)) for a part of this table and shard that covers exactly its rows, whose cache
    entries are there and whose files are as they were when it was prepared; else (why not, None). A part of
    an earlier run (a crashed one, or one before a file was replaced under the same name) is never assembled."""
    if not isinstance(part, dict) or part.get("stamp") != stamp or part.get("shard") != str(shard):
        return "is unreadable or belongs to another table or shard count", None
    try:
        paths = {int(k): tuple(v) for k, v in part["paths"].items()}
        reasons = {int(k): str(v) for k, v in part["rejected"].items()}
        sources = {int(k): [list(f) for f in v] for k, v in part["sources"].items()}
    except (KeyError, AttributeError, TypeError, ValueError):
        return "is incomplete", None
    rows = set(shard.rows(n_rows))
    if set(paths) | set(reasons) != rows or set(paths) & set(reasons) or set(sources) != rows:
        return "does not cover its rows", None
    for i in sorted(rows):
        for then in sources[i]:
            if _stat(then[0]) != then:
                return f"is out of date ({then[0]} changed after it was written)", None
    gone = [p[0] for p in paths.values() if not (Path(p[0]).parent / "meta.json").is_file()]
    if gone:
        return f"names cache entries that are gone, e.g. {Path(gone[0]).parent}", None
    return None, (paths, reasons)


def write_index(df: pd.DataFrame, paths: dict, reasons: dict, cache_dir: Path, name: str) -> tuple[Path, Path | None]:
    """index-<name>.csv (the prepared rows and their cache paths) and rejected-<name>.csv when rows failed."""
    out, rejected = indexed(df, paths, reasons)
    index = cache_dir / f"index-{name}.csv"
    write_text(index, out.to_csv(index=False))
    if not rejected:
        return index, None
    bad = cache_dir / f"rejected-{name}.csv"
    write_text(bad, pd.DataFrame(rejected, columns=["subject_id", "reason"]).to_csv(index=False))
    return index, bad


def command_parser(description: str) -> argparse.ArgumentParser:
    """python -m data.prepare's own flags (parse_config adds the PrepConfig ones and --config)."""
    p = argparse.ArgumentParser(prog="python -m data.prepare", description=description)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="manifest CSV (subject_id, image, optional mask, ...)")
    src.add_argument("--folder", help="folder of NIfTI volumes (no masks), e.g. unlabeled pretraining data")
    src.add_argument("--datalist", help="MSD/MONAI JSON datalist")
    p.add_argument("--datalist-key", default="training", help="section of the datalist to read")
    p.add_argument("--cache", required=True, help="cache folder (entries plus index-<name>.csv)")
    p.add_argument("--name", help="index name; default: the manifest/folder/datalist name")
    p.add_argument("--workers", type=int, default=0, help="worker processes (0: in this process)")
    p.add_argument("--shard", metavar="I/N", help="prepare rows I, I+N, I+2N, ... only (one of N jobs, e.g. a SLURM "
                   "array task: launch/slurm_prepare_array.sh); the last of the N to finish writes the index")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip subjects that fail a check and list them in rejected-<name>.csv, instead of stopping")
    p.add_argument("--allow-empty-mask", action="store_true", help="accept masks without a lesion")
    return p


def read_source(ns: argparse.Namespace, cfg: PrepConfig) -> tuple[pd.DataFrame, str]:
    """The table --manifest, --folder or --datalist names, and its default index name."""
    if ns.manifest:
        return read_manifest(ns.manifest, columns=("image",), purpose="preparing", prep=cfg), Path(ns.manifest).stem
    if ns.folder:
        return scan_folder(ns.folder), Path(ns.folder).absolute().name
    return read_datalist(ns.datalist, key=ns.datalist_key), Path(ns.datalist).stem


def prepare_command(df: pd.DataFrame, cfg: PrepConfig, cache_dir: Path, name: str, *, shard: Shard, workers: int,
                    skip_bad: bool, require_lesion: bool) -> str:
    """python -m data.prepare's work for rows shard.index::shard.count; returns the line to print."""
    t0 = time.perf_counter()
    rows = shard.rows(len(df))
    sources = file_stamps(df, rows, cfg) if shard.count > 1 else {}  # before hashing: what this part is made from
    done = prepare_rows(df.iloc[rows], cfg, cache_dir, require_lesion=require_lesion, stop=not skip_bad,
                        workers=workers, desc="prepare" if shard.count == 1 else f"prepare {shard}",
                        hash_part=shard.part)
    if done.errors and not skip_bad:
        # The first bad subject stops the run; say how to get past it (and to see every bad one at once).
        e = done.errors[min(done.errors)]
        raise type(e)(f"{e} (to skip bad subjects and list each in {cache_dir / f'rejected-{name}.csv'}, "
                      "rerun with --skip-bad)") from None
    paths = {rows[i]: entry_paths(e) for i, e in done.entries.items()}
    reasons = {rows[i]: str(e) for i, e in done.errors.items()}
    for i in sorted(reasons):  # the bars are closed by now: one clean line per subject
        print(f"skipped {df['subject_id'].iloc[i]}: {reasons[i]}", file=sys.stderr)
    counts = summary_line(len(rows), [len(done.built)], len(paths) - len(done.built), len(reasons),
                          time.perf_counter() - t0)
    head = (f"prepared {len(paths)} of {len(rows)} subjects ({cfg.modality}, {list(cfg.spacing)} mm, "
            f"preprocessing key {cfg.key()})")
    if shard.count > 1:
        stamp = table_stamp(df, cfg, require_lesion)
        folder = parts_dir(cache_dir, name, stamp)
        write_part(folder, shard, stamp, paths, reasons, sources)
        head = f"shard {shard} (rows {shard.index}::{shard.count}): {head}"
        whole = read_parts(folder, stamp, shard.count, len(df))
        if isinstance(whole, str):
            return f"{head}; index-{name}.csv not written yet: {whole}\n{counts}"
        paths, reasons = whole
    index, bad = write_index(df, paths, reasons, cache_dir, name)
    tail = f" -> {index}" + (f"; {len(reasons)} rejected, see {bad}" if bad else "")
    return f"{head}{tail}\n{counts}"
