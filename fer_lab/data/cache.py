"""Decoded-image caches shared by every file-based loader.

After one pass over a split, its faces live in a single uint8 array, ``(N, H, W)``
(grayscale) or ``(N, H, W, 3)`` (RGB): in memory, or as a memory-mapped ``.npy`` under
a cache directory (default ``outputs/cache/``) so later runs and DataLoader workers
read pixels instead of decoding JPEG/PNG files or parsing CSV pixel strings. A cache
file is named after a sha256 of everything that determines its content (dataset,
root, split, image size, colour mode, pixel options, item list or source-file
signature) and is written atomically: a temporary file in the same directory is
filled, flushed and moved into place with ``os.replace``; a sidecar ``.json`` holds
the parameters and the items that failed to decode.

This file holds the mechanism only; which items a dataset has and how one is decoded
is the loader's business. (The synthetic dataset keeps its own renderer cache.)
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..runs import atomic_write_bytes
from .errors import DatasetError

logger = logging.getLogger(__name__)

#: Bumped when the cache layout or decoding changes; part of every key.
CACHE_VERSION = 1


def file_signature(path: str | os.PathLike) -> dict[str, Any]:
    """``{"path", "size", "mtime_ns"}`` of a source file (a cache key ingredient)."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 hex of an ordered list of item ids (a cache key ingredient)."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_key(params: dict[str, Any]) -> str:
    """sha256 hex of the JSON of ``params`` (sorted keys) plus :data:`CACHE_VERSION`."""
    blob = json.dumps({"cache_version": CACHE_VERSION, **params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(directory: str | os.PathLike, dataset: str, split: str, params: dict[str, Any]) -> Path:
    """``<directory>/<dataset>-<split>-<key[:20]>.npy`` for the given key parameters."""
    return Path(directory) / f"{dataset}-{split}-{cache_key(params)[:20]}.npy"


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def open_cache(path: str | os.PathLike, params: dict[str, Any], n: int | None = None):
    """Open a finished cache read-only: ``(images memmap, meta dict)`` or ``None``.

    ``None`` when the file or its sidecar is missing, unreadable, or was written for
    other parameters or another item count ``n``.
    """
    path = Path(path)
    meta_file = _meta_path(path)
    if not (path.exists() and meta_file.exists()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        logger.warning("image cache %s is unreadable (%s); rebuilding it", path, err)
        return None
    if (meta.get("key") != cache_key(params) or arr.dtype != np.uint8 or list(arr.shape) != meta.get("shape")
            or (n is not None and arr.shape[0] != n)):
        logger.warning("image cache %s does not match its parameters; rebuilding it", path)
        return None
    return arr, meta


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, default=str).encode())


def _fill(tmp: str, indices: Sequence[int], decode: Callable[[int], np.ndarray]) -> dict[int, str]:
    """Decode ``indices`` into the memmap at ``tmp``; returns ``{index: reason}`` of failures."""
    out = np.load(tmp, mmap_mode="r+")
    failures: dict[int, str] = {}
    for i in indices:
        try:
            img = decode(int(i))
            if img.shape != out.shape[1:]:
                raise DatasetError(f"item {i}: decoded shape {img.shape} differs from the cache's "
                                   f"{out.shape[1:]}; pass image_size=... to resize")
            out[i] = img
        except DatasetError as err:
            failures[int(i)] = str(err)
            out[i] = 0
    out.flush()
    del out
    return failures


_FORK_DECODE: Callable[[int], np.ndarray] | None = None


def _fill_forked(tmp: str, indices: Sequence[int]) -> dict[int, str]:
    return _fill(tmp, indices, _FORK_DECODE)


def write_cache(path: str | os.PathLike, params: dict[str, Any], shape: tuple[int, ...],
                decode: Callable[[int], np.ndarray] | None = None, *, images: np.ndarray | None = None,
                failures: dict[int, str] | None = None, workers: int = 0,
                info: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
    """Write a cache of ``shape[0]`` images atomically and return ``(memmap, meta)``.

    Either ``images`` (an already decoded uint8 array of ``shape``) is saved, or each
    index ``i`` is filled with ``decode(i)`` (a uint8 array of ``shape[1:]``); a
    ``DatasetError`` from ``decode`` marks the item failed (zeros stored, reason kept in
    ``meta["failures"]``, keys as strings). ``workers > 1`` decodes in that many
    forked processes (``decode`` is inherited, not pickled; serial where fork is unavailable).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    t0 = time.perf_counter()
    fails: dict[int, str] = dict(failures or {})
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=tuple(shape))
        if images is not None:
            if images.shape != tuple(shape) or images.dtype != np.uint8:
                raise ValueError(f"images: expected uint8 {tuple(shape)}, got {images.dtype} {images.shape}")
            out[...] = images
            out.flush()
            del out
        else:
            out.flush()
            del out
            n = int(shape[0])
            if workers and workers > 1 and n > 256 and "fork" in mp.get_all_start_methods():
                step = max(64, min(2048, -(-n // (4 * int(workers)))))
                chunks = [list(range(s, min(n, s + step))) for s in range(0, n, step)]
                global _FORK_DECODE
                _FORK_DECODE = decode  # inherited by the forked workers; never pickled
                try:
                    with ProcessPoolExecutor(max_workers=int(workers), mp_context=mp.get_context("fork")) as pool:
                        for f in pool.map(_fill_forked, [tmp] * len(chunks), chunks):
                            fails.update(f)
                finally:
                    _FORK_DECODE = None
            else:
                fails.update(_fill(tmp, range(n), decode))
        os.chmod(tmp, 0o644)
        meta = {"key": cache_key(params), "params": params, "shape": list(shape),
                "failures": {str(k): v for k, v in sorted(fails.items())},
                "seconds": round(time.perf_counter() - t0, 3), **(info or {})}
        _atomic_json(_meta_path(path), meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    logger.info("cached %d images %s into %s in %.1f s (%d failed)", shape[0], tuple(shape[1:]), path,
                meta["seconds"], len(fails))
    return np.load(path, mmap_mode="r"), meta


def unpack_once(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a ``.tar(.gz)`` archive into ``dest`` once and return ``dest``.

    A marker ``dest/.unpacked`` records the archive's size and mtime; when it matches,
    nothing is done. Otherwise the archive is extracted into a temporary sibling
    directory which then replaces ``dest`` (``os.replace``), so an interrupted unpack
    never leaves a half-filled ``dest``. Raises ``FileNotFoundError`` when the archive
    is missing.
    """
    import shutil
    import tarfile

    archive, dest = Path(archive), Path(dest)
    st = archive.stat()
    stamp = f"{archive.resolve()} {st.st_size} {st.st_mtime_ns}\n"
    marker = dest / ".unpacked"
    if marker.is_file() and marker.read_text() == stamp:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    t0 = time.perf_counter()
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (tmp / ".unpacked").write_text(stamp)
        os.chmod(tmp, 0o755)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("unpacked %s into %s in %.1f s", archive, dest, time.perf_counter() - t0)
    return dest
