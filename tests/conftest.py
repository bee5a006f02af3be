"""Shared fixtures: tiny training configurations that run in seconds on 2 CPU cores."""
import os

import matplotlib
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
