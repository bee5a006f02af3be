"""Inference: batch-1 latency and batch-64 throughput of ESR-9, ESR*-9 and MA-Net (eval mode).

ESR at 96 px, MA-Net at 224 px, channels-last, float32, no gradients; FLOP rate against
the machine's dense matmul throughput. The published diversified ESR implementation ran
at 5.24 evaluations/s against plain ESR's 22.23 (SPEC / issue 6).

    python bench/inference.py [--reps 10]
"""
from __future__ import annotations

import argparse

import _common as C
import torch

from fer_lab.models import build_model

MODELS = {"esr9": 96, "esr9_div": 96, "manet": 224, "manet_div": 224}


@torch.no_grad()
def measure(name: str, size: int, reps: int, device) -> dict:
    torch.manual_seed(0)
    model = build_model(name).to(device).eval().to(memory_format=torch.channels_last)
    flops = C.count_flops(model, torch.rand(1, 3, size, size, device=device))
    row = {"model": name, "input": size, "gflops_per_image": flops / 1e9}
    for batch in (1, 64):
        x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        t = C.median_time(lambda: model(x), reps=reps if batch == 1 else max(3, reps // 3), warmup=2, device=device)
        key = "latency_b1_ms" if batch == 1 else "throughput_b64_img_s"
        row[key] = t["median_s"] * 1e3 if batch == 1 else batch / t["median_s"]
        if batch == 64:
            row["gflops_per_s_b64"] = flops * batch / t["median_s"] / 1e9
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default=None, help="results file name (default inference[_cuda])")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    peak = C.matmul_gflops(device=args.device)
    rows = []
    for name, size in MODELS.items():
        row = measure(name, size, args.reps, args.device)
        row["fraction_of_matmul_peak_b64"] = row["gflops_per_s_b64"] / peak
        rows.append(row)
        print(f"{name:10s} {size} px: {row['latency_b1_ms']:7.1f} ms at batch 1, "
              f"{row['throughput_b64_img_s']:7.1f} img/s at batch 64", flush=True)
    result = {"what": "eval-mode forward, channels-last, float32, no grad", "device": args.device,
              "matmul_gflops": peak, "rows": rows}
    C.save(args.name or ("inference" if args.device == "cpu" else "inference_cuda"), result)
    return result


if __name__ == "__main__":
    main()
