"""The contract every fer_lab model keeps, and the check that every registered model runs.

A model is an ``nn.Module`` subclassing :class:`FERModel`. The training engine, Grad-CAM
(:mod:`fer_lab.cam`), the analyses (:mod:`fer_lab.analysis`), the figures (:mod:`fer_lab.viz`)
and the notebooks use only what is listed here, never attribute names of a particular
output:

- ``model(x, return_all_attention=False)`` returns an output dataclass (the model's own);
  ``return_all_attention=True`` also keeps what :meth:`FERModel.attention_maps` needs for
  layers other than ``"last"``;
- ``model.loss(out, target)`` -> :class:`~fer_lab.models.common.LossOutput` (``target``:
  ``(B,)`` class indices or ``(B, K)`` class probabilities);
- ``model.heads(out)`` -> ``{head: (B, K) scores}``, the head's decision is the argmax
  (a vote head returns vote shares' logs: still ``(B, K)``); ``model.main_head`` names the
  head that model selection and reports use;
- ``model.learners(out)`` -> ``{term: (L, B, ...)}``: the pooled learner features each
  diversity term compares;
- ``model.attention_layers()`` -> the layer names :meth:`~FERModel.attention_maps` accepts
  (``"last"`` first; empty for a model without attention); ``model.attention_maps(out,
  layer)`` -> ``{learner: (B, h, w)}`` face-aligned spatial maps;
  ``model.channel_attention_maps(out)`` -> ``{learner: (B, C)}`` (empty without channel attention);
- ``model.cam_targets()`` -> ``{name: CamTarget}``: the layers Grad-CAM reads, per learner
  (with the reshape transform pytorch-grad-cam needs for token outputs);
  ``model.cam_target_for(head)`` picks one for a head;
- ``model.config`` is a JSON-able dict that ``build_model_from_config`` inverts; ``model.family``
  names the architecture.

:func:`check_contract` exercises all of it on one batch and raises ``AssertionError`` naming
the method that broke it; ``tests/test_contract.py`` runs it on every registered model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .common import LossOutput


@dataclass(frozen=True)
class CamTarget:
    """A layer Grad-CAM reads: its module and, for outputs that are not ``(B, C, h, w)`` maps
    (tokens of a transformer), the ``reshape_transform`` pytorch-grad-cam applies to them."""

    module: nn.Module
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None


class FERModel(nn.Module):
    """Base class of fer_lab models: the contract of this module's docstring.

    Subclasses implement ``forward``, :attr:`main_head`, :attr:`config`, :meth:`loss`,
    :meth:`heads`, :meth:`learners` and :meth:`cam_targets`; models with spatial attention
    also :meth:`attention_layers` and :meth:`attention_maps`.
    """

    family: str = "model"

    @property
    def main_head(self) -> str:
        raise NotImplementedError

    @property
    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, out, target: torch.Tensor) -> LossOutput:
        raise NotImplementedError

    def heads(self, out) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def learners(self, out) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def cam_targets(self) -> dict[str, CamTarget]:
        raise NotImplementedError

    def attention_layers(self) -> list[str]:
        """Layer names :meth:`attention_maps` accepts; ``"last"`` first. None without attention."""
        return []

    def attention_maps(self, out, layer: str = "last") -> dict[str, torch.Tensor]:
        """``{learner: (B, h, w)}`` spatial attention of ``layer``, face-aligned."""
        raise KeyError(f"{type(self).__name__} has no attention layer {layer!r}; "
                       f"choices: {self.attention_layers()}")

    def channel_attention_maps(self, out) -> dict[str, torch.Tensor]:
        """``{learner: (B, C)}`` channel attention of each learner's last CBAM; empty without."""
        return {}

    def _unknown_layer(self, layer: str) -> KeyError:
        return KeyError(f"unknown attention layer {layer!r}; choices: {self.attention_layers()}")

    def cam_target_for(self, head: str) -> str:
        """The :meth:`cam_targets` key Grad-CAM uses for ``head``: the head's own learner when it
        has one (``branch_3`` -> ``branch_3``), else the first (shared) layer."""
        targets = self.cam_targets()
        return head if head in targets else next(iter(targets))


def check_contract(model: FERModel, x: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    """Run every part of the contract on one batch; ``AssertionError`` names what broke.

    Returns what it saw (head names, learner shapes, attention layers, CAM targets) so a test
    can compare it with the model's own description.
    """
    B = x.shape[0]
    model.train()
    out = model(x)
    loss = model.loss(out, target)
    assert isinstance(loss, LossOutput), f"loss() returned {type(loss).__name__}, expected LossOutput"
    assert loss.total.dim() == 0 and loss.total.requires_grad, "loss().total must be a scalar with a gradient"
    loss.total.backward()
    assert any(p.grad is not None for p in model.parameters()), "loss().total reached no parameter"
    model.eval()
    with torch.no_grad():
        out = model(x, return_all_attention=True)
        heads = model.heads(out)
    assert model.main_head in heads, f"main_head {model.main_head!r} is not among heads() {sorted(heads)}"
    K = None
    for name, score in heads.items():
        assert score.dim() == 2 and score.shape[0] == B, f"heads()[{name!r}] is {tuple(score.shape)}, expected (B, K)"
        K = score.shape[1] if K is None else K
        assert score.shape[1] == K, f"heads() disagree on the number of classes ({name!r}: {score.shape[1]} vs {K})"
    learners = model.learners(out)
    for term, f in learners.items():
        assert f.dim() >= 3 and f.shape[1] == B and f.shape[0] >= 2, \
            f"learners()[{term!r}] is {tuple(f.shape)}, expected (L >= 2, B, ...)"
    layers = model.attention_layers()
    assert not layers or layers[0] == "last", f"attention_layers() must start with 'last', got {layers}"
    maps = {}
    for layer in layers:
        maps[layer] = model.attention_maps(out, layer)
        assert maps[layer], f"attention_maps(out, {layer!r}) is empty"
        for learner, m in maps[layer].items():
            assert m.dim() == 3 and m.shape[0] == B, \
                f"attention_maps(out, {layer!r})[{learner!r}] is {tuple(m.shape)}, expected (B, h, w)"
    channel = model.channel_attention_maps(out)
    assert bool(channel) <= bool(layers), "channel_attention_maps() without attention_layers()"
    for learner, c in channel.items():
        assert c.dim() == 2 and c.shape[0] == B, \
            f"channel_attention_maps()[{learner!r}] is {tuple(c.shape)}, expected (B, C)"
    try:
        model.attention_maps(out, "no such layer")
    except KeyError:
        pass
    else:
        raise AssertionError("attention_maps() accepted an unknown layer instead of raising KeyError")
    targets = model.cam_targets()
    assert targets and all(isinstance(t, CamTarget) for t in targets.values()), "cam_targets() must map names to CamTarget"
    for head in heads:
        assert model.cam_target_for(head) in targets, f"cam_target_for({head!r}) is not a cam_targets() key"
    assert isinstance(model.config, dict) and model.config.get("family", model.family) == model.family
    return {"heads": sorted(heads), "classes": K, "learners": {t: tuple(f.shape) for t, f in learners.items()},
            "attention_layers": layers, "attention_learners": {k: sorted(v) for k, v in maps.items()},
            "channel_learners": sorted(channel),
            "cam_targets": sorted(targets)}
