"""What a run is configured with: :class:`TrainConfig`, a tree of five parts, each with its
defaults and checks next to what it configures, written to the run's ``config.json``:

- :class:`DataConfig` (``cfg.data``): dataset, files, labels, input size, augmentation;
- :class:`InitConfig` (``cfg.init``): initial weights from a user-given file;
- :class:`ProtocolConfig` (``cfg.protocol``): stages, epochs, per-stage rates, subsets;
- :class:`OptimConfig` (``cfg.optim``): optimiser, batch and learning-rate schedule;
- :class:`RuntimeConfig` (``cfg.runtime``): where and how the run executes.

Notebooks, sweeps, presets and the command line speak **flat names** (``epochs``, ``lr``,
``data_root``, ``branches``, ``gamma``): :data:`FLAT_NAMES` maps each flat name of a config
field to its place in the tree, and :data:`MODEL_OPTIONS` each flat name of a model option to
its constructor key; :func:`config_from_flat` builds a config from one flat dict with both,
``TrainConfig(epochs=3, lr=0.01)`` takes flat field names, and :meth:`TrainConfig.flat`
gives them back. ``python -m fer_lab train``'s options are generated from the fields
(:func:`cli_options`): the help text and choices below are the command line's.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .data.transforms import PRESETS as TRANSFORM_PRESETS
from .protocols import PROTOCOLS as _PROTOCOL_CLASSES

PROTOCOLS = ("auto", *_PROTOCOL_CLASSES)
LR_STEP_AT = ("end", "start")
OPTIMIZERS = ("sgd", "adam")
AMP_MODES = ("none", "bf16", "fp16")


def _opt(default=None, help: str = "", *, flat: str | None = None, choices=None, cli: dict | None = None,
         factory=None):
    """A config field: its default, its help text (the command line's), its flat name when it
    differs from the field's, its accepted values, and command-line specifics (``cli``:
    ``flag``, ``action`` and ``const``, ``parse``, ``default`` when the command line's
    default differs from the library's, ``skip``)."""
    metadata = {"help": help, "flat": flat, "choices": choices, "cli": cli or {}}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _positive_int(problems: list, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append(f"{name}={value!r}: expected an int >= 1")


def _choice(problems: list, name: str, value, choices, why: str = "") -> None:
    if value not in choices:
        problems.append(f"{name}={value!r}: expected one of {tuple(choices)}{why}")


def _subset(text: str):
    if str(text).lower() in ("all", "none"):
        return None
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"expected a positive int or 'all', got {text!r}") from None
    if n < 1:
        raise ValueError(f"expected a positive int or 'all', got {text!r}")
    return n


def _label_space(text: str):
    return None if str(text).lower() == "none" else text


@dataclass
class DataConfig:
    """The dataset and its input pipeline."""

    dataset: str = _opt("synthetic", "dataset name (synthetic needs no files)")
    root: str | None = _opt(None, "directory holding the dataset's files", flat="data_root")
    options: dict = _opt(help="dataset options, e.g. {'label_mode': 'majority'}", flat="data_options", factory=dict,
                         cli={"skip": True})
    label_space: str | None = _opt("auto", "'auto' (the model's), 'none' (dataset order), 'affectnet8' or "
                                           "'affectnet7'", cli={"parse": _label_space})
    image_size: int | None = _opt(None, "input side in px (default: the model's)")
    train_transform: str | None = _opt(None, "augmentation preset (default: the model's; light_batch augments "
                                             "whole batches)", choices=TRANSFORM_PRESETS)
    image_normalize: str | None = _opt(None, "ImageNet mean/std normalisation of the input (the RAF-DB scripts); "
                                             "not the diversity term's normalize", choices=(None, "imagenet"),
                                       cli={"flag": "--imagenet-normalize", "action": "store_const",
                                            "const": "imagenet"})
    random_erasing: bool = _opt(False, "append RandomErasing to the train transform")
    val_fraction: float = _opt(0.1, "share of train held out (stratified) for model selection when the dataset "
                                    "has no validation split")

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 8):
            p.append(f"image_size={self.image_size!r}: expected None (model default) or an int >= 8")
        if self.train_transform is not None:
            _choice(p, "train_transform", self.train_transform, TRANSFORM_PRESETS)
        _choice(p, "image_normalize", self.image_normalize, (None, "imagenet"))
        if not (0 < self.val_fraction < 1):
            p.append(f"val_fraction={self.val_fraction!r}: expected a fraction in (0, 1)")
        return p


