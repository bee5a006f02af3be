"""How fast does a CPU-sized ESR* learn synthetic faces? Sizing the `make demo` configuration.

Trains the demo model (4-branch ESR* at quarter width, 96 px, growth protocol) under
several optimiser / augmentation / difficulty settings and records validation accuracy
per epoch, so the demo's epoch budget is chosen from measurements. Accuracy per epoch
does not depend on the hardware, so this runs anywhere (a GPU makes it take minutes
instead of hours); results go to ``bench/results/demo_sizing.json``.

    python bench/demo_sizing.py [--out DIR] [--only NAME ...] [--workers N]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = dict(model="esr9_div", model_options={"num_branches": 4, "width": 0.25}, dataset="synthetic",
            epochs=12, epochs_later=6, batch_size=32, subset_per_class=300, lr_step=6, lr_gamma=0.5,
            progress=False, figures=False)

VARIANTS = {
    "sgd0.1_paper_aug": dict(lr=0.1, lr_new=0.1, lr_old=0.01),
    "sgd0.05_paper_aug": dict(lr=0.05, lr_new=0.05, lr_old=0.01),
    "adam_paper_aug": dict(optimizer="adam", lr=1e-3, lr_new=1e-3, lr_old=3e-4),
    "adam_no_aug": dict(optimizer="adam", lr=1e-3, lr_new=1e-3, lr_old=3e-4, train_transform="eval"),
    "sgd0.05_no_aug": dict(lr=0.05, lr_new=0.05, lr_old=0.01, train_transform="eval"),
    "adam_paper_aug_difficulty0.5": dict(optimizer="adam", lr=1e-3, lr_new=1e-3, lr_old=3e-4,
                                         data_options={"difficulty": 0.5}),
    "adam_paper_aug_width0.5": dict(optimizer="adam", lr=1e-3, lr_new=1e-3, lr_old=3e-4,
                                    model_options={"num_branches": 4, "width": 0.5}),
}


def main(argv=None) -> dict:
    import pandas as pd
    import torch

    from fer_lab.runs import environment, read_json, write_json
    from fer_lab.train import TrainConfig, train

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="demo_sizing_"))
    results = {"benchmark": "demo_sizing", "environment": environment("cuda" if torch.cuda.is_available() else "cpu"),
               "base": BASE, "variants": {}}
    out_path = Path(args.out) / "demo_sizing.json"
    for name, over in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        cfg = {**BASE, **over, "name": name, "output_dir": str(work / "runs"), "cache_dir": str(work / "cache"),
               "num_workers": args.workers}
        t0 = time.perf_counter()
        path = train(TrainConfig(**cfg))
        h = pd.read_csv(path / "history.csv")
        m = read_json(path / "metrics.json")
        results["variants"][name] = {
            "overrides": over, "wall_s": time.perf_counter() - t0,
            "val_acc_ensemble": h["val_acc_ensemble"].round(4).tolist(),
            "train_acc_ensemble": h["train_acc_ensemble"].round(4).tolist(),
            "num_branches": h["num_branches"].tolist(),
            "val_D_sp": h.get("val_D_sp", pd.Series(dtype=float)).round(4).tolist(),
            "test_acc_ensemble": m["test"]["acc_ensemble"],
            "test_acc_branches": [m["test"][k] for k in sorted(m["test"]) if k.startswith("acc_branch_")],
        }
        print(name, json.dumps(results["variants"][name]), flush=True)
        write_json(out_path, results)
    return results


if __name__ == "__main__":
    main()
