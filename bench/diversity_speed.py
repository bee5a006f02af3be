"""Diversity term: fer_lab's vectorised version against the public code's double loop.

For L = 2, 4, 9, 15 learners and a batch of 32 at ESR's map sizes (spatial attention
6x6, channel attention 512), times forward + backward of both terms (spatial + channel)
as in a training step, run in alternation (loop, ours, ours with the paper's diagonal) so
the speed-up is taken within each round, median over rounds; and checks that both give the
same S and det to 1e-5 on the same (zero) diagonal convention. Also relates the cost
at L = 9 to an ESR*-9 training step (from ``train_step.json`` when present).

    python bench/diversity_speed.py [--reps 20] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import _common as C
import torch

from fer_lab.diversity import diversity
from reference_diversity import loop_diversity, loop_similarity

SHAPES = {"spatial": (6, 6), "channel": (512,)}


def features(L: int, batch: int, scale: float, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.rand(L, batch, *shape, generator=g) * scale).to(device) for k, shape in SHAPES.items()}


def step(fn, feats: dict, diagonal: str):
    leaves = {k: v.clone().requires_grad_() for k, v in feats.items()}
    total = sum(fn(v, diagonal) for v in leaves.values())
    total.backward()
    return total


def ours(f, diagonal):
    return diversity(f, 10.0, diagonal)[0]


def theirs(f, diagonal):
    return loop_diversity(f, 10.0, diagonal)


def alternated(fns: dict, reps: int, device, inner: int = 5) -> dict:
    """Median times of ``fns`` run in alternating blocks (per round, each function gets one
    untimed call, so it runs with warm caches as in a steady loop, then ``inner`` timed
    calls), and the speed-up of ``loop`` over ``ours`` within each round: a shared
    machine's drift over the seconds a benchmark takes cancels out of the ratio."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            fn()
            C.sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            C.sync(device)
            times[k].append((time.perf_counter() - t0) / inner)
    ratios = [a / b for a, b in zip(times["loop"], times["ours"])]
    return {"median_s": {k: statistics.median(v) for k, v in times.items()},
            "ratio_median": {"loop/ours": statistics.median(ratios)},
            "ratio_min": {"loop/ours": min(ratios)}, "ratio_max": {"loop/ours": max(ratios)}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", default=None, help="results file name (default diversity_speed[_cuda])")
    args = ap.parse_args(argv)
    dev = args.device
    torch.set_flush_denormal(True)   # as during training (fer_lab.utils.flush_denormal)
    rows = []
    for L in (2, 4, 9, 15):
        row = {"L": L, "batch": args.batch}
        # agreement on the public code's zero diagonal, at a scale where S is far from the identity
        for scale in (0.02, 1.0):
            f = features(L, args.batch, scale, dev, seed=L)
            for term, x in f.items():
                S_ours = diversity(x, 10.0, "reference")[1]
                S_loop = loop_similarity(x, 10.0, "reference")
                row[f"max_abs_diff_S_{term}_scale{scale:g}"] = float((S_ours - S_loop).abs().max())
                row[f"abs_diff_det_{term}_scale{scale:g}"] = float((torch.linalg.det(S_ours) -
                                                                     torch.det(S_loop)).abs())
        f = features(L, args.batch, 1.0, dev, seed=L)
        t = alternated({"loop": lambda: step(theirs, f, "reference"), "ours": lambda: step(ours, f, "reference"),
                        "paper": lambda: step(ours, f, "paper")}, reps=args.reps, device=dev)
        row.update(loop_s=t["median_s"]["loop"], ours_s=t["median_s"]["ours"],
                   ours_paper_diagonal_s=t["median_s"]["paper"], speedup=t["ratio_median"]["loop/ours"],
                   speedup_range=[t["ratio_min"]["loop/ours"], t["ratio_max"]["loop/ours"]])
        rows.append(row)
        print(f"L={L:2d}: loop {row['loop_s'] * 1e3:8.2f} ms, ours {row['ours_s'] * 1e3:6.2f} ms, "
              f"x{row['speedup']:.1f}", flush=True)
    result = {"what": "spatial (6x6) + channel (512) diversity terms, forward + backward, batch "
                      f"{args.batch}, gamma 10; {args.reps} rounds of 5 timed calls each (after one untimed), alternated; speed-up = median of per-round ratios", "device": dev, "rows": rows,
              "targets": {"speedup_L9": 15, "speedup_L15": 40, "max_share_of_esr9_div_step": 0.03}}
    step_file = C.load("train_step" if dev == "cpu" else "gpu")
    if step_file:
        try:
            step_s = next(r["step_s"] for r in step_file["rows"] if r["model"] == "esr9_div" and r["variant"] == "default")
            l9 = next(r for r in rows if r["L"] == 9)
            result["esr9_div_step_s"] = step_s
            result["share_of_esr9_div_step_L9"] = l9["ours_paper_diagonal_s"] / step_s
        except StopIteration:
            pass
    C.save(args.name or ("diversity_speed" if dev == "cpu" else "diversity_speed_cuda"), result)
    return result


if __name__ == "__main__":
    main()
