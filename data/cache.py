"""The preprocessed-volume cache: uncompressed .npy files read back memory-mapped.

An entry's key is sha256(image bytes digest, mask bytes digest or "", preprocessing key), so a
changed source file or a changed parameter never serves a stale entry. Layout:

    cache_dir/<key[:2]>/<key>/image.npy   [1, X, Y, Z] float32
                              mask.npy    [1, X, Y, Z] uint8 (absent without a mask)
                              meta.json   written last: its presence means the entry is complete

Entries are built in a temporary directory and moved into place whole (`atomic_dir`). An entry damaged
later (a truncated .npy, garbled meta.json: a full disk, a copy cut short) is not served: `lookup` checks
each array's header and size against meta.json and misses, so data.prepare builds it again; an array
damaged while a run reads it is one line naming the file (`load_array`), never numpy's traceback.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.atomic import atomic_dir, write_json
from core.errors import InputError, first_line

_CHUNK = 1 << 20
# A file modified this recently may still change within the same timestamp tick, so its digest
# is not memoised (the "racy git" rule): size and mtime alone could then hide an edit.
_RACY_SECONDS = 2.0
HASH_INDEX = "hash-index.json"


def file_digest(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HashIndex:
    """Memoised file digests keyed by (resolved path, size, mtime_ns, inode), kept in cache_dir.

    Only a speed-up: a file whose stat changed, or that was modified within the last `_RACY_SECONDS` when
    hashed, is hashed again. Each writer keeps its own file: `hash-index.json`, or `hash-index.<part>.json`
    for a shard (a rank, a --shard job), so writers that run at once never replace each other's digests;
    every index reads them all.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, part: str | None = None):
        folder = Path(cache_dir) if cache_dir is not None else None
        self.path = None if folder is None else folder / (f"hash-index.{part}.json" if part else HASH_INDEX)
        self.table: dict[str, list] = _read_memo(self.path) if self.path is not None else {}  # this writer's own
        self.others: dict[str, list] = {}  # the other writers', read only
        if folder is not None and folder.is_dir():
            for other in sorted(folder.glob("hash-index*.json")):
                if other != self.path:
                    self.others.update(_read_memo(other))
        self.dirty = False

    def digest(self, path: str | os.PathLike) -> str:
        real = os.path.realpath(path)
        st = os.stat(real)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        for table in (self.table, self.others):
            known = table.get(real)
            if known is not None and known[:3] == stamp:
                return known[3]
        digest = file_digest(real)
        if time.time() - st.st_mtime_ns / 1e9 > _RACY_SECONDS:
            self.table[real] = stamp + [digest]
            self.dirty = True
        return digest

    def save(self) -> None:
        if self.path is not None and self.dirty:
            # Two writers of one part (two runs with one layout) each replace the whole file; a lost update
            # only costs a rehash.
            write_json(self.path, self.table)
            self.dirty = False


def _read_memo(path: Path) -> dict[str, list]:
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # a missing or damaged memo only costs a rehash
    return table if isinstance(table, dict) else {}


def entry_key(image_digest: str, mask_digest: str | None, prep_key: str) -> str:
    payload = json.dumps([image_digest, mask_digest or "", prep_key])
    return hashlib.sha256(payload.encode()).hexdigest()


