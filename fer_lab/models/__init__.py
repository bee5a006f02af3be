"""fer_lab's models: ESR (ensembles with shared representations) and MA-Net, each with its
diversified variants, registered by name next to its architecture.

``build_model("esr9_div")`` builds ESR*-9 (CBAM + spatial + channel diversity, 96 px,
8 classes, gamma 10); any default can be overridden: ``build_model("esr9_div",
num_branches=4, width=0.25, gamma=5)``. ``build_model_from_config(model.config)``
rebuilds a model from a checkpoint's config. MA-Net: ``build_model("manet")`` (7 classes,
224 px) and ``build_model("manet_div")`` (MA-Net* with patch spatial, patch channel and
branch diversity); initial weights from files: :mod:`fer_lab.models.pretrained`.

What a model must provide (and the training engine, Grad-CAM, the analyses and the
notebooks rely on): :mod:`fer_lab.models.base`. A new model is one file that subclasses
:class:`~fer_lab.models.base.FERModel` and calls :func:`register_model`, imported here.
"""
from __future__ import annotations

from .base import CamTarget, FERModel, check_contract
from .cbam import CBAM
from .esr import ESR, ESROutput
from .manet import MANet, MANetOutput
from .tiny import TinyPair
from .registry import (ModelSpec, build_model, build_model_from_config, count_parameters, list_models, model_spec,
                       register_model, resolve_config)

__all__ = ["CBAM", "ESR", "ESROutput", "MANet", "MANetOutput", "TinyPair", "FERModel", "CamTarget", "check_contract",
           "ModelSpec", "build_model", "build_model_from_config", "list_models", "model_spec", "register_model",
           "resolve_config", "count_parameters"]