@dataclass
class InitConfig:
    """Initial weights from a file the user supplies (loaded once into the fresh model)."""

    weights: str | None = _opt(None, "initialise the fresh model from this file or directory: the official ESR "
                                     "set (directory with Net-Base-Shared_Representations.pt, Net-Branch_1..L.pt), "
                                     "MA-Net's MS-Celeb-1M checkpoint, a torchvision ResNet-18 state dict (MA-Net's "
                                     "stem) or a fer_lab checkpoint (best.pt); nothing is downloaded",
                               flat="init_weights", cli={"metavar": "PATH"})
    partial: bool = _opt(False, "with init_weights: load the tensors that match and keep the rest as initialised "
                                "(otherwise any missing, unexpected or reshaped key is an error that lists them)",
                         flat="init_partial")
    new_heads: bool = _opt(False, "with init_weights: keep the model's own classifier heads (e.g. 7 RAF-DB classes "
                                  "from an 8-class AffectNet model)", flat="init_new_heads")
    channel_order: str = _opt("rgb", "official ESR weights: convert the first conv from the official BGR input to "
                                     "RGB (rgb, fer_lab's input everywhere) or keep BGR (then feed BGR images)",
                              flat="init_channel_order", choices=("rgb", "bgr"))

    def __post_init__(self):
        if self.weights is not None:
            self.weights = str(self.weights)        # a Path is stored (and compared on resume) as text

    def problems(self) -> list[str]:
        p: list[str] = []
        _choice(p, "init_channel_order", self.channel_order, ("rgb", "bgr"))
        return p


@dataclass
class ProtocolConfig:
    """How training is staged (:mod:`fer_lab.protocols`)."""

    name: str = _opt("auto", "esr_growth: one branch per stage from scratch (SPEC 3); esr_finetune: a trained "
                             "ensemble fine-tuned one branch per stage (needs init_weights); single: one stage, all "
                             "parameters; auto: the model's", flat="protocol", choices=PROTOCOLS)
    epochs: int = _opt(50, "epochs of the first (or only) stage")
    epochs_later: int = _opt(20, "epochs of each later ESR stage")
    lr_new: float | None = _opt(None, "later stages: the new branch's learning rate (default: lr, as the papers' "
                                      "0.1 and 0.1)")
    lr_old: float | None = _opt(None, "later stages: base and older branches' learning rate; esr_finetune's stage 1 "
                                      "also puts the other branches here (default: lr / 10, as the papers' 0.1 and "
                                      "0.01)")
    subset_per_class: int | None = _opt(5000, "class-balanced subset redrawn each stage: at most N items per "
                                              "class, or 'all'", cli={"parse": _subset})
    branch_init: str = _opt("random", "initialise a new ESR branch randomly or as a copy of the last one",
                            choices=("random", "copy"))

    def problems(self) -> list[str]:
        p: list[str] = []
        _choice(p, "protocol", self.name, PROTOCOLS)
        _positive_int(p, "epochs", self.epochs)
        _positive_int(p, "epochs_later", self.epochs_later)
        for key in ("lr_new", "lr_old"):
            if getattr(self, key) is not None:
                _learning_rate(p, key, getattr(self, key))
        n = self.subset_per_class
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            p.append(f"subset_per_class={n!r}: expected an int >= 1 or None (every item)")
        _choice(p, "branch_init", self.branch_init, ("random", "copy"))
        return p


def _learning_rate(problems: list, name: str, value) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        problems.append(f"{name}={value!r}: expected a finite learning rate >= 0")


