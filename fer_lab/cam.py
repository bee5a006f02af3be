"""Grad-CAM per learner (ESR branch, MA-Net branch) through pytorch-grad-cam.

A fer_lab model returns a dataclass, not logits, so :class:`HeadLogits` wraps it to
return one head's scores; :func:`grad_cam` runs pytorch-grad-cam's ``GradCAM`` on that
head with one target class per image, at the layer the model names for it
(``model.cam_targets()``, with its reshape transform), and restores the model's train/eval mode afterwards. This file
computes maps; drawing them is :mod:`fer_lab.viz`'s job.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from .models.common import NON_DIFFERENTIABLE_HEADS


class HeadLogits(nn.Module):
    """``forward(x) -> (B, K)`` scores of one head of a fer_lab model (``model.heads(out)[head]``)."""

    def __init__(self, model: nn.Module, head: str):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = self.model.heads(self.model(x))
        if self.head not in heads:
            raise KeyError(f"model has no head {self.head!r}; heads: {sorted(heads)}")
        if self.head in NON_DIFFERENTIABLE_HEADS:
            raise ValueError(f"head {self.head!r} is a vote and carries no gradient; Grad-CAM needs a "
                             f"differentiable head (e.g. the ensemble's or a branch's)")
        return heads[self.head]


@torch.enable_grad()
def grad_cam(model: nn.Module, images: torch.Tensor, head: str, targets: Sequence[int] | None = None,
             layer: str | None = None) -> np.ndarray:
    """Grad-CAM of ``head`` for each image: ``images`` ``(B, C, H, W)`` -> ``(B, H, W)`` in ``[0, 1]``.

    ``targets``: one class per image (default: the head's own prediction). ``layer``: a key of
    ``model.cam_targets()`` (default: ``model.cam_target_for(head)``). Runs in eval mode; the model's
    previous train/eval mode is restored afterwards.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layers = model.cam_targets()
    layer = layer or model.cam_target_for(head)
    if layer not in layers:
        raise KeyError(f"model has no Grad-CAM layer {layer!r}; layers: {sorted(layers)}")
    was_training = model.training
    wrapper = HeadLogits(model, head)
    device = next(model.parameters()).device
    x = images.to(device)
    try:
        model.eval()
        if targets is None:
            with torch.no_grad():
                targets = wrapper(x).argmax(dim=1).tolist()
        if len(targets) != x.shape[0]:
            raise ValueError(f"targets: one class per image expected ({x.shape[0]}), got {len(targets)}")
        target = layers[layer]
        with GradCAM(model=wrapper, target_layers=[target.module], reshape_transform=target.reshape_transform) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        model.train(was_training)
    return np.asarray(maps, dtype=np.float32)


def grad_cam_per_learner(model: nn.Module, images: torch.Tensor, targets: Sequence[int] | None = None,
                         heads: Sequence[str] | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """:func:`grad_cam` for every learner head (ESR: ``branch_1..L`` and ``ensemble``), the same
    ``targets`` for all (default: each head's own prediction). Returns ``{head: (B, H, W)}``;
    ``progress``: a bar over the heads."""
    if heads is None:
        with torch.no_grad():
            was = model.training
            model.eval()
            names = list(model.heads(model(images[:1].to(next(model.parameters()).device))))
            model.train(was)
        heads = [h for h in names if h not in NON_DIFFERENTIABLE_HEADS]
    from tqdm.auto import tqdm

    return {h: grad_cam(model, images, h, targets) for h in tqdm(heads, desc="Grad-CAM", disable=not progress)}
