"""The CUDA benchmarks: diversity term, training step (batch 256, AMP) and inference, in a few minutes.

Run on a machine with a GPU (``python bench/gpu.py``); writes ``bench/results/gpu.json``
(and ``diversity_speed_cuda.json``), after every measured row (a run cut short keeps what it
measured). Training step variants per model: float32 NCHW (``fp32``), bf16 autocast
(``amp``), bf16 + channels-last (``amp_cl``, fer_lab's GPU recommendation) and, with
``--compile``, the same under ``torch.compile`` (``amp_cl_compile``). For the CBAM models
``amp_cl`` runs with each CBAM training path (``fer_lab.models.cbam.cbam_path``: the
hand-written autograd node and the plain formulas); ``cbam_choice`` says which is faster and
how ESR*-9 compares with ESR-9 on each path (the target: at most 1.3x ESR-9's step time).

    python bench/gpu.py [--batch 256] [--reps 10] [--compile]
    python bench/gpu.py --dry-run      # every step on the CPU, tiny, nothing saved
"""
from __future__ import annotations

import argparse
import json
import time

import _common as C
import torch

import diversity_speed
import inference
from fer_lab.models import build_model
from fer_lab.models.cbam import cbam_path


def train_step(name: str, batch: int, reps: int, amp: bool, cl: bool, compile_: bool,
               device: str = "cuda", path: str = "auto") -> dict:
    with cbam_path(path):
        return _train_step(name, batch, reps, amp, cl, compile_, device)


def _train_step(name: str, batch: int, reps: int, amp: bool, cl: bool, compile_: bool, device: str) -> dict:
    torch.manual_seed(0)
    model = build_model(name).to(device)
    x = torch.rand(batch, 3, 96, 96, device=device)
    y = torch.randint(0, 8, (batch,), device=device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            lo = model.loss(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        lo.total.backward()
        opt.step()

    cuda = device == "cuda"
    t0 = time.perf_counter()
    step()
    C.sync(device)
    first = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = C.median_time(step, reps=reps, warmup=2, device=device)
    return {"model": name, "batch": batch, "step_s": t["median_s"], "images_per_s": batch / t["median_s"],
            "first_step_s": first, "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--dry-run", action="store_true",
                    help="run every step on the CPU at batch 2, one repetition, saving nothing: checks the "
                         "script itself on a machine without a GPU")
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        args.batch, args.reps = 2, 1
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device (--dry-run checks the script on a CPU)")
    torch.backends.cudnn.benchmark = True
    reps = "1" if args.dry_run else "50"
    peak_bf16 = C.matmul_gflops(512 if args.dry_run else 8192, device=device, dtype=torch.bfloat16)
    div = diversity_speed.main(["--device", device, "--reps", reps, "--name", "gpu_dry_run_diversity"])
    rows: list[dict] = []
    result = {"what": f"CUDA, batch {args.batch}, bf16 autocast where noted", "matmul_bf16_gflops": peak_bf16,
              "train_rows": rows, "diversity": div["rows"]}

    def record(row):
        rows.append(row)
        print(f"{row['model']:9s} {row['variant']:15s} {row['images_per_s']:8.0f} img/s  "
              f"{row['peak_cuda_mib'] or 0:7.0f} MiB  first step {row['first_step_s']:.1f} s", flush=True)
        if not args.dry_run:
            C.save("gpu", result)

    variants = [("fp32", False, False, False), ("amp", True, False, False), ("amp_cl", True, True, False)]
    for name in ("esr9", "esr9_att", "esr9_div"):
        for label, amp, cl, comp in variants:
            paths = ("node", "plain") if name != "esr9" and label == "amp_cl" else ("auto",)
            for path in paths:
                tag = label if path == "auto" else f"{label}_{path}"
                record({"variant": tag, "cbam_path": path,
                        **train_step(name, args.batch, args.reps, amp, cl, comp, device, path)})
    step = {(r["model"], r["variant"]): r["step_s"] for r in rows}
    choice = {p: step[("esr9_div", f"amp_cl_{p}")] / step[("esr9", "amp_cl")] for p in ("node", "plain")}
    result["cbam_choice"] = {"esr9_div_over_esr9_amp_cl": choice, "faster": min(choice, key=choice.get)}
    inf = inference.main(["--device", device, "--reps", reps, "--name", "gpu_dry_run_inference"])
    result["inference"] = inf["rows"]
    if args.compile:
        for name in ("esr9", "esr9_div"):
            record({"variant": "amp_cl_compile", "cbam_path": "compiled",
                    **train_step(name, args.batch, args.reps, True, True, True, device)})
        step = {(r["model"], r["variant"]): r["step_s"] for r in rows}
        result["cbam_choice"]["esr9_div_over_esr9_compiled"] = \
            step[("esr9_div", "amp_cl_compile")] / step[("esr9", "amp_cl_compile")]
    best = {n: max((r for r in rows if r["model"] == n), key=lambda r: r["images_per_s"]) for n in ("esr9", "esr9_div")}
    result["esr9_div_over_esr9_best_step_time"] = best["esr9"]["images_per_s"] / best["esr9_div"]["images_per_s"]
    if args.dry_run:
        for name in ("gpu_dry_run_diversity", "gpu_dry_run_inference"):
            (C.RESULTS / f"{name}.json").unlink(missing_ok=True)
        print("dry run: every step ran; nothing saved")
    else:
        C.save("gpu", result)
    print(json.dumps({k: result[k] for k in ("cbam_choice", "esr9_div_over_esr9_best_step_time")}, indent=1))
    return result


if __name__ == "__main__":
    main()