@dataclass
class OptimConfig:
    """Optimiser, batch and learning-rate schedule (StepLR, rebuilt each stage)."""

    optimizer: str = _opt("sgd", "sgd (the papers') or adam (fewer epochs, for CPU-sized studies)",
                          choices=OPTIMIZERS)
    lr: float = _opt(0.1, "learning rate of the first stage (all parameters; base + branch 1 in esr_finetune)")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(0.0, "weight decay")
    batch_size: int = _opt(32, "training batch size")
    lr_step: int = _opt(10, "StepLR step size (epochs)")
    lr_gamma: float = _opt(0.5, "StepLR factor")
    lr_step_at: str = _opt("end", "step StepLR after each epoch (PyTorch's order) or before it (the public ESR "
                                  "scripts, whose first decay comes one epoch early)", choices=LR_STEP_AT)

    def problems(self) -> list[str]:
        p: list[str] = []
        _choice(p, "optimizer", self.optimizer, OPTIMIZERS)
        _learning_rate(p, "lr", self.lr)
        if not (0 <= self.momentum < 1):
            p.append(f"momentum={self.momentum!r}: expected a value in [0, 1)")
        if self.weight_decay < 0:
            p.append(f"weight_decay={self.weight_decay!r}: expected >= 0")
        _positive_int(p, "batch_size", self.batch_size)
        _positive_int(p, "lr_step", self.lr_step)
        if not (0 < self.lr_gamma <= 1):
            p.append(f"lr_gamma={self.lr_gamma!r}: expected a factor in (0, 1]")
        _choice(p, "lr_step_at", self.lr_step_at, LR_STEP_AT,
                " ('end': PyTorch's order, step after each epoch; 'start': the public ESR scripts, step before "
                "each epoch)")
        return p


@dataclass
class RuntimeConfig:
    """Where and how a run executes (``bench/RESULTS.md`` says which switches pay off where)."""

    output_dir: str = _opt("outputs/runs", "where run directories go")
    cache_dir: str | None = _opt("outputs/cache", "where decoded/rendered images are cached")
    seed: int = _opt(0, "seed of every random choice")
    deterministic: bool = _opt(False, "PyTorch deterministic algorithms (restored after the run)")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    num_workers: int = _opt(0, "DataLoader worker processes", cli={"flag": "--workers"})
    eval_batch_size: int = _opt(128, "evaluation batch size")
    channels_last: bool = _opt(True, "NHWC memory format: same numbers up to float round-off, faster "
                                     "convolutions on CPU and GPU", cli={"flag": "--no-channels-last"})
    amp: str = _opt("none", "autocast the training forward pass (the diversity term stays float32; fp16 uses a "
                            "gradient scaler)", choices=AMP_MODES)
    compile: bool = _opt(False, "torch.compile the training forward pass (recompiled when a branch is added)")
    distributed_similarity: str = _opt("global", "under torchrun: the diversity term's S over the global batch "
                                                 "(learner features all-gathered, the default) or over each rank's "
                                                 "share (per_rank)", choices=("global", "per_rank"))
    cbam_path: str = _opt("auto", "how CBAM trains: node (hand-written autograd node), plain (autograd on the plain "
                                  "formulas) or auto (the measured faster one for the device, "
                                  "fer_lab.models.cbam.FAST_PATH); same numbers up to round-off",
                          choices=("auto", "node", "plain"))
    compile_backend: str = _opt("inductor", "torch.compile backend")
    keep_freed_memory: bool = _opt(False, "on a CPU, glibc keeps freed memory for reuse instead of unmapping each "
                                          "large activation: faster steps, more resident memory, process-wide "
                                          "(fer_lab.utils.keep_freed_memory); off in the library, on from the "
                                          "command line (--release-freed-memory turns it off) and the demo",
                                   cli={"flag": "--release-freed-memory", "default": True})
    progress: bool = _opt(True, "progress bars", cli={"flag": "--no-progress"})
    figures: bool = _opt(True, "write the run's figures at the end", cli={"flag": "--no-figures"})

    def problems(self) -> list[str]:
        p: list[str] = []
        _positive_int(p, "eval_batch_size", self.eval_batch_size)
        _choice(p, "amp", self.amp, AMP_MODES)
        _choice(p, "cbam_path", self.cbam_path, ("auto", "node", "plain"))
        _choice(p, "distributed_similarity", self.distributed_similarity, ("global", "per_rank"))
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            p.append(f"num_workers={self.num_workers!r}: expected an int >= 0")
        return p


