"""How hard is the synthetic FER task for a linear model, and how fast is the renderer?

Trains a pixel-level multinomial logistic regression (standardised grayscale pixels
at 48 px, L2-regularised, full-batch L-BFGS; the L2 strength picked on val) on the
synthetic train split and reports val/test accuracy, plus rendering throughput at
96 px RGB. A linear model should stay well below what a CNN reaches (chance is
12.5%); ``--cnn`` also trains a small CNN for a few epochs as a learnability check.
Writes ``bench/results/synthetic_baseline.json`` (atomically).

Run: ``.venv/bin/python bench/synthetic_baseline.py`` (about 1-3 minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fer_lab.data.synthetic import RENDER_VERSION, SyntheticFaces  # noqa: E402
from fer_lab.runs import write_json  # noqa: E402


def load_split(split: str, size: int, difficulty: float, occlusion_rate: float, seed: int,
               num_samples: int | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    ds = SyntheticFaces(split=split, size=size, grayscale=True, seed=seed, difficulty=difficulty,
                        occlusion_rate=occlusion_rate, num_samples=num_samples)
    t0 = time.perf_counter()
    X = np.stack([ds.load_image(i) for i in range(len(ds))]).astype(np.float32) / 255.0
    return X, ds.targets.copy(), time.perf_counter() - t0


def render_throughput(size: int = 96, n: int = 500, difficulty: float = 1.0) -> float:
    ds = SyntheticFaces(split="train", size=size, num_samples=n, difficulty=difficulty)
    ds.load_image(0)  # warm the coordinate grid
    t0 = time.perf_counter()
    for i in range(n):
        ds.load_image(i)
    return n / (time.perf_counter() - t0)


def fit_logreg(X: torch.Tensor, y: torch.Tensor, l2: float, iters: int = 150) -> nn.Linear:
    model = nn.Linear(X.shape[1], 8)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y) + 0.5 * l2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        ch = [1, 32, 64, 128]
        layers = []
        for a, b in zip(ch[:-1], ch[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.Conv2d(b, b, 3, padding=1),
                       nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(ch[-1], 8)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def train_cnn(Xtr, ytr, Xva, yva, Xte, yte, epochs: int) -> dict:
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(Xtr) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    Xtr, Xva, Xte = (torch.from_numpy(a)[:, None] for a in (Xtr, Xva, Xte))
    ytr_t = torch.from_numpy(ytr)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(Xtr))
        for k in range(0, len(Xtr), 128):
            idx = perm[k:k + 128]
            xb = Xtr[idx]
            flip = torch.rand(len(idx)) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), ytr_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()

    def acc(X, y):
        with torch.no_grad():
            pred = torch.cat([model(X[k:k + 512]).argmax(1) for k in range(0, len(X), 512)])
        return float((pred.numpy() == y).mean())

    return {"epochs": epochs, "val_acc": acc(Xva, yva), "test_acc": acc(Xte, yte),
            "train_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--difficulty", type=float, default=1.0)
    ap.add_argument("--occlusion-rate", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=48, help="pixel resolution for the linear model")
    ap.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    ap.add_argument("--cnn", type=int, default=0, metavar="EPOCHS", help="also train a small CNN for EPOCHS")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "synthetic_baseline.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t_start = time.perf_counter()

    splits = {}
    render_s = 0.0
    for split in ("train", "val", "test"):
        X, y, s = load_split(split, args.size, args.difficulty, args.occlusion_rate, args.seed)
        splits[split] = (X, y)
        render_s += s
    n_rendered = sum(len(v[1]) for v in splits.values())
    print(f"rendered {n_rendered} gray {args.size}px images in {render_s:.1f} s", flush=True)

    Xtr, ytr = splits["train"]
    mean, std = Xtr.reshape(len(Xtr), -1).mean(0), Xtr.reshape(len(Xtr), -1).std(0) + 1e-3
    T = {k: (torch.from_numpy((X.reshape(len(X), -1) - mean) / std), torch.from_numpy(y))
         for k, (X, y) in splits.items()}
    sweep = []
    best = None
    for l2 in args.l2:
        t0 = time.perf_counter()
        model = fit_logreg(*T["train"], l2=l2)
        row = {"l2": l2, "train_acc": accuracy(model, *T["train"]), "val_acc": accuracy(model, *T["val"]),
               "test_acc": accuracy(model, *T["test"]), "fit_s": round(time.perf_counter() - t0, 1)}
        print(f"logreg l2={l2:g}: train {row['train_acc']:.3f} val {row['val_acc']:.3f} "
              f"test {row['test_acc']:.3f} ({row['fit_s']} s)", flush=True)
        sweep.append(row)
        if best is None or row["val_acc"] > best["val_acc"]:
            best = row

    thr = render_throughput(96, 500, args.difficulty)
    print(f"render throughput 96px RGB: {thr:.0f} img/s ({1e3 / thr:.2f} ms/img, 1 process)", flush=True)

    result = {
        "benchmark": "synthetic_baseline",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "numpy": np.__version__, "torch_threads": torch.get_num_threads()},
        "dataset": {"name": "synthetic", "render_version": RENDER_VERSION, "difficulty": args.difficulty,
                    "occlusion_rate": args.occlusion_rate, "seed": args.seed, "size": args.size,
                    "grayscale": True, "n_train": int(len(ytr)), "n_val": int(len(splits["val"][1])),
                    "n_test": int(len(splits["test"][1]))},
        "chance_acc": 0.125,
        "logreg": {"model": "multinomial logistic regression on standardised pixels, L-BFGS",
                   "selected_l2": best["l2"], "val_acc": best["val_acc"], "test_acc": best["test_acc"],
                   "sweep": sweep},
        "render": {"size": 96, "rgb": True, "images_per_s": round(thr, 1), "ms_per_image": round(1e3 / thr, 3),
                   "gray48_images_per_s": round(n_rendered / render_s, 1)},
    }
    if args.cnn:
        result["cnn"] = train_cnn(Xtr, ytr, *splits["val"], *splits["test"], epochs=args.cnn)
        print(f"small CNN ({args.cnn} epochs): val {result['cnn']['val_acc']:.3f} "
              f"test {result['cnn']['test_acc']:.3f} ({result['cnn']['train_s']} s)", flush=True)
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    write_json(args.out, result)
    print(f"wrote {args.out} ({result['total_s']} s)")
    return result


if __name__ == "__main__":
    main()
