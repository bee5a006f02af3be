"""Training step of ESR-9, ESR-9 + CBAM and ESR*-9 (96 px, batch 32, SGD): speed, memory, FLOP rate.

Each configuration runs in its own process so its peak resident memory is its own. A step
is what the engine does per batch: forward, loss (CE of every branch minus the diversity
terms), backward, SGD update. Variants: ``default`` (fer_lab's training defaults:
channels-last, float32, branches in a loop), ``nchw``, ``bf16`` (CPU autocast), ``compile``
(``torch.compile``, inductor; its compile time reported separately), ``fused`` (the
fused branch execution, when the model offers it) and ``glibc`` (the defaults, but glibc's
allocator left as it is: every variant but this one runs, like fer_lab's training, after
:func:`fer_lab.utils.keep_freed_memory`).
FLOPs come from PyTorch's FLOP counter and are related to the machine's dense matmul
throughput (bf16 rows to its bf16 matmul throughput). Then the target's ratio is measured
again side by side (:func:`paired`: the three models' default steps alternated in one
process), which a shared machine's drift cannot bias.

    python bench/train_step.py [--models esr9 esr9_att esr9_div] [--variants default nchw bf16 compile fused glibc]
    python bench/train_step.py --small-widths      # 48 px ESR-4 at widths 0.25 and 0.5 (the ferplus_cpu shape)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import statistics
import time

import _common as C
import torch

from fer_lab.models import build_model
from fer_lab.utils import keep_freed_memory

MODELS = ("esr9", "esr9_att", "esr9_div")
VARIANTS = ("default", "nchw", "bf16", "compile", "fused", "glibc")


def one(model_name: str, variant: str, batch: int, reps: int, size: int = 96) -> dict:
    """Measure one configuration in this process."""
    if variant != "glibc":
        keep_freed_memory()
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(model_name, input_size=size)
    if variant == "fused":
        if not hasattr(model, "branch_execution"):
            return {"skipped": "this fer_lab has no fused branch execution"}
        model.branch_execution = "fused"
    model = model.to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.randint(0, 8, (batch,), device=device)
    if variant != "nchw":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    flops = C.count_flops(model, x[:1], backward=True) * batch
    model.zero_grad(set_to_none=True)
    forward = model
    compile_s = None
    if variant == "compile":
        forward = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=variant == "bf16")

    def step():
        with autocast:
            out = forward(x)
            lo = model.loss(out, y)
        opt.zero_grad(set_to_none=True)
        lo.total.backward()
        opt.step()
        return lo

    if variant == "compile":
        t0 = time.perf_counter()
        step()
        compile_s = time.perf_counter() - t0
    t = C.median_time(step, reps=reps, warmup=1, device=device)
    # numerics: the loss of the same weights and batch against NCHW, float32, eager, loop
    torch.manual_seed(0)
    ref = build_model(model_name, input_size=size).to(device)
    with torch.no_grad():
        ref_loss = float(ref.loss(ref(x.contiguous()), y).total)
    torch.manual_seed(0)
    fresh = build_model(model_name, input_size=size).to(device)
    if variant == "fused":
        fresh.branch_execution = "fused"
    if variant != "nchw":
        fresh = fresh.to(memory_format=torch.channels_last)
    fwd = torch.compile(fresh) if variant == "compile" else fresh
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=variant == "bf16"):
        var_loss = float(fresh.loss(fwd(x), y).total)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    row = {"model": model_name, "variant": variant, "batch": batch, "step_s": t["median_s"],
           "step_min_s": t["min_s"], "images_per_s": batch / t["median_s"], "flops_per_step": flops,
           "gflops_per_s": flops / t["median_s"] / 1e9, "peak_rss_mib": peak, "reps": reps}
    if device == "cuda":
        row["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    if compile_s is not None:
        row["compile_s"] = compile_s
    row["loss_abs_diff_vs_nchw_fp32_eager"] = abs(var_loss - ref_loss)
    return row


def paired(models: tuple, batch: int, reps: int, size: int = 96, options: dict | None = None,
           amp: str = "none", path: str = "auto") -> dict:
    """The target's ratio measured side by side: every model built in this one process with
    fer_lab's training defaults (channels-last, :func:`fer_lab.utils.keep_freed_memory`),
    their steps alternated (``A B A B ...``), the ratio taken within each round. On a shared
    machine whose speed drifts by 10-15 % over minutes, separate runs minutes apart can move
    a ratio by that much; alternating steps cancels the drift. ``models``: registered names,
    or ``(label, name, build options)`` triples; ratios are to the first. ``options``: build
    options for every model (e.g. ``width``); ``amp``: ``none`` or ``bf16`` (CPU autocast);
    ``path``: the CBAMs' training path (:func:`fer_lab.models.cbam.cbam_path`)."""
    import contextlib

    from fer_lab.models.cbam import cbam_path

    keep_freed_memory()
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 8, (batch,))
    steps = {}
    specs = [m if isinstance(m, tuple) else (m, m, {}) for m in models]
    models = [label for label, _, _ in specs]
    for name, registered, own in specs:
        model = build_model(registered, input_size=size, **{**(options or {}), **own}).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt):
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
            with cbam_path(path), autocast:
                lo = model.loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            lo.total.backward()
            opt.step()
        step()   # warm-up
        steps[name] = step
    times = {name: [] for name in models}
    for _ in range(reps):
        for name in models:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    first = models[0]
    return {"what": f"steps alternated in one process, {reps} rounds after a warm-up; ratios within each round",
            "step_s": {m: statistics.median(t) for m, t in times.items()},
            "times_s": times,
            "ratio_median": {m: statistics.median(a / b for a, b in zip(times[m], times[first]))
                             for m in models[1:]},
            "ratio_max": {m: max(a / b for a, b in zip(times[m], times[first])) for m in models[1:]}}