#: the parts of a TrainConfig, by attribute name
PARTS: dict[str, type] = {"data": DataConfig, "init": InitConfig, "protocol": ProtocolConfig, "optim": OptimConfig,
                          "runtime": RuntimeConfig}
#: fields at the top of the tree (flat name = field name)
_TOP = ("model", "model_options", "preset", "name")


def _flat_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flat") or f.name


#: flat name -> (part, field) for every field of every part: the one table the command line,
#: notebooks, sweeps and presets use (model options: :data:`MODEL_OPTIONS`)
FLAT_NAMES: dict[str, tuple[str, str]] = {_flat_name(f): (part, f.name) for part, cls in PARTS.items()
                                          for f in dataclasses.fields(cls)}
assert not set(FLAT_NAMES) & set(_TOP) and len(FLAT_NAMES) == sum(len(dataclasses.fields(c)) for c in PARTS.values())

#: flat names that may differ between an interrupted run and its resumption (where and how it
#: runs, not what it trains)
_VOLATILE = {"progress", "device", "num_workers", "figures", "eval_batch_size", "keep_freed_memory", "output_dir",
             "cache_dir", "cbam_path"}


@dataclass(init=False)
class TrainConfig:
    """Everything a run needs; written to the run's ``config.json`` as the tree below.

    ``model`` (a registered name) with ``model_options`` (constructor overrides such as
    ``num_branches``, ``width``, ``gamma``, ``diagonal``, ``diversity_terms``), ``preset``
    (the preset the run started from, :mod:`fer_lab.presets`; ``config.json`` lists where the
    run differs from it), ``name`` (the run directory's; default
    ``<model>-<dataset>-s<seed>``), and the parts :attr:`data`, :attr:`init`,
    :attr:`protocol`, :attr:`optim`, :attr:`runtime` (see their classes for every field).

    Construct it from flat names (``TrainConfig(model="esr9", epochs=3, lr=0.01,
    data_root="/data")``), from parts (``TrainConfig(optim=OptimConfig(lr=0.01))``), or both;
    :meth:`flat` and :meth:`replace` work in flat names too.
    """

    model: str
    model_options: dict
    preset: str | None
    name: str | None
    data: DataConfig
    init: InitConfig
    protocol: ProtocolConfig
    optim: OptimConfig
    runtime: RuntimeConfig

    def __init__(self, model: str = "esr9_div", model_options: dict | None = None, preset: str | None = None,
                 name: str | None = None, *, data: DataConfig | None = None, init: InitConfig | None = None,
                 optim: OptimConfig | None = None, runtime: RuntimeConfig | None = None, **flat):
        # ``protocol`` is both a part and a flat name (the protocol's name): a ProtocolConfig is the part
        protocol = flat.pop("protocol", None)
        if isinstance(protocol, ProtocolConfig):
            parts = {"protocol": protocol}
        else:
            parts = {}
            if protocol is not None:
                flat["protocol"] = protocol
        parts.update({k: v for k, v in (("data", data), ("init", init), ("optim", optim), ("runtime", runtime))
                      if v is not None})
        unknown = sorted(set(flat) - set(FLAT_NAMES))
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; expected some of "
                             f"{sorted([*_TOP, *FLAT_NAMES])}")
        per_part: dict[str, dict] = {p: {} for p in PARTS}
        for key, value in flat.items():
            part, name_ = FLAT_NAMES[key]
            per_part[part][name_] = value
        for part, cls in PARTS.items():
            given = parts.get(part)
            if given is not None and not isinstance(given, cls):
                raise TypeError(f"{part}={given!r}: expected a {cls.__name__}")
            value = dataclasses.replace(given, **per_part[part]) if given is not None else cls(**per_part[part])
            setattr(self, part, value)
        self.model = model
        self.model_options = dict(model_options or {})
        self.preset = preset
        self.name = name
        problems = [p for part in PARTS for p in getattr(self, part).problems()]
        if problems:
            raise ValueError("invalid training configuration:\n  " + "\n  ".join(problems))

    # ---- flat names -------------------------------------------------------------------------
    def flat(self) -> dict:
        """Every field under its flat name (``{"model": ..., "epochs": ..., "data_root": ...}``)."""
        out = {k: getattr(self, k) for k in _TOP}
        out["model_options"] = dict(self.model_options)
        for key, (part, name_) in FLAT_NAMES.items():
            value = getattr(getattr(self, part), name_)
            out[key] = dict(value) if isinstance(value, dict) else value
        return out

    def resolved(self) -> "TrainConfig":
        """A copy with the derived defaults filled in: ``lr_new = lr`` and ``lr_old = lr / 10``
        where they are ``None`` (so ``--optimizer adam --lr 1e-3`` trains later stages at 1e-3
        and 1e-4, not at SGD's 0.1 and 0.01). The engine writes this to ``config.json``."""
        lr = self.optim.lr
        return self.replace(lr_new=lr if self.protocol.lr_new is None else self.protocol.lr_new,
                            lr_old=lr / 10 if self.protocol.lr_old is None else self.protocol.lr_old)

    def replace(self, **flat) -> "TrainConfig":
        """A copy with the given flat-named fields changed."""
        return TrainConfig(**{**self.flat(), **flat})

    def to_dict(self) -> dict:
        """The tree as JSON-able dicts (what ``config.json`` holds under ``"train"``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From :meth:`to_dict`'s tree, or from flat names (runs written before the tree, config
        files, presets). Unknown keys are an error that lists the known ones."""
        d = dict(d)
        if any(isinstance(d.get(part), dict) for part in PARTS if part != "protocol") \
                or isinstance(d.get("protocol"), dict):
            flat = {k: d.pop(k) for k in _TOP if k in d}
            for part, pcls in PARTS.items():
                sub = dict(d.pop(part, None) or {})
                names = {f.name: _flat_name(f) for f in dataclasses.fields(pcls)}
                unknown = sorted(set(sub) - set(names))
                if unknown:
                    raise ValueError(f"unknown {part} option(s) {unknown}; expected some of {sorted(names)}")
                flat.update({names[k]: v for k, v in sub.items()})
            if d:
                raise ValueError(f"unknown training option(s) {sorted(d)}; expected {sorted([*_TOP, *PARTS])}")
            return cls(**flat)
        if "normalize" in d and "image_normalize" not in d:       # the field's name in runs before 2026-12
            d["image_normalize"] = d.pop("normalize")
        return cls(**d)

    @classmethod
    def from_preset(cls, preset: str, /, **overrides) -> "TrainConfig":
        """The preset ``preset`` (:data:`fer_lab.presets.PRESETS`) with ``overrides`` (flat names,
        ``name`` included) on top; ``model_options`` and ``data_options`` overrides are merged
        into the preset's."""
        from .presets import preset_fields

        return cls.from_dict(preset_fields(preset, overrides))

    def describe(self) -> str:
        """One line: what trains on what, how, and where the run goes (notebooks print this
        instead of the whole config; ``config.json`` holds everything)."""
        d, p, o = self.data, self.protocol, self.optim
        options = ", ".join(f"{k}={v}" for k, v in self.model_options.items())
        epochs = f"{p.epochs}" + ("" if p.name == "single" else f" + {p.epochs_later}/stage")
        return (f"{self.model}{f' ({options})' if options else ''} on {d.dataset}"
                f"{f' ({d.image_size} px)' if d.image_size else ''}; protocol {p.name}, {o.optimizer} lr {o.lr:g}, "
                f"{epochs} epochs, batch {o.batch_size}, seed {self.runtime.seed}"
                f"{f', preset {self.preset}' if self.preset else ''} -> {Path(self.runtime.output_dir) / self.run_name}")

    @property
    def run_name(self) -> str:
        return self.name or f"{self.model}-{self.data.dataset}-s{self.runtime.seed}"