def entry_dir(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / key[:2] / key


@dataclass
class CacheEntry:
    """One preprocessed subject; arrays are opened memory-mapped on each call (cheap, and picklable)."""

    dir: Path
    meta: dict = field(repr=False)

    @property
    def image_path(self) -> Path:
        return self.dir / "image.npy"

    @property
    def mask_path(self) -> Path | None:
        return self.dir / "mask.npy" if self.meta.get("has_mask") else None

    def image(self) -> np.ndarray:
        return load_array(self.image_path)  # [C, X, Y, Z] float32

    def mask(self) -> np.ndarray | None:
        return load_array(self.mask_path) if self.mask_path else None  # [1, X, Y, Z] uint8

    def damage(self) -> str | None:
        """Why the entry's arrays cannot be read back as meta.json describes them, or None when they can."""
        spatial = tuple(self.meta.get("shape", ()))
        for path in (self.image_path, self.mask_path):
            if path is None:
                continue
            shape, reason = npy_shape(path)
            if reason is None and shape[1:] != spatial:
                reason = f"shape {list(shape)}; meta.json says [C, {', '.join(map(str, spatial))}]"
            if reason is not None:
                return f"{path}: {reason}"
        return None

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "CacheEntry":
        directory = Path(directory)
        return cls(dir=directory, meta=json.loads((directory / "meta.json").read_text()))

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> "CacheEntry":
        """The entry holding `path`: its directory, or a file in it such as the index CSV's cache_image."""
        path = Path(path)
        return cls.open(path if path.is_dir() else path.parent)


def npy_shape(path: str | os.PathLike) -> tuple[tuple[int, ...] | None, str | None]:
    """(shape, None) for a complete .npy file, else (None, why not): its header read and its size checked
    against the header, without reading the data (numpy's own mmap only fails on first access or with a
    ValueError deep in np.load)."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(f)
            expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        size = os.path.getsize(path)
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError, EOFError) as e:  # no magic, a cut header, an unreadable file
        return None, f"unreadable .npy header ({first_line(e)})"
    if size != expected:
        return None, f"{size} bytes where its header needs {expected} (truncated or overwritten)"
    return tuple(shape), None


def load_array(path: str | os.PathLike) -> np.ndarray:
    """A cache array, memory-mapped; a damaged file is one line naming it and the way out."""
    shape, reason = npy_shape(path)
    if reason is None:
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            reason = first_line(e)
    raise InputError(f"{path}: damaged cache array ({reason}); run data.prepare (or the run) again with the same "
                     "--cache, which rebuilds a damaged entry, or delete its folder")


def lookup(cache_dir: str | os.PathLike, key: str) -> CacheEntry | None:
    """The complete, readable entry for `key`, or None: a directory without meta.json is not an entry, and
    one whose meta.json or arrays are damaged is a miss, so the caller builds it again (`write_entry`
    replaces the directory whole)."""
    d = entry_dir(cache_dir, key)
    if not (d / "meta.json").is_file():
        return None
    try:
        entry = CacheEntry.open(d)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(entry.meta, dict) or entry.damage() is not None:
        return None
    return entry


class _Built(Exception):
    """Another writer finished the same entry while this one was writing it."""


def write_entry(cache_dir: str | os.PathLike, key: str, image: np.ndarray, mask: np.ndarray | None,
                meta: dict) -> CacheEntry:
    """Write image [1,X,Y,Z] float32, optional mask [1,X,Y,Z] (stored uint8) and meta, all or nothing.

    Two writers of one key (two ranks or --shard jobs given the same files) build the same content: the
    one that finds the other's complete entry in place keeps it and drops its own, so a reader never sees
    the entry move. A damaged entry is replaced whole."""
    final = entry_dir(cache_dir, key)
    meta = {**meta, "key": key, "has_mask": mask is not None}
    try:
        with atomic_dir(final) as tmp:
            np.save(tmp / "image.npy", np.ascontiguousarray(image, dtype=np.float32))
            if mask is not None:
                np.save(tmp / "mask.npy", np.ascontiguousarray(mask > 0.5, dtype=np.uint8))
            # meta.json last: a reader treats its presence as "entry complete".
            write_json(tmp / "meta.json", meta)
            if lookup(cache_dir, key) is not None:
                raise _Built  # atomic_dir drops the temporary
    except _Built:
        pass
    except OSError:
        # The other writer's entry landed between that check and the move (the move finds the folder full).
        if lookup(cache_dir, key) is None:
            raise
    return CacheEntry(dir=final, meta=meta)
