"""Do MA-Net*'s diversity terms carry gradient at gamma = 10 on unnormalised features?

SPEC section 1 warns that with gamma = 10 and unnormalised post-ReLU feature maps the
similarity matrix S is close to the identity, so ``D = det(S)`` is flat and its gradient
can vanish. This script measures it for ``manet_div`` at 112 px on synthetic faces
(8 classes), for several ``(diversity_normalize, gamma)`` settings:

1. **at initialisation**, on one fixed training batch (train-mode BatchNorm): per term
   (patch spatial ``sp``, patch channel ``ch``, branch ``b``) the similarity matrix S,
   its mean off-diagonal entry, the mean squared distance between learners (after the
   optional L2 normalisation), D, and the norm of D's gradient with respect to all
   parameters next to the CE gradient's norm; also at the paper's 224 px for two settings;
2. **in training**: two epochs of ``fer_lab.train.train`` (400 training images, batch
   16, SGD lr 0.01, momentum 0.9, weight decay 1e-4 as in the MA-Net preset), reading S
   (``similarity.npz``), D and the gradient norms the engine records on the first batch
   of each epoch (``history.csv``) back from the run directories.

Writes ``bench/results/manet_gradients.json``. Runs on one CPU thread (the machine is
shared), with denormal floats flushed to zero: gradients that small (< 1.2e-38) are zero
for every purpose, and computing them through the whole network in denormal arithmetic
otherwise takes ~20 s per gradient-norm measurement instead of ~1 s.

Run: ``.venv/bin/python bench/manet_gradients.py`` (about 6 minutes on 1 CPU thread);
``--quick`` for a smoke run (init probe only, 2 settings).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fer_lab.data import build_dataset, build_transform  # noqa: E402
from fer_lab.diversity import pairwise_sq_distances, prepare  # noqa: E402
from fer_lab.models import build_model  # noqa: E402
from fer_lab.schema import TERM_ABBREV  # noqa: E402
from fer_lab.train import TrainConfig, train  # noqa: E402

SIZE = 112
PROBE_SETTINGS = [("none", 10.0), ("none", 1.0), ("none", 0.1), ("l2", 10.0), ("l2", 1.0)]
#: the paper's input size, probed at initialisation only (too slow to train on a CPU here)
PROBE_SETTINGS_224 = [("none", 10.0), ("l2", 10.0)]
TRAIN_SETTINGS = [("none", 10.0), ("l2", 10.0), ("none", 1.0)]


def _offdiag(S: np.ndarray) -> np.ndarray:
    return S[~np.eye(S.shape[0], dtype=bool)]


def probe_batch(size: int, n: int, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` synthetic training faces at ``size`` px (eval transform) and their labels."""
    ds = build_dataset("synthetic", split="train", transform=build_transform("eval", size), size=size,
                       num_samples=n, cache=str(cache))
    return torch.stack([ds[i][0] for i in range(n)]), torch.as_tensor([int(ds[i][1]) for i in range(n)])


def probe_init(normalize: str, gamma: float, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> dict:
    """S, D, learner distances and gradient norms of each term at initialisation on one batch."""
    torch.manual_seed(seed)
    model = build_model("manet_div", num_classes=8, input_size=x.shape[-1], gamma=gamma,
                        diversity_normalize=normalize)
    model.train()
    out = model(x)
    lo = model.loss(out, y)
    params = [p for p in model.parameters() if p.requires_grad]

    def gnorm(value):
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        return float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads if g is not None)))

    feats = model.learners(out)
    result = {"image_size": int(x.shape[-1]), "batch": int(x.shape[0]), "ce": float(lo.ce_total.detach()),
              "gradnorm_ce": gnorm(lo.ce_total), "terms": {}}
    for term, D in lo.diversity.items():
        f = prepare(feats[term].detach(), normalize).float()
        full = pairwise_sq_distances(f)                     # (N, L, L)
        L = full.shape[1]
        d2 = full[:, ~torch.eye(L, dtype=torch.bool)]       # (N, pairs): off-diagonal entries
        S = lo.similarity[term].detach().double().numpy()
        result["terms"][TERM_ABBREV[term]] = {
            "learners": int(S.shape[0]), "dims": int(f.shape[-1]),
            "D": float(D.detach()), "gradnorm_D": gnorm(D),
            "S_offdiag_mean": float(_offdiag(S).mean()), "S_offdiag_max": float(_offdiag(S).max()),
            "sq_distance_mean": float(d2.mean()), "sq_distance_min": float(d2.min()),
            "gamma_times_sq_distance_mean": float(gamma * d2.mean()),
            "S": S.round(6).tolist(),
        }
    return result


