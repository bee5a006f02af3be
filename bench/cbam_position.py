"""Where CBAM sits in ESR*'s pooling blocks: after the max-pooling (the diversity paper's code,
fer_lab's default since 2026-12) or before it (fer_lab's earlier default), as training-step time.

The rows of ``bench/train_step.py`` before 2026-12 were measured with CBAM before the pooling;
this script measures both placements against ESR-9 side by side (steps alternated in one
process, ratios within each round, :func:`train_step.paired`), at full width (ESR*-9) and at
the CPU width 0.25 with 4 branches (the demo's model). Writes ``bench/results/cbam_position.json``.

    python bench/cbam_position.py [--reps 6]
"""
from __future__ import annotations

import argparse

import _common as C
from train_step import paired

SHAPES = {"full width, 9 branches": {}, "width 0.25, 4 branches": {"width": 0.25, "num_branches": 4}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    out = {"what": "training step (96 px, SGD, channels-last), ESR*-9 with CBAM after / before the pooling "
                   "against ESR-9 of the same shape, steps alternated in one process", "shapes": {}}
    for label, opts in SHAPES.items():
        specs = (("esr9", "esr9", opts), ("after_pool", "esr9_div", opts),
                 ("before_pool", "esr9_div", {**opts, "cbam_position": "before_pool"}))
        r = paired(specs, args.batch, args.reps)
        r["after_over_before"] = r["step_s"]["after_pool"] / r["step_s"]["before_pool"]
        out["shapes"][label] = r
        print(f"{label}: ESR-9 {r['step_s']['esr9']:.3f} s; ESR* after_pool {r['ratio_median']['after_pool']:.2f}x, "
              f"before_pool {r['ratio_median']['before_pool']:.2f}x of ESR-9", flush=True)
    C.save("cbam_position", out)
    return out


if __name__ == "__main__":
    main()
