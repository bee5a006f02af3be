"""The model registry: named variants, each with its default arguments and the data settings
that travel with it (timm's way: every architecture file registers its own variants).

``build_model("esr9_div")`` builds ESR*-9; any default can be overridden: ``build_model(
"esr9_div", num_branches=4, width=0.25, gamma=5)``. ``build_model_from_config(model.config)``
rebuilds a model from a checkpoint's config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..diversity import DiversityConfig
from ..utils import Registry

@dataclass(frozen=True)
class ModelSpec:
    """A named variant: the class that builds it, its default arguments and data settings."""

    name: str
    cls: Callable[..., nn.Module]
    defaults: dict[str, Any]
    description: str
    #: what travels with the variant besides its constructor arguments: ``train_transform``,
    #: ``protocol`` (the growth/fine-tuning protocol by default) and ``label_space``
    data: dict[str, Any] = field(default_factory=dict)


_REGISTRY = Registry("model")

# flat override keys that configure the diversity term
_DIVERSITY_KEYS = {"gamma": "gamma", "diagonal": "diagonal", "reduction": "reduction",
                   "diversity_terms": "terms", "diversity_weight": "weight",
                   "diversity_normalize": "normalize"}


def register_model(name: str, cls, description: str, data: dict | None = None, **defaults) -> None:
    """Register a named variant (``defaults`` are the class's keyword arguments)."""
    _REGISTRY.add(name, ModelSpec(name, cls, defaults, description, dict(data or {})))


def list_models() -> list[str]:
    """Names of every registered variant."""
    return _REGISTRY.names()


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name`` (clear error listing the known names)."""
    return _REGISTRY.get(name)


def resolve_config(name: str, **overrides) -> dict[str, Any]:
    """Constructor arguments of ``name`` with ``overrides`` applied.

    Flat keys ``gamma``, ``diagonal``, ``reduction``, ``diversity_terms``,
    ``diversity_weight``, ``diversity_normalize`` edit the diversity config; ``diversity``
    may also be given whole (a dict or ``DiversityConfig``). Unknown keys are rejected.
    """
    spec = model_spec(name)
    cfg = dict(spec.defaults)
    div = dict(DiversityConfig.from_dict(cfg.get("diversity")).to_dict())
    if "diversity" in overrides:
        given = overrides.pop("diversity")
        div.update(given.to_dict() if isinstance(given, DiversityConfig) else dict(given or {}))
    for key, field_name in _DIVERSITY_KEYS.items():
        if key in overrides:
            div[field_name] = overrides.pop(key)
    allowed = set(_constructor_args(spec.cls))
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; expected some of "
                         f"{sorted(allowed | set(_DIVERSITY_KEYS) | {'diversity'})}")
    cfg.update(overrides)
    cfg["diversity"] = DiversityConfig.from_dict(div).to_dict()
    cfg["name"] = name
    return cfg


def _constructor_args(cls) -> list[str]:
    import inspect
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def build_model(name: str, **overrides) -> nn.Module:
    """Build the registered variant ``name`` with ``overrides`` (see :func:`resolve_config`)."""
    spec = model_spec(name)
    return spec.cls(**resolve_config(name, **overrides))


def build_model_from_config(config: dict) -> nn.Module:
    """Rebuild a model from its ``model.config`` (e.g. a checkpoint's).

    Options a config does not mention take the value they had before the option existed
    (the class's ``legacy_config``: e.g. an ESR* run written before ``cbam_position`` was added
    rebuilds with CBAM before the pooling, as it was trained), not today's default.
    """
    config = dict(config)
    name = config.pop("name")
    config.pop("family", None)
    for key, value in getattr(model_spec(name).cls, "legacy_config", {}).items():
        config.setdefault(key, value)
    return build_model(name, **config)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; BatchNorm buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
