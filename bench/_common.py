"""Shared helpers of the benchmarks: timing, machine facts, FLOP counts, result files.

Benchmarks measure; they do not assert. Each writes ``bench/results/<name>.json``
(atomically, with the machine, versions and date) and ``bench/run_all.py`` turns the
files into ``bench/RESULTS.md``.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fer_lab.runs import read_json, write_json  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    """Machine, versions and date for a results file."""
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "platform": platform.platform(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, reps: int = 5, warmup: int = 1, device="cpu") -> dict:
    """Run ``fn`` ``warmup`` times, then ``reps`` timed times; median and spread in seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": reps}


def matmul_gflops(n: int = 2048, reps: int = 5, device="cpu", dtype=torch.float32) -> float:
    """Dense matmul throughput (GFLOP/s) of an ``n x n`` float32 product: the machine's practical limit."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_time(lambda: a @ b, reps=reps, warmup=2, device=device)["median_s"]
    return 2 * n ** 3 / t / 1e9


def count_flops(model, x, backward: bool = False) -> float:
    """FLOPs (2 x multiply-accumulate) of one forward (and backward) pass, by
    ``torch.utils.flop_counter`` (convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if backward:
            out.logits.float().sum().backward()
    return float(counter.get_total_flops())


def save(name: str, results: dict) -> Path:
    """Write ``bench/results/<name>.json`` atomically (results plus machine facts)."""
    path = RESULTS / f"{name}.json"
    write_json(path, {"benchmark": name, "machine": machine(), **results})
    return path


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return read_json(path) if path.is_file() else None
