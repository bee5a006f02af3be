"""Run directories: self-describing, written atomically, never overwritten.

A run lives in ``<output_dir>/<name>/`` and holds ``config.json``, ``env.json``,
``dataset.json``, ``history.csv``, ``similarity.npz``, ``metrics.json``,
``checkpoints/{last,best}.pt`` and ``figures/``. Every file is written to a temporary
name and moved into place, so an interruption leaves the previous version intact.
:func:`load_run` reads a finished or partial run back for notebooks.

This file does file handling only; what goes into the files is the engine's business.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch


# ---- atomic writes ----------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)     # mkstemp's 0600 would leave results readable by their owner only
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _jsonable(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if torch.is_tensor(obj):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def write_json(path, obj: Any) -> Path:
    """Atomic, pretty-printed JSON (numpy and torch scalars/arrays converted)."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_jsonable, allow_nan=True) + "\n").encode())


def read_json(path) -> Any:
    with open(path) as f:
        return json.load(f)


def write_csv(path, rows: list[dict]) -> Path:
    """Atomic CSV of ``rows``; the header is the union of keys in first-seen order."""
    header: list[str] = []
    for row in rows:
        header.extend(k for k in row if k not in header)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_bytes(path, buf.getvalue().encode())


def save_npz(path, **arrays) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def save_checkpoint(path, obj: dict) -> Path:
    """``torch.save`` atomically. Keep ``obj`` to tensors, numbers, strings, lists and dicts
    so it loads with ``torch.load(path, weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a fer_lab checkpoint safely (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def write_similarity(path, history: list[dict], sims: list[dict]) -> Path:
    """``similarity.npz``: per phase and term, ``(E, L, L)`` epoch-mean matrices (NaN-padded), with
    each epoch's stage, epoch and branch count from ``history``."""
    arrays = {"stage": np.array([r["stage"] for r in history]),
              "epoch": np.array([r["epoch"] for r in history]),
              "num_branches": np.array([r["num_branches"] or 0 for r in history])}
    keys = sorted({(ph, k) for e in sims for ph, d in e.items() for k in d})
    for ph, k in keys:
        mats = [np.asarray(e[ph][k]) if k in e[ph] else None for e in sims]
        L = max(m.shape[0] for m in mats if m is not None)
        stack = np.full((len(mats), L, L), np.nan, dtype=np.float32)
        for i, m in enumerate(mats):
            if m is not None:
                stack[i, :m.shape[0], :m.shape[1]] = m
        arrays[f"{ph}_S_{k}"] = stack
    return save_npz(path, **arrays)


# ---- environment ------------------------------------------------------------------------
def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """Current git commit of the fer_lab checkout (``+dirty`` when it has local changes), or None."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device | str | None = None) -> dict:
    """Versions, git commit, device and machine facts for ``env.json``."""
    import torchvision

    device = torch.device(device or "cpu")
    env = {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "git_commit": git_commit(),
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
    }
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
        env["cuda_version"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


# ---- run directories --------------------------------------------------------------------
class RunExistsError(FileExistsError):
    """A run directory already holds a run and neither resume nor a new name was asked for."""


@dataclass
class RunDir:
    """Paths of one run. ``create`` refuses to overwrite; ``open_existing`` is for resume."""

    path: Path

    @classmethod
    def create(cls, output_dir, name: str) -> "RunDir":
        path = Path(output_dir) / name
        if (path / "config.json").exists():
            raise RunExistsError(f"run {path} already exists; pass resume=True (--resume) to continue it "
                                 f"or choose another name")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        run.checkpoints.mkdir(exist_ok=True)
        run.figures.mkdir(exist_ok=True)
        return run

    @classmethod
    def open_existing(cls, output_dir, name: str) -> "RunDir":
        path = Path(output_dir) / name
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"cannot resume: {path} holds no run (no config.json)")
        return cls(path)

    config = property(lambda self: self.path / "config.json")
    env = property(lambda self: self.path / "env.json")
    dataset = property(lambda self: self.path / "dataset.json")
    history = property(lambda self: self.path / "history.csv")
    similarity = property(lambda self: self.path / "similarity.npz")
    metrics = property(lambda self: self.path / "metrics.json")
    predictions = property(lambda self: self.path / "test_predictions.npz")
    checkpoints = property(lambda self: self.path / "checkpoints")
    figures = property(lambda self: self.path / "figures")
    last = property(lambda self: self.path / "checkpoints" / "last.pt")
    best = property(lambda self: self.path / "checkpoints" / "best.pt")

    def stage_best(self, stage: int) -> Path:
        return self.checkpoints / f"best_stage{stage}.pt"


@dataclass
class Run:
    """A run read back from disk (see :func:`load_run`)."""

    path: Path
    config: dict
    history: "Any"          # pandas.DataFrame
    similarity: dict
    metrics: dict | None
    dataset: dict | None
    env: dict | None

    @property
    def finished(self) -> bool:
        return self.metrics is not None

    def checkpoint(self, which: str = "best") -> dict:
        return load_checkpoint(self.path / "checkpoints" / f"{which}.pt")

    def load_model(self, which: str = "best", map_location="cpu"):
        """The run's model with the weights of checkpoint ``which`` (``best`` or ``last``), in eval mode."""
        from .models import build_model_from_config

        ckpt = self.checkpoint(which)
        model = build_model_from_config(ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
        return model.to(map_location).eval()


    @property
    def train_config(self):
        """The run's :class:`~fer_lab.config.TrainConfig` (runs written before the config tree load too)."""
        from .config import TrainConfig

        return TrainConfig.from_dict(self.config["train"])

    def eval_dataset(self, split: str = "test", **options):
        """The run's ``split`` with the evaluation transform, built as training built it (same
        dataset, root, options, input size and label space; :func:`fer_lab.data.bundle.eval_dataset`):
        ``"test"`` the reported split (``dataset.json``'s roles: FER2013Valid for a FER+ copy
        without FER2013Test), ``"val"`` the model-selection split (the hold-out of train where the
        dataset lacks a split), ``"train"`` every training image. ``options`` add or override
        dataset options, e.g. ``return_masks=True`` for synthetic faces."""
        from .data.bundle import eval_dataset

        return eval_dataset(self.train_config, self.config["image_size"], self.config.get("label_space"), split, **options)


def load_run(path) -> Run:
    """Read a run directory (finished or interrupted) into a :class:`Run`."""
    import pandas as pd

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a fer_lab run directory (no config.json)")
    opt = lambda name: read_json(path / name) if (path / name).is_file() else None  # noqa: E731
    history = pd.read_csv(path / "history.csv") if (path / "history.csv").is_file() else pd.DataFrame()
    sim = dict(np.load(path / "similarity.npz")) if (path / "similarity.npz").is_file() else {}
    return Run(path, read_json(path / "config.json"), history, sim, opt("metrics.json"), opt("dataset.json"),
               opt("env.json"))
