"""Seeding and device selection shared by the engine, the CLI and the notebooks."""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import random
import sys

import numpy as np
import torch


def derive_seed(*keys) -> int:
    """A 63-bit seed derived from ``keys`` (e.g. ``(run_seed, "epoch", stage, epoch)``).

    The engine reseeds from ``(seed, stage, epoch)`` at every epoch, so an interrupted and
    resumed run draws exactly the random numbers an uninterrupted one does.
    """
    digest = hashlib.sha256(repr(tuple(keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """PyTorch's deterministic mode (and the cuBLAS workspace setting it needs on CUDA)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled and torch.cuda.is_available()


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """Context manager: :func:`set_deterministic` inside, the previous settings restored after."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    set_deterministic(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


def flushing_denormals() -> bool:
    """Whether CPU float arithmetic flushes denormals to zero now (``torch.set_flush_denormal``
    has no getter: a product whose exact result is a float32 denormal comes out as 0)."""
    return float(torch.tensor(2.0 ** -70) * torch.tensor(2.0 ** -70)) == 0.0


@contextlib.contextmanager
def flush_denormal():
    """Context manager: CPU denormal floats flushed to zero inside, the previous setting after.

    A saturated diversity term (S = I) back-propagates through ``exp`` of huge negative
    numbers; its denormal intermediates make the backward pass many times slower on a CPU
    (``bench/RESULTS.md``).
    """
    before = flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def batches(loader):
    """Iterate ``loader``, assembling each batch with one intra-op thread when the loader works
    in this process (``num_workers == 0``), then restoring the thread count for the model.

    A training transform is dozens of tiny tensor ops per face. On an idle machine the thread
    count makes no difference to them, but when another process shares the cores (a second
    notebook, a test run beside a batch), every one of those ops waits for OpenMP threads that
    are descheduled, and loading a face costs several times its single-threaded price
    (``bench/input_pipeline.py``, entry ``threads``, idle and busy). The switch happens once per
    batch: once per item it costs more than it saves.
    """
    if getattr(loader, "num_workers", 0) > 0:
        yield from loader
        return
    it = iter(loader)
    threads = torch.get_num_threads()
    while True:
        torch.set_num_threads(1)
        try:
            batch = next(it)
        except StopIteration:
            return
        finally:
            torch.set_num_threads(threads)
        yield batch


class Registry(dict):
    """Named entries of one kind (models, datasets): ``add`` refuses a second entry of a name,
    ``get`` names the known ones when asked for an unknown one."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, name: str, entry) -> None:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = entry

    def get(self, name: str):
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}")
        return self[name]

    def names(self) -> list[str]:
        return sorted(self)


def offdiag(M) -> np.ndarray:
    """The off-diagonal entries of a square matrix, flattened."""
    M = np.asarray(M)
    return M[~np.eye(M.shape[0], dtype=bool)]


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is checked and returned."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was asked for but CUDA is not available; use 'cpu' or 'auto'")
    return device


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for reuse (Linux only).

    By default glibc gives every block above 32 MiB its own ``mmap`` and unmaps it when it
    is freed, so each large activation of a training step arrives as fresh pages that fault
    in one by one. Here ``mmap`` is not used for blocks and the heap is not trimmed, so the
    next step reuses pages already mapped: faster steps, higher peak resident memory that
    stays with the process until it exits (``bench/train_step.py``, variant ``glibc``; the
    numbers are in ``bench/RESULTS.md``). Results are unchanged. Process-wide and not undone,
    so the library never calls it on its own: ``TrainConfig.keep_freed_memory`` (on from the
    command line and the demo). Returns whether it was applied (``False`` on other platforms
    or C libraries).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):     # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
