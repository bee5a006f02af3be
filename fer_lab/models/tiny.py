"""TinyPair: an ensemble of small CNN learners, the smallest model that keeps the contract.

It exists to show (and test) that a new model is this one file: subclass
:class:`~fer_lab.models.base.FERModel`, implement the contract, register the variants; the
engine, Grad-CAM, the figures, the batch runner and the contract test then work unchanged.
Each learner is ``conv 3x3 -> ReLU -> max-pool 2 -> conv 3x3 -> ReLU`` and a linear head on
the pooled map; the decision is the mean softmax. The diversity terms compare the learners'
last feature maps, pooled over channels (``spatial``) and over positions (``channel``). Not
a model for results: it has no shared base and no attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..diversity import DiversityConfig
from .base import CamTarget, FERModel
from .common import LossOutput, diversity_loss, ensemble_from_logits, multi_head_ce
from .registry import register_model


@dataclass
class TinyPairOutput:
    """``logits`` ``(B, K)`` log mean softmax; ``learner_logits`` ``(L, B, K)``; ``features``
    ``(L, B, C, h, w)`` each learner's last map."""

    logits: torch.Tensor
    learner_logits: torch.Tensor
    features: torch.Tensor


class TinyPair(FERModel):
    """``num_learners`` independent small CNNs (``width`` channels, then ``2 * width``)."""

    family = "tiny"

    def __init__(self, num_learners: int = 2, num_classes: int = 8, width: int = 8, input_size: int = 48,
                 in_channels: int = 3, diversity: DiversityConfig | dict | None = None, name: str = "tiny_pair"):
        super().__init__()
        if int(num_learners) < 2:
            raise ValueError(f"num_learners={num_learners!r}: an ensemble needs at least 2 learners")
        self.name, self.num_learners, self.num_classes = name, int(num_learners), int(num_classes)
        self.width, self.input_size, self.in_channels = int(width), int(input_size), int(in_channels)
        self.diversity = diversity if isinstance(diversity, DiversityConfig) else DiversityConfig.from_dict(diversity)
        self.learner_nets = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
            for _ in range(self.num_learners))
        self.fcs = nn.ModuleList(nn.Linear(2 * width, num_classes) for _ in range(self.num_learners))

    @property
    def main_head(self) -> str:
        return "ensemble"

    @property
    def config(self) -> dict:
        return {"name": self.name, "family": self.family, "num_learners": self.num_learners,
                "num_classes": self.num_classes, "width": self.width, "input_size": self.input_size,
                "in_channels": self.in_channels, "diversity": self.diversity.to_dict()}

    def forward(self, x: torch.Tensor, return_all_attention: bool = False) -> TinyPairOutput:
        feats = torch.stack([net(x) for net in self.learner_nets])
        logits = torch.stack([fc(f.mean(dim=(2, 3))) for fc, f in zip(self.fcs, feats)])
        _, log_probs, _, _ = ensemble_from_logits(logits)
        return TinyPairOutput(logits=log_probs, learner_logits=logits, features=feats)

    def heads(self, out: TinyPairOutput) -> dict[str, torch.Tensor]:
        heads = {"ensemble": out.logits}
        heads.update({f"learner_{l + 1}": lg for l, lg in enumerate(out.learner_logits)})
        return heads

    def learners(self, out: TinyPairOutput) -> dict[str, torch.Tensor]:
        return {"spatial": out.features.mean(dim=2), "channel": out.features.mean(dim=(3, 4))}

    def loss(self, out: TinyPairOutput, target: torch.Tensor) -> LossOutput:
        ce = multi_head_ce(out.learner_logits, target)
        return diversity_loss(self.learners(out), self.diversity, ("spatial", "channel"), ce.sum(),
                              {f"learner_{l + 1}": c for l, c in enumerate(ce)})

    def cam_targets(self) -> dict[str, CamTarget]:
        return {f"learner_{l + 1}": CamTarget(net[-1]) for l, net in enumerate(self.learner_nets)}


_TINY_DATA = {"train_transform": "light_train", "protocol": "single", "label_space": "affectnet8"}
_tiny_common = dict(num_learners=2, num_classes=8, width=8, input_size=48, in_channels=3)
register_model("tiny_pair", TinyPair, "TinyPair: two small CNN learners (the contract's worked example)",
               _TINY_DATA, diversity={}, **_tiny_common)
register_model("tiny_pair_div", TinyPair, "TinyPair + spatial and channel feature diversity",
               _TINY_DATA, diversity={"terms": ["spatial", "channel"], "gamma": "median"}, **_tiny_common)