def train_run(normalize: str, gamma: float, workdir: Path, epochs: int, n_train: int) -> dict:
    """Two epochs through the engine; per-epoch D, S and gradient norms from the run directory."""
    cfg = TrainConfig(model="manet_div", dataset="synthetic", image_size=SIZE,
                      model_options={"num_classes": 8, "gamma": gamma, "diversity_normalize": normalize},
                      data_options={"num_samples": {"train": n_train, "val": 200, "test": 200}},
                      epochs=epochs, batch_size=16, eval_batch_size=100, lr=0.01, momentum=0.9,
                      weight_decay=1e-4, lr_step=15, lr_gamma=0.1, subset_per_class=None,
                      output_dir=str(workdir / "runs"), cache_dir=str(workdir / "cache"),
                      name=f"manet_div-{normalize}-g{gamma:g}", progress=False, figures=False, seed=0)
    t0 = time.perf_counter()
    path = train(cfg)
    import pandas as pd

    h = pd.read_csv(path / "history.csv")
    sims = np.load(path / "similarity.npz")
    epochs_out = []
    for i, row in h.iterrows():
        rec = {"epoch": int(row["epoch"]), "train_ce": float(row["train_ce"]),
               "train_acc_fused": float(row["train_acc_fused"]), "val_acc_fused": float(row["val_acc_fused"]),
               "gradnorm_ce": float(row["train_gradnorm_ce"]), "terms": {}}
        for k in ("sp", "ch", "b"):
            S = sims[f"train_S_{k}"][i]
            rec["terms"][k] = {"D_train": float(row[f"train_D_{k}"]), "D_val": float(row[f"val_D_{k}"]),
                               "gradnorm_D_first_batch": float(row[f"train_gradnorm_D_{k}"]),
                               "S_offdiag_mean_train": float(_offdiag(S).mean()),
                               "S_train": np.asarray(S).round(6).tolist()}
        epochs_out.append(rec)
    return {"normalize": normalize, "gamma": gamma, "seconds": round(time.perf_counter() - t0, 1),
            "epochs": epochs_out}


def summarise(probes: list, runs: list) -> list[dict]:
    """One row per (where, setting, term): D and the ratio |grad D| / |grad CE|."""
    rows = []
    for p in probes:
        for k, t in p["terms"].items():
            rows.append({"where": f"init {p['image_size']} px", "normalize": p["normalize"], "gamma": p["gamma"],
                         "term": k, "D": round(t["D"], 4), "S_offdiag_mean": round(t["S_offdiag_mean"], 4),
                         "grad_ratio": t["gradnorm_D"] / p["gradnorm_ce"]})
    for r in runs:
        for e in r["epochs"]:
            for k, t in e["terms"].items():
                rows.append({"where": f"train 112 px epoch {e['epoch']} (first batch)", "normalize": r["normalize"],
                             "gamma": r["gamma"], "term": k, "D": round(t["D_train"], 4),
                             "S_offdiag_mean": round(t["S_offdiag_mean_train"], 4),
                             "grad_ratio": t["gradnorm_D_first_batch"] / e["gradnorm_ce"]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="init probe only, two settings at 112 px")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "manet_gradients.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        x, y = probe_batch(SIZE, 16, tmp / "cache")
        settings = PROBE_SETTINGS[:2] if args.quick else PROBE_SETTINGS
        probes = [{"normalize": n, "gamma": g, **probe_init(n, g, x, y)} for n, g in settings]
        if not args.quick:
            x, y = probe_batch(224, 16, tmp / "cache")
            probes += [{"normalize": n, "gamma": g, **probe_init(n, g, x, y)} for n, g in PROBE_SETTINGS_224]
        runs = [] if args.quick else [train_run(n, g, tmp, args.epochs, args.train_images) for n, g in TRAIN_SETTINGS]
    result = {
        "what": "manet_div diversity terms at 112 px on synthetic faces: S, D and gradient norms per term",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
        "flush_denormal": True, "image_size": SIZE, "probe_batch": 16,
        "train": {"images": args.train_images, "epochs": args.epochs, "batch_size": 16,
                  "optimizer": "sgd lr 0.01 momentum 0.9 wd 1e-4"},
        "summary": summarise(probes, runs), "init_probe": probes, "training": runs,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(args.out)
    for p in probes:
        terms = ", ".join(f"{k}: D={t['D']:.4f} |grad|={t['gradnorm_D']:.3g} "
                          f"gamma*d2={t['gamma_times_sq_distance_mean']:.3g}"
                          for k, t in p["terms"].items())
        print(f"init {p['image_size']} px {p['normalize']:>4s} gamma={p['gamma']:<4g} |grad CE|={p['gradnorm_ce']:.3g}; {terms}")
    for r in runs:
        for e in r["epochs"]:
            terms = ", ".join(f"{k}: D={t['D_train']:.4f} |grad|={t['gradnorm_D_first_batch']:.3g}"
                              for k, t in e["terms"].items())
            print(f"train {r['normalize']:>4s} gamma={r['gamma']:<4g} epoch {e['epoch']}: |grad CE|="
                  f"{e['gradnorm_ce']:.3g}; {terms}; val acc {e['val_acc_fused']:.3f}")
    print(f"wrote {args.out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
