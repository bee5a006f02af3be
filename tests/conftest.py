"""Shared fixtures: tiny training configurations that run in seconds on 2 CPU cores, a tiny
'AffectNet-trained' ESR* checkpoint to fine-tune, and a FER+-format dataset writer."""
import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def tiny_cfg(tmp_path):
    """A 3-branch quarter-width ESR* on 64 px synthetic faces: 2 + 1 + 1 epochs of 48 images."""
    from fer_lab.train import TrainConfig

    def make(**overrides):
        base = dict(model="esr9_div", model_options=dict(num_branches=3, width=0.25, gamma=1.0),
                    dataset="synthetic", data_options=dict(num_samples=48), image_size=64, epochs=2,
                    epochs_later=1, batch_size=16, eval_batch_size=48, subset_per_class=4, lr=0.05,
                    output_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), progress=False,
                    figures=False, name="tiny")
        base.update(overrides)
        return TrainConfig(**base)

    return make


@pytest.fixture(scope="session")
def affectnet_checkpoint(tmp_path_factory):
    """``best.pt`` of a tiny 8-class 'AffectNet-trained' ESR*: 2 branches grown on synthetic faces."""
    out = tmp_path_factory.mktemp("affectnet_style")
    from fer_lab.train import TrainConfig, train

    cfg = TrainConfig(model="esr9_div", model_options=dict(num_branches=2, width=0.25, gamma=1.0),
                      dataset="synthetic", data_options=dict(num_samples=32), image_size=64, epochs=1,
                      epochs_later=1, batch_size=16, eval_batch_size=32, subset_per_class=4, lr=0.05,
                      output_dir=str(out), cache_dir=str(out / "cache"), progress=False, figures=False, name="src")
    return train(cfg) / "checkpoints" / "best.pt"


def make_ferplus(root: Path, per_class: int = 6) -> Path:
    """Microsoft's FER+ layout (FER2013Train/Valid: 48x48 PNGs + label.csv with 10 votes), one
    clear majority per image, ``per_class`` train and 2 valid images for each of the 8 emotions."""
    import csv

    from PIL import Image

    rng = np.random.default_rng(0)
    n = 0
    for folder, count in (("FER2013Train", per_class), ("FER2013Valid", 2)):
        d = root / folder
        d.mkdir(parents=True)
        with open(d / "label.csv", "w", newline="") as f:
            w = csv.writer(f)
            for c in range(8):
                for _ in range(count):
                    name = f"fer{n:07d}.png"
                    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(d / name)
                    votes = [0] * 10
                    votes[c] = 10
                    w.writerow([name, "(0, 0, 48, 48)"] + votes)
                    n += 1
    return root
