"""Training protocols: the stages of a run, the model each stage starts from, which
parameters train at which learning rate, and which branches enter the loss.

The engine (:mod:`fer_lab.train`) asks a :class:`Protocol` four things and never checks
which one it is running:

- :meth:`Protocol.stages`: the plan (epochs, learners in the loss, learning rates);
- :meth:`Protocol.start_config`: the model configuration a fresh run builds (before any
  ``init_weights`` are loaded into it);
- :meth:`Protocol.begin_stage`: the model a stage trains, given the model it starts from
  (the fresh model for stage 1, the previous stage's best checkpoint afterwards);
- :meth:`Protocol.param_groups`: the optimiser's parameter groups for a stage.

Implementations (``PROTOCOLS``):

- ``single``: one stage, every parameter at ``lr`` (MA-Net; an ESR trained jointly).
- ``esr_growth`` (SPEC section 3, ESR on AffectNet from scratch): stage 1 trains base +
  branch 1 at ``lr``; each later stage adds a branch (``branch_init``) to the previous
  stage's best model and trains everything, the new branch at ``lr_new``, the base and
  the older branches at ``lr_old``.
- ``esr_finetune`` (ESR fine-tuned from an AffectNet-trained ensemble, the official
  ``main_fer_plus.py`` and the diversity paper's ``esr_ferplus.py`` / ``esr_rafdb.py``):
  every branch is loaded from ``init_weights`` at the start; stage ``k`` puts the first
  ``k`` branches in the cross-entropy and the vote (the model's ``active_branches``) and
  trains the base and branch 1 (stage 1) or branch ``k`` (later stages) at ``lr`` / ``lr_new``
  and everything else at ``lr_old``. Which branches the diversity term compares is the
  model's ``diversity_scope``: ``"all"`` (the authors' scripts: all L from stage 1) or
  ``"active"`` (the first ``k``).

This file decides *what* trains; running epochs, recording and checkpointing is the
engine's business.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .utils import derive_seed, set_seed

__all__ = ["Stage", "Protocol", "Single", "ESRGrowth", "ESRFinetune", "PROTOCOLS", "make_protocol"]


@dataclass(frozen=True)
class Stage:
    """One stage of a protocol.

    ``index`` (0-based), ``epochs``, ``branches`` (ESR: branches in the loss and the decision
    during the stage; ``None`` for models without branches), ``lrs`` (learning rate of each
    parameter group, by the group's name).
    """

    index: int
    epochs: int
    branches: int | None
    lrs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Protocol:
    """Base class of protocols; its own behaviour is the ``single`` protocol's (one stage,
    every parameter at ``cfg.optim.lr``), which subclasses change where they differ.

    ``cfg`` is the run's :class:`~fer_lab.train.TrainConfig` (epochs, learning rates, seed,
    ``branch_init``); ``model_config`` the resolved constructor arguments of the model.
    """

    name = "single"
    #: what the protocol reproduces (for ``config.json`` and ``python -m fer_lab train --help``)
    description = "one stage, every parameter at lr"

    def __init__(self, cfg, model_config: dict):
        self.cfg = cfg.resolved()       # later-stage rates derived from lr where not given
        self.model_config = dict(model_config)
        self.check()

    def check(self) -> None:
        """Raise ``ValueError`` when the run cannot follow this protocol."""

    def stages(self) -> list[Stage]:
        return [Stage(0, self.cfg.protocol.epochs, self.model_config.get("num_branches"),
                      {"all": self.cfg.optim.lr})]

    def start_config(self) -> dict:
        """Constructor arguments of the model a fresh run builds."""
        return dict(self.model_config)

    def begin_stage(self, model: nn.Module, stage: Stage) -> nn.Module:
        """The model ``stage`` trains, made from ``model`` (the fresh model for the first
        stage, the previous stage's best checkpoint for later ones)."""
        return model

    def param_groups(self, model: nn.Module, stage: Stage) -> list[dict]:
        """``[{"params": [...], "lr": float, "name": str}, ...]`` for the optimiser."""
        return [{"params": list(model.parameters()), "lr": stage.lrs["all"], "name": "all"}]

    def describe(self) -> dict[str, Any]:
        """JSON-able summary written to the run's ``config.json``."""
        return {"name": self.name, "description": self.description,
                "stages": [s.to_dict() for s in self.stages()]}


class Single(Protocol):
    """One stage, every parameter at ``lr``."""


def _groups(named: dict[str, tuple[list, float]]) -> list[dict]:
    """Parameter groups from ``{name: (params, lr)}``, leaving out empty ones."""
    return [{"params": params, "lr": lr, "name": name} for name, (params, lr) in named.items() if params]


def _split(model: nn.Module, chosen: list[nn.Module]) -> tuple[list, list]:
    """``(parameters of the chosen modules, every other parameter of the model)``."""
    mine = [p for m in chosen for p in m.parameters()]
    ids = {id(p) for p in mine}
    return mine, [p for p in model.parameters() if id(p) not in ids]


class _ESRProtocol(Protocol):
    def check(self) -> None:
        if "num_branches" not in self.model_config:
            raise ValueError(f"protocol={self.name!r} needs an ESR model (branches to train one at a time); "
                             f"{self.model_config.get('name')} has none")


class ESRGrowth(_ESRProtocol):
    """Grow the ensemble one branch per stage (SPEC section 3)."""

    name = "esr_growth"
    description = ("ESR from scratch (official main_affectnet_discrete.py, the paper's esr_affectnet.py): "
                   "stage 1 base + branch 1 at lr; each later stage adds a branch, new branch at lr_new, "
                   "base and older branches at lr_old")

    def stages(self) -> list[Stage]:
        cfg = self.cfg
        first = Stage(0, cfg.protocol.epochs, 1, {"all": cfg.optim.lr})
        later = {"base+old branches": cfg.protocol.lr_old, "new branch": cfg.protocol.lr_new}
        return [first] + [Stage(s, cfg.protocol.epochs_later, s + 1, dict(later))
                          for s in range(1, self.model_config["num_branches"])]

    def start_config(self) -> dict:
        return dict(self.model_config, num_branches=1)

    def begin_stage(self, model, stage):
        if stage.index > 0:
            set_seed(derive_seed(self.cfg.runtime.seed, "branch", stage.index))
            model.add_branch(self.cfg.protocol.branch_init)
        return model

    def param_groups(self, model, stage):
        if stage.index == 0:
            return super().param_groups(model, stage)
        new, old = _split(model, [model.branches[-1]])
        return _groups({"base+old branches": (old, stage.lrs["base+old branches"]),
                        "new branch": (new, stage.lrs["new branch"])})


class ESRFinetune(_ESRProtocol):
    """Fine-tune a trained L-branch ensemble one branch per stage (official ``main_fer_plus.py``)."""

    name = "esr_finetune"
    description = ("ESR fine-tuned from an AffectNet-trained ensemble (official main_fer_plus.py, the paper's "
                   "esr_ferplus.py / esr_rafdb.py): all L branches loaded at the start; stage k trains with the "
                   "first k branches in the loss and the vote, base + branch 1 (stage 1) or branch k (later) at "
                   "lr / lr_new, everything else at lr_old")

    def check(self) -> None:
        super().check()
        if not self.cfg.init.weights:
            raise ValueError("protocol='esr_finetune' fine-tunes a trained ESR: give init_weights (a fer_lab "
                             "checkpoint of an AffectNet-trained ESR, or the official ESR-9 directory with "
                             "Net-Base-Shared_Representations.pt and Net-Branch_1..L.pt); nothing is downloaded")

    def stages(self) -> list[Stage]:
        cfg = self.cfg
        first = Stage(0, cfg.protocol.epochs, 1, {"base+branch 1": cfg.optim.lr, "other branches": cfg.protocol.lr_old})
        later = {"base+other branches": cfg.protocol.lr_old, "new branch": cfg.protocol.lr_new}
        return [first] + [Stage(s, cfg.protocol.epochs_later, s + 1, dict(later))
                          for s in range(1, self.model_config["num_branches"])]

    def begin_stage(self, model, stage):
        model.active_branches = stage.branches
        return model

    def param_groups(self, model, stage):
        if stage.index == 0:
            first, rest = _split(model, [model.base, model.branches[0]])
            return _groups({"base+branch 1": (first, stage.lrs["base+branch 1"]),
                            "other branches": (rest, stage.lrs["other branches"])})
        new, rest = _split(model, [model.branches[stage.index]])
        return _groups({"base+other branches": (rest, stage.lrs["base+other branches"]),
                        "new branch": (new, stage.lrs["new branch"])})


PROTOCOLS: dict[str, type[Protocol]] = {"single": Single, "esr_growth": ESRGrowth, "esr_finetune": ESRFinetune}


def make_protocol(name: str, cfg, model_config: dict) -> Protocol:
    """The protocol ``name`` of :data:`PROTOCOLS` for a run (clear error for unknown names)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; expected one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name](cfg, model_config)
