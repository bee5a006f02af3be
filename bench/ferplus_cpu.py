"""FER+ on 2 CPU cores: the ``ferplus_cpu`` preset against the floor (a plain small CNN) and
ablations of what the earlier CPU settings cost. Real faces only: the shared FER+ copy
(``../shared/data/ferplus``, unpacked once into ``outputs/cache/ferplus_shared``).

Every entry trains on FER2013Train minus a stratified 10 % hold-out (models are selected on
the hold-out) and reports FER2013Valid, majority labels in AffectNet order, as fer_lab's
engine does. ``plain_cnn`` is the floor of the developers' guide: a 4-block CNN (1.2 M
parameters, 48 px, the whole training set, Adam, flips and small shifts) trained for a fixed
wall-clock budget (``--budget-s``, 360 s) on the same split; it is written here, outside the
package, on purpose. The other entries are fer_lab runs (``fer_lab.train``) whose settings are
the preset with one change each. Results are merged into ``bench/results/ferplus_cpu.json``
as each entry finishes (rerun to resume; ``--force`` re-measures). ``--seeds`` measures more
seeds: seed 0 is stored under the entry's name, seed k under ``<entry>-s<k>``, and ``over_seeds``
holds mean, sd (ddof 1) and n of accuracy and training time per entry measured with several seeds.

    python bench/ferplus_cpu.py                           # every entry not measured yet
    python bench/ferplus_cpu.py --entries plain_cnn esr4 esr4_div
    python bench/ferplus_cpu.py --entries esr4 esr4_div --seeds 1 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common as C
import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "ferplus" / "ferplus_train_valid.tar.gz"
ROOT = REPO / "outputs" / "cache" / "ferplus_shared"
OUT = REPO / "outputs" / "bench" / "ferplus_cpu"

# entry -> (description, overrides of the ferplus_cpu preset)
ENTRIES = {
    "esr4": ("ESR-4 (no attention), the preset", dict(model="esr9")),
    "esr4_div": ("ESR*-4 (CBAM + spatial + channel diversity, gamma 10), the preset", dict(model="esr9_div")),
    "esr4_fp32": ("ESR-4, float32 (the preset without bf16 autocast)", dict(model="esr9", amp="none")),
    "esr4_div_random_init": ("ESR*-4 (gamma 10), CBAM gates with the paper's random initialisation",
                             dict(model="esr9_div", model_options={"cbam_init": "random"})),
    "esr4_att_random_init": ("ESR-4 + CBAM, CBAM gates with the paper's random initialisation",
                             dict(model="esr9_att", model_options={"cbam_init": "random"})),
    "esr4_div_r16": ("ESR*-4 (gamma 10), the paper's CBAM reduction 16 (hidden size 1-8 at width 0.25)",
                     dict(model="esr9_div", model_options={"cbam_reduction": 16})),
    # the preset before 2026-12-04 (float32, random CBAM init, reduction 16) with per-face augmentation
    "esr4_light_train": ("ESR-4, the preset of 2026-12-02 with per-face augmentation (light_train, float32)",
                         dict(model="esr9", train_transform="light_train", amp="none")),
    "esr4_div_light_train": ("ESR*-4 (gamma 10), the preset of 2026-12-02 with per-face augmentation "
                             "(light_train, float32, random CBAM init, reduction 16)",
                             dict(model="esr9_div", train_transform="light_train", amp="none",
                                  model_options={"cbam_init": "random", "cbam_reduction": 16})),
    "esr4_96px": ("ESR-4, faces upsampled to 96 px (the earlier CPU setting)", dict(model="esr9", image_size=96)),
    "esr4_balanced": ("ESR-4, class-balanced subset of 1,000 faces per class (the earlier CPU setting)",
                      dict(model="esr9", subset_per_class=1000)),
    "esr4_esr_aug": ("ESR-4, ESR's augmentation (30 deg affine, colour jitter)",
                     dict(model="esr9", train_transform="esr_train")),
}


def plain_cnn() -> nn.Module:
    """4 blocks of two 3x3 conv + BN + ReLU and a max-pool (32-64-128-256), GAP, linear: 1.2 M parameters."""
    layers, cin = [], 3
    for cout in (32, 64, 128, 256):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                   nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(256, 8))


def run_plain_cnn(budget_s: float, seed: int = 0) -> dict:
    """Train the floor for ``budget_s`` seconds of training; select on the hold-out; report FER2013Valid."""
    from torch.utils.data import DataLoader, Subset

    from fer_lab.data import build_dataset, build_transform
    from fer_lab.train import holdout_split
    from fer_lab.utils import derive_seed, keep_freed_memory, set_seed

    keep_freed_memory()
    set_seed(seed)
    opts = dict(label_mode="majority", cache=str(REPO / "outputs" / "cache"))
    train_tf = build_transform("light_train", 48)
    eval_tf = build_transform("eval", 48)
    full = build_dataset("ferplus", root=str(ROOT), split="train", transform=train_tf, label_space="affectnet8", **opts)
    keep, held = holdout_split(full.targets, 0.1, derive_seed("holdout", "ferplus"))
    train = Subset(full, keep)
    val = Subset(build_dataset("ferplus", root=str(ROOT), split="train", transform=eval_tf,
                               label_space="affectnet8", **opts), held)
    test = build_dataset("ferplus", root=str(ROOT), split="val", transform=eval_tf, label_space="affectnet8", **opts)
    model = plain_cnn().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def accuracy(ds) -> float:
        model.eval()
        right = 0
        with torch.no_grad():
            for x, y in DataLoader(ds, batch_size=256):
                right += int((model(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum())
        return right / len(ds)

    spent, epochs, best, history = 0.0, 0, (-1.0, None), []
    while spent < budget_s:
        model.train()
        g = torch.Generator().manual_seed(seed * 1000 + epochs)
        for x, y in DataLoader(train, batch_size=64, shuffle=True, generator=g):
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            spent += time.perf_counter() - t0
            if spent >= budget_s:
                break
        epochs += 1
        va = accuracy(val)
        history.append({"epoch": epochs, "train_time_s": spent, "val_acc": va})
        if va > best[0]:
            best = (va, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])
    return {"description": "plain 4-block CNN (1.2 M parameters), 48 px, Adam 1e-3, flips and small shifts, "
                           f"{budget_s:.0f} s of training", "parameters": sum(p.numel() for p in model.parameters()),
            "train_time_s": spent, "epochs": epochs, "val_acc": best[0], "ferplus_valid_acc": accuracy(test),
            "history": history}


def run_entry(name: str, seed: int = 0) -> dict:
    """One fer_lab run: the ``ferplus_cpu`` preset with the entry's overrides."""
    import pandas as pd

    from fer_lab.runs import read_json
    from fer_lab.train import TrainConfig, train

    description, overrides = ENTRIES[name]
    cfg = TrainConfig.from_preset("ferplus_cpu", data_root=str(ROOT), output_dir=str(OUT), seed=seed,
                                  name=f"{name}-s{seed}", progress=False, figures=False, **overrides)
    run = OUT / cfg.run_name
    path = train(cfg, resume=(run / "config.json").is_file()) if not (run / "metrics.json").is_file() else run
    m = read_json(path / "metrics.json")
    h = pd.read_csv(path / "history.csv")
    head = m["selected"]["head"]
    return {"description": description, "overrides": overrides, "parameters": m["num_parameters"],
            "train_time_s": m["train_time_s"], "epochs": len(h), "selected": m["selected"],
            "val_acc": m["selected"]["val_score"], "ferplus_valid_acc": m["test"][f"acc_{head}"],
            "ferplus_valid_acc_softmax_mean": m["test"].get("acc_ensemble"),
            "epoch_time_s": float(h["time_s"].median()), "run": str(path)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", nargs="*", default=["plain_cnn", *ENTRIES])
    ap.add_argument("--budget-s", type=float, default=360.0, help="plain CNN: seconds of training")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to measure (default 0)")
    ap.add_argument("--force", action="store_true", help="measure entries that are already in the results")
    args = ap.parse_args(argv)
    if not ARCHIVE.is_file() and not ROOT.is_dir():
        print(f"real FER+ data not found at {ARCHIVE}; nothing measured", file=sys.stderr)
        return 1
    if not ROOT.is_dir():
        from fer_lab.data.cache import unpack_once
        unpack_once(ARCHIVE, ROOT)
    results = C.load("ferplus_cpu") or {"what": __doc__.split("\n")[0], "entries": {}}
    results.pop("machine", None)
    unknown = [n for n in args.entries if n != "plain_cnn" and n not in ENTRIES]
    if unknown:
        ap.error(f"unknown entries {unknown}: expected plain_cnn or one of {sorted(ENTRIES)}")
    for name in args.entries:
        for seed in args.seeds:
            key = entry_key(name, seed)
            if key in results["entries"] and not args.force:
                print(f"{key}: measured already (--force to redo)")
                continue
            r = run_plain_cnn(args.budget_s, seed) if name == "plain_cnn" else run_entry(name, seed)
            r["seed"], r["machine"] = seed, C.machine()
            results["entries"][key] = r
            results["over_seeds"] = over_seeds(results["entries"])
            C.save("ferplus_cpu", results)
            print(f"{key}: FER2013Valid {r['ferplus_valid_acc']:.4f} (hold-out {r['val_acc']:.4f}), "
                  f"{r['train_time_s']:.0f} s of training, {r['epochs']} epochs", flush=True)
    for name, s in results.get("over_seeds", {}).items():
        print(f"{name}: FER2013Valid {100 * s['ferplus_valid_acc']['mean']:.1f} ± {100 * s['ferplus_valid_acc']['sd']:.1f} %, "
              f"{s['train_time_s']['mean']:.0f} ± {s['train_time_s']['sd']:.0f} s (n = {s['n']}, seeds {s['seeds']})")
    return 0


def entry_key(name: str, seed: int) -> str:
    """Results key of one measurement: the entry's name for seed 0, ``<name>-s<seed>`` otherwise."""
    return name if seed == 0 else f"{name}-s{seed}"


def over_seeds(entries: dict) -> dict:
    """Mean, sd (ddof 1) and n over seeds of accuracy and training time, per entry with several seeds.
    Only measurements on one kind of machine are pooled: the seed-0 entry's CPU."""
    from fer_lab.report import seed_stats

    out = {}
    for name in [n for n in entries if n == "plain_cnn" or n in ENTRIES]:
        cpu = entries[name].get("machine", {}).get("cpu")
        runs = [(0, entries[name])] + [(int(k.rsplit("-s", 1)[1]), r) for k, r in entries.items()
                                       if k.startswith(f"{name}-s") and k.rsplit("-s", 1)[1].isdigit()
                                       and r.get("machine", {}).get("cpu") == cpu]
        if len(runs) > 1:
            out[name] = {"seeds": [s for s, _ in runs], "n": len(runs), "cpu": cpu,
                         **{k: seed_stats([r.get(k) for _, r in runs])
                            for k in ("ferplus_valid_acc", "ferplus_valid_acc_softmax_mean", "val_acc", "train_time_s")}}
    return out


if __name__ == "__main__":
    sys.exit(main())