def flat_defaults() -> dict:
    """Every config field's default under its flat name."""
    return TrainConfig().flat()


#: Flat names (notebook parameters, sweep grids, the command line) of model options -> model constructor keys.
MODEL_OPTIONS = {"branches": "num_branches", "width": "width", "attention": "attention", "gamma": "gamma",
                 "diagonal": "diagonal", "reduction": "reduction", "diversity_terms": "diversity_terms",
                 "normalize": "diversity_normalize", "diversity_weight": "diversity_weight",
                 "diversity_source": "diversity_source", "num_classes": "num_classes",
                 "chain_order": "chain_order", "cbam_position": "cbam_position", "cbam_reduction": "cbam_reduction",
                 "cbam_init": "cbam_init", "decision": "decision",
                 "diversity_scope": "diversity_scope", "channel_term_input": "channel_term_input",
                 "branch_bn_train_at_test": "branch_bn_train_at_test"}
assert not set(MODEL_OPTIONS) & set(FLAT_NAMES)


def config_from_flat(**flat) -> TrainConfig:
    """A :class:`TrainConfig` from one flat dict of parameters (a notebook's parameters cell,
    a sweep's grid point).

    Keys of :data:`MODEL_OPTIONS` (``branches``, ``width``, ``gamma``, ``diagonal``,
    ``diversity_terms``, ``normalize``, ...) become ``model_options`` - ``None`` keeps the
    variant's default; ``run_name`` is the run's ``name``; ``train_options`` (a dict of
    further flat-named fields, e.g. what a sweep's preset sets beyond the notebook's
    parameters) is applied last; everything else must be a flat name of :data:`FLAT_NAMES`.
    Unknown keys are rejected with the list of known ones.
    """
    flat = dict(flat)
    extra = dict(flat.pop("train_options", None) or {})
    model_options = {**(flat.pop("model_options", None) or {}), **(extra.pop("model_options", None) or {})}
    for key, target in MODEL_OPTIONS.items():
        value = flat.pop(key, None)
        if value is not None:
            model_options[target] = value
    if "run_name" in flat:
        flat["name"] = flat.pop("run_name")
    flat.update(extra)
    known = {*_TOP, *FLAT_NAMES}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; expected training options {sorted(known)} "
                         f"or model options {sorted(MODEL_OPTIONS)}")
    return TrainConfig(model_options=model_options, **flat)


