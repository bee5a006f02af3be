"""Run the CPU benchmarks and write ``bench/RESULTS.md`` from ``bench/results/*.json``.

    python bench/run_all.py            # measure, then write RESULTS.md
    python bench/run_all.py --report   # only rewrite RESULTS.md from the existing results

Order: training step first (the diversity benchmark relates its cost to it), then the
diversity term, inference and branch execution. The GPU numbers come from
``bench/gpu.py`` when it has been run on a GPU machine.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import _common as C

from fer_lab.runs import atomic_write_bytes

HERE = Path(__file__).resolve().parent
STEPS = [("train_step.py", []), ("cbam_position.py", []), ("diversity_speed.py", []), ("inference.py", []),
         ("branch_execution.py", [])]
# bench/ferplus_cpu.py (real FER+, about an hour) runs on its own; its results are reported here too


def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and abs(v) < 0.01:
            return f"{v:.1e}"    # agreement figures: keep their order of magnitude
        return f"{v:,.{digits}f}"
    return str(v)


def _table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out + [""]


def report() -> str:
    lines = ["# Benchmark results", "",
             "Written by `bench/run_all.py` from `bench/results/*.json` (each file also holds the machine, "
             "versions and date of its run). Medians of several repetitions; timings on a shared 2-core "
             "machine vary by about 10 %.", ""]
    ts = C.load("train_step")
    if ts:
        m = ts["machine"]
        lines += [f"CPU runs: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, {m['date']}; dense float32 "
                  f"matmul {ts['matmul_gflops']:.0f} GFLOP/s"
                  + (f", bfloat16 {ts['matmul_bf16_gflops']:.0f} GFLOP/s" if "matmul_bf16_gflops" in ts else "")
                  + ".", ""]
        lines += ["## Training step (96 px, batch 32, SGD)", ""]
        rows = [(r["model"], r["variant"], r.get("step_s"), r.get("images_per_s"), r.get("peak_rss_mib"),
                 r.get("gflops_per_s"), r.get("fraction_of_matmul_peak"), r.get("loss_abs_diff_vs_nchw_fp32_eager"),
                 r.get("compile_s", r.get("skipped", r.get("error")))) for r in ts["rows"]]
        lines += _table(["model", "variant", "s/step", "img/s", "peak RSS MiB", "GFLOP/s", "of matmul peak",
                         "loss diff vs fp32 NCHW", "note / compile s"], rows)
        if "esr9_div_over_esr9_step_time" in ts:
            ok = ts["esr9_div_over_esr9_step_time"] <= 1.25
            lines += [f"ESR*-9 / ESR-9 step time with the defaults: **{ts['esr9_div_over_esr9_step_time']:.2f}x** "
                      f"(target 1.25x: {'met' if ok else 'not met'}); best ESR*-9 variant `{ts['best_esr9_div_variant']}`"
                      f": {ts['best_esr9_div_over_esr9_default']:.2f}x of ESR-9's default step. Same variant on both "
                      "models: " + ", ".join(f"{k} {v:.2f}x" for k, v in
                                             ts.get("esr9_div_over_esr9_same_variant", {}).items()) +
                      ". The published diversified ESR evaluates 4.2x slower than plain ESR (5.24 vs 22.23 "
                      "evaluations/s).", ""]
        pr = ts.get("paired", {})
        if "ratio_median" in pr:
            r = pr["ratio_median"]
            ok = r.get("esr9_div", 99) <= 1.25
            lines += [f"Side by side ({pr['what']}): ESR-9 {pr['step_s']['esr9']:.2f} s, " +
                      ", ".join(f"{m} {pr['step_s'][m]:.2f} s ({r[m]:.2f}x, worst round {pr['ratio_max'][m]:.2f}x)"
                                for m in r) +
                      f". ESR*-9 / ESR-9: **{r.get('esr9_div', float('nan')):.2f}x** "
                      f"(target 1.25x: {'met' if ok else 'not met'}).", ""]
    sw = C.load("train_step_small_widths")
    if sw:
        m = sw["machine"]
        lines += ["## Small widths: the `ferplus_cpu` shape (`bench/train_step.py --small-widths`)", "",
                  f"{sw['what']}; {m['cpu']}, {m['torch_threads']} thread(s), {m['date'][:10]}"
                  + (f"; {sw['note']}" if sw.get("note") else "") + ". Target: ESR*-4 within "
                  f"{sw['target']['esr9_div_over_esr9']}x of ESR-4.", ""]
        rows = [(r["width"], r["amp"], r["cbam_path"], r["step_s"]["esr9"], r["step_s"]["esr9_att"],
                 r["ratio_median"]["esr9_att"], r["step_s"]["esr9_div"], r["ratio_median"]["esr9_div"],
                 r["ratio_max"]["esr9_div"]) for r in sw["rows"]]
        lines += _table(["width", "amp", "CBAM path", "ESR-4 s/step", "+ CBAM s/step", "x ESR-4", "ESR*-4 s/step",
                         "x ESR-4", "worst round"], rows)
        target = sw["target"]["esr9_div_over_esr9"]
        node = [r for r in sw["rows"] if r["cbam_path"] == "node"]
        met = [f"width {r['width']} {r['amp']}" for r in node if r["ratio_median"]["esr9_div"] <= target]
        missed = [f"width {r['width']} {r['amp']} ({r['ratio_median']['esr9_div']:.2f}x)" for r in node
                  if r["ratio_median"]["esr9_div"] > target]
        node_wins = all(r["step_s"]["esr9_div"] <= q["step_s"]["esr9_div"] for r in node for q in sw["rows"]
                        if q["cbam_path"] == "plain" and (q["width"], q["amp"]) == (r["width"], r["amp"]))
        lines += [("The hand-written node beats the plain formulas in every row (so `FAST_PATH['cpu']` stays `node`); "
                   if node_wins else "The plain formulas beat the hand-written node in some rows; ")
                  + "the diversity term itself costs nothing visible (ESR*-4 = ESR-4 + CBAM). With the node, "
                  f"ESR*-4 is within {target}x in: {', '.join(met) or 'no row'}; not in: {', '.join(missed) or 'no row'}. "
                  "Where bf16 convolutions are fast (AMX), CBAM's memory-bound passes, which bf16 speeds up far "
                  "less, weigh more. Under bf16 two PyTorch CPU paths made CBAM's backward slow and are now avoided: a "
                  "`scatter_add_` into a bf16 map copies the whole map in and out (now one `index_add_` on the "
                  "map's flat memory), and an elementwise op that broadcasts a (B, H, W) map along channels-last's "
                  "C leaves the vectorised loop when C fills less than a SIMD register (bf16 with C = 16; "
                  "the spatial operand is now written out at full size there, and `g sa + d_smean` is two "
                  "binary ops instead of an `addcmul`, which is never vectorised for that broadcast): one CBAM "
                  "at 16 x 48 x 48 went from 80 to 58 ms per training step (AMD EPYC, 1 thread, old and new alternated), "
                  "float32 unchanged. What is left is spread over many memory-bound passes: a profile of one ESR*-4 "
                  "bf16 step at width 0.25 (Intel, 2 threads, 2026-12-07: 305 ms against ESR-4's 142) puts the 20 "
                  "CBAMs' share at about 160 ms, of which the spatial gates' 7x7 2 -> 1 convolutions about 20 ms "
                  "(oneDNN with one output channel), the channel max with its argmax 16 ms (PyTorch's CPU reduction "
                  "over a short innermost dimension), dtype conversions around the gates 14 ms, and the rest "
                  "elementwise passes, reductions and the node's Python. `torch.compile` (inductor, CBAM's plain "
                  "formulas) does not close it: 1.96x compiled ESR-4 (0.291 against 0.148 s per step, 72 s to "
                  "compile). Closing the gap needs a fused CBAM kernel (C++), not more reordering of eager "
                  "operations.", ""]
    cp = C.load("cbam_position")
    if cp:
        lines += ["## CBAM after or before the pooling (ESR*, training step)", "",
                  f"{cp['what']} ({cp['machine']['date']}). The training-step table above was measured before "
                  "2026-12 with CBAM before the pooling; the diversity paper's code, and fer_lab's default since, "
                  "puts it after.", ""]
        rows = [(shape, r["step_s"]["esr9"], r["step_s"]["after_pool"], r["ratio_median"]["after_pool"],
                 r["step_s"]["before_pool"], r["ratio_median"]["before_pool"], r["after_over_before"])
                for shape, r in cp["shapes"].items()]
        lines += _table(["shape", "ESR-9 s/step", "ESR* after_pool s/step", "x ESR-9", "ESR* before_pool s/step",
                         "x ESR-9", "after / before"], rows)
    fc = C.load("ferplus_cpu")
    if fc:
        lines += ["## FER+ on 2 CPU cores (`bench/ferplus_cpu.py`)", "",
                  "Selected on a 10 % hold-out of FER2013Train, FER2013Valid reported; each entry names its machine.", ""]
        rows = [(name, e.get("description"), e.get("seed", 0), 100 * e["ferplus_valid_acc"],
                 100 * e["ferplus_valid_acc_softmax_mean"] if e.get("ferplus_valid_acc_softmax_mean") else None,
                 100 * e["val_acc"], e["train_time_s"], e["epochs"], e["machine"]["cpu"], e["machine"]["date"][:10])
                for name, e in fc["entries"].items()]
        lines += _table(["entry", "what", "seed", "FER2013Valid %", "softmax mean %", "hold-out %", "train s", "epochs",
                         "cpu", "date"], rows)
        pm = lambda s, k: f"{k * s['mean']:.1f} ± {k * s['sd']:.1f}" if s["sd"] is not None else "-"  # noqa: E731
        rows = [(name, s["n"], " ".join(map(str, s["seeds"])), pm(s["ferplus_valid_acc"], 100),
                 pm(s["ferplus_valid_acc_softmax_mean"], 100), pm(s["val_acc"], 100), pm(s["train_time_s"], 1), s["cpu"])
                for name, s in fc.get("over_seeds", {}).items()]
        if rows:
            lines += ["Over seeds (mean ± sd, ddof 1; seeds measured on one kind of CPU):", ""]
            lines += _table(["entry", "n", "seeds", "FER2013Valid %", "softmax mean %", "hold-out %", "train s", "cpu"], rows)
    ds = C.load("diversity_speed")
    if ds:
        lines += ["## Diversity term against the public code's double loop (CPU)", "",
                  ds["what"] + ". `loop`: `bench/reference_diversity.py` (the public code's element-by-element "
                  "fill, zero diagonal); `ours`: `fer_lab.diversity` on the same zero diagonal, and on the paper's.", ""]
        rows = [(r["L"], r["loop_s"] * 1e3, r["ours_s"] * 1e3, r["ours_paper_diagonal_s"] * 1e3, r["speedup"],
                 max(v for k, v in r.items() if k.startswith("max_abs_diff_S")),
                 max(v for k, v in r.items() if k.startswith("abs_diff_det"))) for r in ds["rows"]]
        lines += _table(["L", "loop ms", "ours ms", "ours (paper diag.) ms", "speed-up", "max abs S diff",
                         "max abs det diff"], rows)
        if "share_of_esr9_div_step_L9" in ds:
            lines += [f"At L = 9 both terms cost {ds['share_of_esr9_div_step_L9'] * 100:.2f} % of an ESR*-9 training "
                      "step (target: under 3 %). Targets: 15x at L = 9, 40x at L = 15.", ""]
    inf = C.load("inference")
    if inf:
        lines += ["## Inference (eval mode, channels-last, float32)", ""]
        rows = [(r["model"], r["input"], r["gflops_per_image"], r["latency_b1_ms"], r["throughput_b64_img_s"],
                 r["fraction_of_matmul_peak_b64"]) for r in inf["rows"]]
        lines += _table(["model", "px", "GFLOPs/image", "batch-1 latency ms", "batch-64 img/s", "of matmul peak"], rows)
    be = C.load("branch_execution")
    if be:
        lines += ["## Branch execution: loop against fused", "", "See `bench/results/branch_execution.json`: " +
                  str(be.get("summary", be.get("what", ""))), ""]
    for name, title in (("gpu", "GPU (bench/gpu.py)"), ("gpu_smoke_h200", "GPU smoke test (H200, inline script)")):
        g = C.load(name)
        if g:
            lines += [f"## {title}", "", "```", _short_json(g), "```", ""]
    if not C.load("gpu"):
        lines += ["`bench/gpu.py` has not been run on a GPU yet: the session that wrote it had used up its GPU "
                  "time, and later sessions were not lent a GPU machine; the smoke test above is what was "
                  "measured (before CBAM's single-node backward, so its esr9_att / esr9_div figures are the "
                  "older, slower code).", ""]
    return "\n".join(lines)


def _short_json(d) -> str:
    import json
    d = {k: v for k, v in d.items() if k not in ("benchmark",)}
    return json.dumps(d, indent=1)[:4000]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--report", action="store_true", help="only rewrite RESULTS.md")
    args = ap.parse_args(argv)
    if not args.report:
        for script, extra in STEPS:
            print(f"== {script}", flush=True)
            subprocess.run([sys.executable, str(HERE / script), *extra], check=True)
    atomic_write_bytes(HERE / "RESULTS.md", report().encode())
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
