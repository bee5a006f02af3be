"""What a run is configured with: :class:`TrainConfig` (written to the run's ``config.json``),
the flat parameter names notebooks and sweeps use (:data:`MODEL_OPTIONS`,
:func:`config_from_flat`), and the choices each option accepts."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .protocols import PROTOCOLS as _PROTOCOL_CLASSES


PROTOCOLS = ("auto", *_PROTOCOL_CLASSES)
LR_STEP_AT = ("end", "start")
OPTIMIZERS = ("sgd", "adam")
AMP_MODES = ("none", "bf16", "fp16")
# config keys that may differ between an interrupted run and its resumption
_VOLATILE = {"progress", "device", "num_workers", "figures", "eval_batch_size", "keep_freed_memory", "output_dir",
             "cache_dir"}


@dataclass
class TrainConfig:
    """Everything a run needs; written to the run's ``config.json``.

    What: ``model`` (a registered name) with ``model_options`` (overrides such as
    ``num_branches``, ``width``, ``gamma``, ``diagonal``, ``diversity_terms``), ``dataset``
    with ``data_root`` and ``data_options``, ``label_space`` (``"auto"``: the model
    variant's, e.g. ``affectnet8`` for ESR). Input pipeline: ``image_size`` (default: the
    model's), ``train_transform`` (a preset of :mod:`fer_lab.data.transforms`; default: the
    model's), ``image_normalize`` (``"imagenet"``: ImageNet mean/std, the RAF-DB scripts;
    not the diversity term's ``normalize``), ``random_erasing``.

    Protocol: ``protocol`` (``auto`` = the variant's: ``esr_growth`` for ESR, ``single``
    otherwise; ``esr_finetune`` fine-tunes a trained ESR; see :mod:`fer_lab.protocols`),
    ``epochs`` (first/only stage), ``epochs_later`` (each later ESR stage), ``lr`` (first
    stage: all parameters, or base + branch 1 in ``esr_finetune``), ``lr_new``/``lr_old``
    (the branch a later stage trains / everything else; ``esr_finetune``'s stage 1 also
    puts the other branches at ``lr_old``), StepLR ``lr_step``/``lr_gamma``, rebuilt each
    stage, stepped at each epoch's ``end`` (PyTorch's order) or ``start`` (``lr_step_at``:
    the public ESR scripts call ``scheduler.step()`` before each epoch, so the first decay
    comes one epoch early), ``optimizer`` (``sgd``, the papers'; ``adam`` converges in
    fewer epochs, for CPU-sized studies), SGD ``momentum``, ``weight_decay``, ``batch_size``,
    ``subset_per_class`` (class-balanced subset redrawn each stage; ``None`` = all),
    ``branch_init`` (``random`` or ``copy`` of the last branch), ``val_fraction`` (held out
    of train, stratified, when the dataset has no validation split). ``preset`` names the
    preset the run started from (:mod:`fer_lab.presets`; ``config.json`` lists where the run
    differs from it).

    Execution: ``seed``, ``deterministic`` (PyTorch deterministic mode), ``device``
    (``auto``/``cpu``/``cuda``), ``num_workers``, ``channels_last`` (NHWC memory format:
    same numbers up to float round-off, faster convolutions on CPU and GPU; on by default),
    ``amp`` (``none``, ``bf16`` or ``fp16`` autocast for the training forward pass; the
    diversity term always runs in float32; fp16 uses a gradient scaler), ``compile``
    (``torch.compile`` the training forward pass with ``compile_backend``; recompiled when a
    branch is added),
    ``keep_freed_memory`` (on a CPU, glibc keeps freed memory for reuse instead of unmapping
    each large activation: faster steps, more resident memory, process-wide and not undone,
    see :func:`fer_lab.utils.keep_freed_memory`; off in the library, on from the command line
    and the demo), ``progress`` (tqdm bars), ``figures``. ``bench/RESULTS.md`` says which of
    these pay off on which hardware; only ``channels_last`` is on by default.

    Initialisation: ``init_weights`` (a file or directory the user supplies: the official ESR
    checkpoint set, an MS-Celeb-1M MA-Net checkpoint, a torchvision ResNet-18 state dict or a
    fer_lab checkpoint, see :func:`fer_lab.models.pretrained.load_pretrained`), loaded once
    into the freshly built model (not on resume, not when a later stage reloads its best
    checkpoint); ``init_partial`` allows loading only the tensors that match;
    ``init_new_heads`` keeps the model's own classifier heads (fine-tuning into another
    class set, e.g. RAF-DB's 7 classes from an 8-class AffectNet model);
    ``init_channel_order`` (``rgb``: the official ESR's first conv is converted from BGR).
    The load report goes to the run's ``init_weights.json``. Presets: :meth:`from_preset`.
    """

    model: str = "esr9_div"
    model_options: dict = field(default_factory=dict)
    dataset: str = "synthetic"
    data_root: str | None = None
    data_options: dict = field(default_factory=dict)
    label_space: str | None = "auto"
    image_size: int | None = None
    train_transform: str | None = None
    image_normalize: str | None = None
    random_erasing: bool = False
    init_weights: str | None = None
    init_partial: bool = False
    init_new_heads: bool = False
    init_channel_order: str = "rgb"
    preset: str | None = None

    name: str | None = None
    output_dir: str = "outputs/runs"
    cache_dir: str | None = "outputs/cache"

    protocol: str = "auto"
    epochs: int = 50
    epochs_later: int = 20
    lr: float = 0.1
    lr_new: float = 0.1
    lr_old: float = 0.01
    lr_step: int = 10
    lr_gamma: float = 0.5
    lr_step_at: str = "end"
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    eval_batch_size: int = 128
    subset_per_class: int | None = 5000
    branch_init: str = "random"
    val_fraction: float = 0.1

    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    num_workers: int = 0
    channels_last: bool = True
    amp: str = "none"
    compile: bool = False
    compile_backend: str = "inductor"
    keep_freed_memory: bool = False
    progress: bool = True
    figures: bool = True

    def __post_init__(self):
        problems = []
        if self.protocol not in PROTOCOLS:
            problems.append(f"protocol={self.protocol!r}: expected one of {PROTOCOLS}")
        for key in ("epochs", "batch_size", "eval_batch_size", "lr_step"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{key}={v!r}: expected an int >= 1")
        if not isinstance(self.epochs_later, int) or self.epochs_later < 1:
            problems.append(f"epochs_later={self.epochs_later!r}: expected an int >= 1")
        for key in ("lr", "lr_new", "lr_old"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                problems.append(f"{key}={v!r}: expected a finite learning rate >= 0")
        if not (0 < self.lr_gamma <= 1):
            problems.append(f"lr_gamma={self.lr_gamma!r}: expected a factor in (0, 1]")
        if self.lr_step_at not in LR_STEP_AT:
            problems.append(f"lr_step_at={self.lr_step_at!r}: expected 'end' (PyTorch's order: step after each "
                            "epoch) or 'start' (the public ESR scripts: step before each epoch)")
        if self.init_channel_order not in ("rgb", "bgr"):
            problems.append(f"init_channel_order={self.init_channel_order!r}: expected 'rgb' or 'bgr'")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer={self.optimizer!r}: expected one of {OPTIMIZERS}")
        if not (0 <= self.momentum < 1):
            problems.append(f"momentum={self.momentum!r}: expected a value in [0, 1)")
        if self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay!r}: expected >= 0")
        if self.subset_per_class is not None and (not isinstance(self.subset_per_class, int)
                                                  or self.subset_per_class < 1):
            problems.append(f"subset_per_class={self.subset_per_class!r}: expected an int >= 1 or None")
        if self.branch_init not in ("random", "copy"):
            problems.append(f"branch_init={self.branch_init!r}: expected 'random' or 'copy'")
        if not (0 < self.val_fraction < 1):
            problems.append(f"val_fraction={self.val_fraction!r}: expected a fraction in (0, 1)")
        if self.amp not in AMP_MODES:
            problems.append(f"amp={self.amp!r}: expected one of {AMP_MODES}")
        if self.num_workers < 0:
            problems.append(f"num_workers={self.num_workers!r}: expected >= 0")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 8):
            problems.append(f"image_size={self.image_size!r}: expected None (model default) or an int >= 8")
        if self.init_weights is not None:
            self.init_weights = str(self.init_weights)      # a Path is stored (and compared on resume) as text
        if problems:
            raise ValueError("invalid training configuration:\n  " + "\n  ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if "normalize" in d and "image_normalize" not in d:       # the field's name in runs before 2026-12
            d["image_normalize"] = d.pop("normalize")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; expected some of {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, preset: str, /, **overrides) -> "TrainConfig":
        """The preset ``preset`` (:data:`fer_lab.presets.PRESETS`) with ``overrides`` (any fields,
        ``name`` included) on top; ``model_options`` and ``data_options`` overrides are merged
        into the preset's."""
        from .presets import preset_fields

        return cls.from_dict(preset_fields(preset, overrides))

    @property
    def run_name(self) -> str:
        return self.name or f"{self.model}-{self.dataset}-s{self.seed}"


#: Flat names (notebook parameters, sweep grids) of model options -> model constructor keys.
MODEL_OPTIONS = {"branches": "num_branches", "width": "width", "attention": "attention", "gamma": "gamma",
                 "diagonal": "diagonal", "reduction": "reduction", "diversity_terms": "diversity_terms",
                 "normalize": "diversity_normalize", "diversity_weight": "diversity_weight",
                 "diversity_source": "diversity_source", "num_classes": "num_classes",
                 "chain_order": "chain_order", "cbam_position": "cbam_position", "cbam_reduction": "cbam_reduction", "cbam_init": "cbam_init",
                 "decision": "decision",
                 "diversity_scope": "diversity_scope", "channel_term_input": "channel_term_input",
                 "branch_bn_train_at_test": "branch_bn_train_at_test"}


def config_from_flat(**flat) -> TrainConfig:
    """A :class:`TrainConfig` from one flat dict of parameters (a notebook's parameters cell,
    a sweep's grid point).

    Keys of :data:`MODEL_OPTIONS` (``branches``, ``width``, ``gamma``, ``diagonal``,
    ``diversity_terms``, ``normalize``, ...) become ``model_options`` - ``None`` keeps the
    variant's default; ``run_name`` is the run's ``name``; ``train_options`` (a dict of
    further TrainConfig fields, e.g. what a sweep's preset sets beyond the notebook's
    parameters) is applied last; everything else must be a :class:`TrainConfig` field.
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
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; expected training options {sorted(known)} "
                         f"or model options {sorted(MODEL_OPTIONS)}")
    return TrainConfig(model_options=model_options, **flat)
