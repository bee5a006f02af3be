"""Is data loading the bottleneck? Input-pipeline images/s vs training-step images/s.

Measures, on this machine, how many images per second the input pipeline delivers
with ESR's training transforms (``esr_train`` at 96 px: grayscale -> RGB, resize,
ColorJitter, flip, RandomAffine) when faces are decoded from PNG files and when they
are read from the uint8 memory-mapped cache, each through a DataLoader with 0 and 2
worker processes (batch 32, shuffled). It compares that with the training step
(forward + backward + SGD step, batch 32, 96 px) of a small ESR* (4 branches,
quarter width) and of the full-size ESR*-9. Uses the real FER+ training images when
``../shared/data/ferplus/ferplus_train_valid.tar.gz`` exists (unpacked once into
``outputs/cache/ferplus_shared/``), else synthetic faces written as 48 px PNGs in the
FER+ folder layout. Writes ``bench/results/input_pipeline.json`` atomically (machine,
versions, date, load average: the machine may be shared, so numbers are indicative).

Run: ``.venv/bin/python bench/input_pipeline.py`` (about 2 minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fer_lab.data import build_dataset, build_transform  # noqa: E402
from fer_lab.data.transforms import batch_transform  # noqa: E402
from fer_lab.data.cache import unpack_once  # noqa: E402
from fer_lab.models import build_model, count_parameters  # noqa: E402
from fer_lab.runs import write_json  # noqa: E402
from fer_lab.utils import batches  # noqa: E402

SHARED = Path(os.environ.get("FER_LAB_SHARED_DATA", ROOT.parent / "shared" / "data"))
ARCHIVE = SHARED / "ferplus" / "ferplus_train_valid.tar.gz"
CACHE = ROOT / "outputs" / "cache"


def data_root(n_synthetic: int, tmp: Path) -> tuple[Path, str]:
    """The FER+ folder layout to read: the real archive unpacked, or synthetic PNGs."""
    if ARCHIVE.is_file():
        return unpack_once(ARCHIVE, CACHE / "ferplus_shared"), f"FER+ (real, {ARCHIVE.name})"
    from fer_lab.data.synthetic import SyntheticFaces
    from PIL import Image

    faces = SyntheticFaces(split="train", size=48, grayscale=True, num_samples=n_synthetic)
    d = tmp / "FER2013Train"
    d.mkdir(parents=True)
    with open(d / "label.csv", "w", newline="") as f:
        w = csv.writer(f)
        for i in range(len(faces)):
            name = f"fer{i:07d}.png"
            Image.fromarray(faces.load_image(i)).save(d / name)
            votes = [0] * 10
            votes[int(faces.native_targets[i])] = 10   # AffectNet order; only the rate matters here
            w.writerow([name, "(0, 0, 48, 48)"] + votes)
    return tmp, "synthetic faces written as 48 px PNGs (no real data found)"


#: a competing process: one thread of matrix products until killed
BUSY = "import torch; torch.set_num_threads(1); a = torch.randn(256, 256)\nwhile True: a @ a"


def pipeline_rate(ds, n: int, workers: int, batch: int = 32, seed: int = 0, one_thread: bool = False,
                  augment=None) -> float:
    """Images/s through a shuffled DataLoader over ``n`` random items of ``ds`` (after one warm batch);
    ``one_thread``: through :func:`fer_lab.utils.batches` (one intra-op thread while a batch is built)."""
    idx = np.random.default_rng(seed).choice(len(ds), size=n + batch, replace=False)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(Subset(ds, idx), batch_size=batch, shuffle=True, generator=g, num_workers=workers,
                        drop_last=True, persistent_workers=False)
    it = batches(loader) if one_thread else iter(loader)
    next(it)  # worker start-up and first batch excluded
    t0 = time.perf_counter()
    seen = 0
    for x, _ in it:
        if augment is not None:
            x = augment(x)
        seen += x.shape[0]
    dt_ = time.perf_counter() - t0
    del it
    return seen / dt_


def decode_rate(ds, n: int) -> float:
    """Images/s of ``load_image`` alone (no transform), one process."""
    idx = np.random.default_rng(1).choice(len(ds), size=n, replace=False)
    t0 = time.perf_counter()
    for i in idx:
        ds.load_image(int(i))
    return n / (time.perf_counter() - t0)


def train_rate(name: str, steps: int, batch: int = 32, size: int = 96, **options) -> dict:
    """Training-step images/s of model ``name``: SGD on random 96 px batches (one warm-up step)."""
    torch.manual_seed(0)
    model = build_model(name, **options)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, 8, (batch,))
    times = []
    for s in range(steps + 1):
        t0 = time.perf_counter()
        out = model(x)
        lo = model.loss(out, y)
        opt.zero_grad(set_to_none=True)
        lo.total.backward()
        opt.step()
        if s > 0:
            times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    return {"model": name, "options": options, "parameters": count_parameters(model), "batch": batch,
            "input_px": size, "steps_timed": steps, "step_s_median": step, "images_per_s": batch / step}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1024, help="images timed per pipeline configuration")
    p.add_argument("--full-steps", type=int, default=2, help="timed training steps of the full-size ESR*-9")
    p.add_argument("--small-steps", type=int, default=8, help="timed training steps of the small ESR*")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for training steps")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "input_pipeline.json")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmpd:
        root, source = data_root(args.images + 64, Path(tmpd))
        cache_dir = CACHE if ARCHIVE.is_file() else Path(tmpd) / "cache"
        tf = build_transform("esr_train", 96)
        torch.set_num_threads(1)  # the pipeline runs one image at a time; workers get 1 thread each
        png = build_dataset("ferplus", root=root, split="train", transform=tf)
        t0 = time.perf_counter()
        cached = build_dataset("ferplus", root=root, split="train", transform=tf, cache=cache_dir)
        cache_open_s = time.perf_counter() - t0
        n = min(args.images, len(png) - 64)
        results = {"decode_only_images_per_s": {"png": decode_rate(png, n), "cache": decode_rate(cached, n)},
                   "pipeline": []}
        for src, ds in (("png", png), ("cache", cached)):
            for workers in (0, 2):
                rate = pipeline_rate(ds, n, workers)
                results["pipeline"].append({"source": src, "workers": workers, "images_per_s": rate})
                print(f"pipeline {src:5s} workers={workers}: {rate:7.0f} images/s", flush=True)
        # the engine's loading in the training process: light_train at 48 px (ferplus_cpu), batch 128,
        # with the training's thread count as is, and through fer_lab.utils.batches (1 thread per batch)
        torch.set_num_threads(args.threads)
        light = build_dataset("ferplus", root=root, split="train", transform=build_transform("light_train", 48),
                              cache=cache_dir)
        results["threads"] = {"transform": "light_train at 48 px", "batch": 128, "workers": 0,
                              "torch_threads": args.threads}
        # ... on an idle machine and beside one busy single-threaded process (a notebook, a test run)
        for load in ("idle", "busy"):
            busy = subprocess.Popen([sys.executable, "-c", BUSY]) if load == "busy" else None
            try:
                for key, one in (("training_threads", False), ("one_thread", True)):
                    rate = pipeline_rate(light, n, 0, batch=128, one_thread=one)
                    results["threads"][f"images_per_s_{load}_{key}"] = rate
                    print(f"pipeline light_train 48 px, {load} machine, {key}: {rate:7.0f} images/s", flush=True)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
        # per-face light_train against light_batch (eval per face + one BatchAffine per batch), batch 128
        aug = batch_transform("light_batch")
        per_batch = build_dataset("ferplus", root=root, split="train", transform=build_transform("light_batch", 48),
                                  cache=cache_dir)
        results["batch_augment"] = {
            "transform": "48 px, batch 128, 0 workers, training threads",
            "light_train_images_per_s": pipeline_rate(light, n, 0, batch=128, one_thread=True),
            "light_batch_images_per_s": pipeline_rate(per_batch, n, 0, batch=128, one_thread=True, augment=aug)}
        print(f"pipeline light_train {results['batch_augment']['light_train_images_per_s']:7.0f} images/s, "
              f"light_batch {results['batch_augment']['light_batch_images_per_s']:7.0f} images/s", flush=True)
        torch.set_num_threads(1)
        results["cache_file"] = str(Path(os.path.relpath(cached.cache_file, ROOT)))
        results["cache_build_or_open_s"] = cache_open_s

    torch.set_num_threads(args.threads)
    small = train_rate("esr9_div", args.small_steps, num_branches=4, width=0.25)
    print(f"train step ESR*-4 width 0.25: {small['images_per_s']:.0f} images/s", flush=True)
    full = train_rate("esr9_div", args.full_steps)
    print(f"train step ESR*-9 full size:  {full['images_per_s']:.1f} images/s", flush=True)
    best = max(r["images_per_s"] for r in results["pipeline"])
    png0 = next(r["images_per_s"] for r in results["pipeline"] if r["source"] == "png" and r["workers"] == 0)
    cache0 = next(r["images_per_s"] for r in results["pipeline"] if r["source"] == "cache" and r["workers"] == 0)

    import torchvision
    out = {
        "benchmark": "input_pipeline",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "numpy": np.__version__,
                    "load_average_1_5_15": list(os.getloadavg()), "device": "cpu"},
        "data": {"source": source, "split": "train", "items": len(png), "images_timed": n,
                 "stored_px": list(cached.load_image(0).shape), "transform": "esr_train at 96 px",
                 "batch": 32},
        **results,
        "training_threads": args.threads,
        "pipeline_threads": 1,
        "training": {"esr4_div_width0.25": small, "esr9_div_full": full},
        "ratios": {
            "best_pipeline_over_small_esr_step": best / small["images_per_s"],
            "png_0_workers_over_small_esr_step": png0 / small["images_per_s"],
            "cache_0_workers_over_small_esr_step": cache0 / small["images_per_s"],
            "png_0_workers_over_full_esr9_step": png0 / full["images_per_s"],
        },
        "seconds": time.perf_counter() - t_start,
    }
    write_json(args.out, out)
    print(f"wrote {args.out} ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