# ---- the command line ------------------------------------------------------------------------
_GROUP_TITLES = {"data": "data", "init": "initial weights", "protocol": "protocol", "optim": "optimiser and schedule",
                 "runtime": "run"}


def cli_options() -> list[tuple[str, list[tuple[str, dict]]]]:
    """``[(group title, [(flag, argparse keyword arguments)])]`` for every config field the
    command line sets, generated from the fields: flag ``--flat-name`` (or the field's own),
    ``dest`` the flat name, default the field's (or the command line's own), help and choices
    from the field. Booleans that default to true get a ``--no-...`` flag."""
    groups = []
    for part, cls in PARTS.items():
        hints = typing.get_type_hints(cls)
        options = []
        for f in dataclasses.fields(cls):
            cli = f.metadata["cli"]
            if cli.get("skip"):
                continue
            flat = _flat_name(f)
            default = cli.get("default", f.default)
            kw: dict = {"dest": flat, "help": f.metadata["help"]}
            flag = cli.get("flag") or "--" + flat.replace("_", "-")
            if hints[f.name] is bool:
                kw.update(action="store_false" if default else "store_true", default=default)
            elif cli.get("action") == "store_const":
                kw.update(action="store_const", const=cli["const"], default=default)
            else:
                kw["default"] = default
                if f.metadata["choices"] is not None:
                    kw["choices"] = f.metadata["choices"]
                else:
                    kw["type"] = cli.get("parse") or _scalar_type(hints[f.name])
                if "metavar" in cli:
                    kw["metavar"] = cli["metavar"]
            options.append((flag, kw))
        groups.append((_GROUP_TITLES[part], options))
    return groups


def _scalar_type(hint):
    """``int`` for ``int`` and ``int | None``, likewise ``float``; ``str`` otherwise."""
    args = typing.get_args(hint) or (hint,)
    for t in (int, float):
        if t in args:
            return t
    return str