#: the ``ferplus_cpu`` protocol's shape: ESR-4 at 48 px, batch 128, CBAM reduction 4 (uniform init)
SMALL = dict(size=48, batch=128, options={"num_branches": 4, "cbam_reduction": 4, "cbam_init": "uniform"})


def small_widths(reps: int, widths=(0.25, 0.5)) -> dict:
    """ESR*-4 / ESR-4 (and ESR-4 + CBAM / ESR-4) step-time ratios at small widths, where CBAM's
    memory-bound passes weigh most against the convolutions: per width, float32 and bf16
    autocast, CBAM's hand-written node and the plain formulas; each a :func:`paired` run."""
    rows = []
    for width in widths:
        for amp in ("none", "bf16"):
            for path in ("node", "plain"):
                r = paired(MODELS, SMALL["batch"], reps, SMALL["size"], {**SMALL["options"], "width": width}, amp, path)
                rows.append({"width": width, "amp": amp, "cbam_path": path, "step_s": r["step_s"],
                             "ratio_median": r["ratio_median"], "ratio_max": r["ratio_max"]})
                print(f"width {width} {amp:4s} {path:5s}", {m: round(v, 3) for m, v in r["step_s"].items()},
                      {m: round(v, 2) for m, v in r["ratio_median"].items()}, flush=True)
    return {"what": f"48 px, ESR-4 (4 branches), batch 128, SGD, channels-last; {reps} alternated rounds per row",
            "target": {"esr9_div_over_esr9": 1.3}, "rows": rows}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--merge", action="store_true",
                    help="replace only the measured rows of an existing train_step.json (re-measure a few)")
    ap.add_argument("--paired-reps", type=int, default=8,
                    help="rounds of the side-by-side ESR-9 / ESR-9 + CBAM / ESR*-9 measurement (0: skip it)")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    ap.add_argument("--paired-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--small-widths", action="store_true",
                    help="only the small-width rows (48 px, ESR-4, widths 0.25 and 0.5): bench/results/train_step_small_widths.json")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one, args.batch, args.reps)))
        return {}
    if args.paired_only:
        print(json.dumps(paired(MODELS, args.batch, args.paired_reps)))
        return {}
    if args.small_widths:
        result = small_widths(max(3, args.paired_reps // 2))
        C.save("train_step_small_widths", result)
        return result
    peak = C.matmul_gflops()
    peak_bf16 = C.matmul_gflops(dtype=torch.bfloat16)
    rows = []
    for m in args.models:
        for v in args.variants:
            if v not in ("default", "nchw") and m == "esr9_att":
                continue   # fast paths are compared on ESR-9 and ESR*-9; layouts on every model
            proc = subprocess.run([sys.executable, __file__, "--one", m, v, "--batch", str(args.batch),
                                   "--reps", str(args.reps)], capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"model": m, "variant": v, "error": proc.stderr.strip().splitlines()[-1:]})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            if "skipped" in row:
                rows.append({"model": m, "variant": v, **row})
                continue
            rows.append(row)
            print(f"{m:9s} {v:8s} {row['step_s']:.3f} s/step  {row['images_per_s']:6.1f} img/s  "
                  f"{row['peak_rss_mib']:7.0f} MiB  {row['gflops_per_s']:6.1f} GFLOP/s", flush=True)
    old = C.load("train_step") if args.merge else None
    if old:
        measured = {(r["model"], r["variant"]) for r in rows}
        rows = [r for r in old["rows"] if (r["model"], r["variant"]) not in measured] + rows
        rows.sort(key=lambda r: (MODELS.index(r["model"]) if r["model"] in MODELS else 99,
                                 VARIANTS.index(r["variant"]) if r["variant"] in VARIANTS else 99))
    for r in rows:   # against this run's matmul throughput, merged rows included
        if "gflops_per_s" in r:
            r["fraction_of_matmul_peak"] = r["gflops_per_s"] / (peak_bf16 if r["variant"] == "bf16" else peak)
    base = {r["variant"]: r for r in rows if r.get("model") == "esr9" and "step_s" in r}
    div = {r["variant"]: r for r in rows if r.get("model") == "esr9_div" and "step_s" in r}
    result = {"what": f"training step, 96 px, batch {args.batch}, SGD; median of {args.reps} after 1 warm-up",
              "matmul_gflops": peak, "matmul_bf16_gflops": peak_bf16, "rows": rows, "target": {"esr9_div_over_esr9_step_time": 1.25}}
    if "default" in base and "default" in div:
        result["esr9_div_over_esr9_step_time"] = div["default"]["step_s"] / base["default"]["step_s"]
        result["esr9_div_over_esr9_same_variant"] = {v: div[v]["step_s"] / base[v]["step_s"]
                                                     for v in div if v in base}
        best = min((r for r in div.values()), key=lambda r: r["step_s"])
        result["best_esr9_div_variant"] = best["variant"]
        result["best_esr9_div_over_esr9_default"] = best["step_s"] / base["default"]["step_s"]
    if args.paired_reps > 0:
        proc = subprocess.run([sys.executable, __file__, "--paired-only", "--batch", str(args.batch),
                               "--paired-reps", str(args.paired_reps)], capture_output=True, text=True)
        if proc.returncode == 0:
            result["paired"] = json.loads(proc.stdout.strip().splitlines()[-1])
            print("paired:", {m: round(v, 3) for m, v in result["paired"]["ratio_median"].items()}, flush=True)
        else:
            result["paired"] = {"error": proc.stderr.strip().splitlines()[-1:]}
    elif args.merge and old and "paired" in old:
        result["paired"] = old["paired"]
    C.save("train_step", result)
    return result


if __name__ == "__main__":
    main()
