"""One training engine for every model and every row of Table 1.

``train(TrainConfig(...))`` builds the model and data, runs the protocol stage by
stage, records every epoch, selects the checkpoint on the validation split, evaluates
the test split once for that checkpoint, and writes a run directory
(:mod:`fer_lab.runs`). What each stage trains (which model it starts from, parameter
groups and learning rates, the branches in the loss) is the protocol's business
(:mod:`fer_lab.protocols`: ``single``, ``esr_growth``, ``esr_finetune``); each stage
starts from the previous stage's best checkpoint, with a fresh class-balanced subset, a
fresh optimiser and a fresh StepLR. Published protocols are presets
(:mod:`fer_lab.presets`).

The loss is the model's (``model.loss``): sum of branch CE minus the configured
diversity terms, so the engine never needs to know which row it runs. Watch training
from a notebook with :class:`Callback` instead of copying the loop.

The engine is deliberately not a general trainer: no distributed or gradient-accumulation
switches beyond what the paper's protocols need.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from . import runs
from .protocols import PROTOCOLS as _PROTOCOL_CLASSES, Protocol, Stage, make_protocol
from .data import balanced_subset, build_dataset, build_transform, dataset_entry, dataset_splits
from .data.transforms import batch_transform
from .models import build_model, build_model_from_config, count_parameters, model_spec, resolve_config
from . import schema
from .utils import (batches, derive_seed, deterministic_mode, flush_denormal, keep_freed_memory, offdiag,
                    pick_device, set_seed)

log = logging.getLogger(__name__)

PROTOCOLS = ("auto", *_PROTOCOL_CLASSES)
LR_STEP_AT = ("end", "start")
OPTIMIZERS = ("sgd", "adam")
AMP_MODES = ("none", "bf16", "fp16")
# config keys that may differ between an interrupted run and its resumption
_VOLATILE = {"progress", "device", "num_workers", "figures", "eval_batch_size", "keep_freed_memory"}


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
    each large activation: 5-18 % faster steps, more resident memory, see
    :func:`fer_lab.utils.keep_freed_memory`; on by default), ``progress`` (tqdm bars),
    ``figures``. ``bench/RESULTS.md`` says which of these pay off on which hardware; only
    ``channels_last`` and ``keep_freed_memory`` are on by default.

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
    keep_freed_memory: bool = True
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
                 "chain_order": "chain_order", "cbam_position": "cbam_position", "cbam_reduction": "cbam_reduction",
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


def plan_stages(cfg: TrainConfig, protocol: str | None = None) -> list[Stage]:
    """The stages a run of ``cfg`` goes through (``protocol``: the resolved name; default
    ``cfg``'s, ``auto`` resolved from the model variant)."""
    mcfg, _, _, resolved = _resolve(cfg)
    return make_protocol(protocol or resolved, cfg, mcfg).stages()


class Callback:
    """Hooks a notebook can implement to watch training (all optional).

    ``event`` dicts carry ``stage``, ``epoch``, ``model`` and, for epoch ends, the
    history ``record`` just written.
    """

    def on_stage_start(self, event: dict) -> None: ...
    def on_batch_end(self, event: dict) -> None: ...
    def on_epoch_end(self, event: dict) -> None: ...
    def on_train_end(self, event: dict) -> None: ...


def _emit(callbacks: Iterable[Callback], hook: str, event: dict) -> None:
    for cb in callbacks:
        getattr(cb, hook, lambda e: None)(event)


# ---- data ---------------------------------------------------------------------------------
@dataclass
class DataBundle:
    train: Any
    val: Any
    test: Any
    describe: dict
    train_targets: np.ndarray
    classes: tuple


def holdout_split(targets: np.ndarray, fraction: float, seed) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of indices into ``(keep, held_out)`` with ``fraction`` of each class held out
    (rounded, but at least one item of every class that has two or more)."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        n = max(int(round(len(idx) * fraction)), 1 if len(idx) >= 2 else 0)
        held.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def build_data(cfg: TrainConfig, image_size: int, label_space: str | None) -> DataBundle:
    """Train/val/test datasets with the configured transforms, and their description.

    Splits: the dataset's own ``val``/``test`` where it has them; without ``val``, a
    stratified ``val_fraction`` of train is held out for model selection; without
    ``test``, the dataset's ``val`` split is the reported one.
    """
    spec_data = model_spec(cfg.model).data
    train_tf = build_transform(cfg.train_transform or spec_data.get("train_transform", "esr_train"), image_size,
                               normalize=cfg.image_normalize, random_erasing=cfg.random_erasing)
    eval_tf = build_transform("eval", image_size, normalize=cfg.image_normalize)
    options = dict(cfg.data_options)
    size_option = dataset_entry(cfg.dataset).size_option
    if size_option:
        options.setdefault(size_option, image_size)
    if cfg.cache_dir:
        options.setdefault("cache", cfg.cache_dir)
    splits = dataset_splits(cfg.dataset, root=cfg.data_root, **options)

    def make(split, tf):
        return build_dataset(cfg.dataset, root=cfg.data_root, split=split, transform=tf,
                             label_space=label_space, **options)

    train_full = make("train", train_tf)
    has_val, has_test = "val" in splits, "test" in splits
    train, train_targets = train_full, train_full.targets
    if has_val and has_test:
        val, test = make("val", eval_tf), make("test", eval_tf)
        roles = {"train": "train", "val": "val", "test": "test"}
    else:
        # select on a stratified hold-out of train; report the dataset's own evaluation split
        keep, held = holdout_split(train_full.targets, cfg.val_fraction, derive_seed("holdout", cfg.dataset))
        train, train_targets = Subset(train_full, keep), train_full.targets[keep]
        val = Subset(make("train", eval_tf), held)
        reported = "test" if has_test else ("val" if has_val else None)
        test = make(reported, eval_tf) if reported else None
        roles = {"train": "train minus the hold-out", "val": f"{cfg.val_fraction:g} of train, stratified",
                 "test": reported}

    if len(val) == 0:
        raise ValueError(f"{cfg.dataset}: the validation split ({roles['val']}) is empty; model selection needs "
                         "at least one validation image (more training images, or a larger val_fraction)")

    def info(ds):
        if isinstance(ds, Subset):
            return ds.dataset.describe(ds.indices)
        return None if ds is None else ds.describe()

    describe = {"dataset": cfg.dataset, "root": cfg.data_root, "label_space": label_space,
                "image_size": image_size, "roles": roles, "options": {k: str(v) for k, v in options.items()},
                "splits": {"train": info(train), "val": info(val), "test": info(test)}}
    return DataBundle(train, val, test, describe, np.asarray(train_targets), tuple(train_full.classes))


# ---- one epoch ----------------------------------------------------------------------------
class EpochMeter:
    """Accumulates a phase's losses, accuracies, diversity and similarity on the device."""

    def __init__(self):
        self.n = 0
        self.batches = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.sim: dict[str, torch.Tensor] = {}
        self.sim_batches: dict[str, int] = {}
        self.kargs: dict[str, list] = {}
        self.gammas: dict[str, list] = {}

    def _add(self, key, value, weight):
        v = value.detach().float() * weight
        self.sums[key] = self.sums[key] + v if key in self.sums else v

    def update(self, lo, heads: dict, target: torch.Tensor) -> None:
        b = target.shape[0]
        hard = target.argmax(dim=1) if target.dim() == 2 else target
        self.n += b
        self.batches += 1
        self._add("loss", lo.total, b)
        self._add("ce", lo.ce_total, b)
        for head, ce in lo.ce.items():
            self._add(schema.ce(head), ce, b)
        for term, D in lo.diversity.items():
            self._add(schema.D(term), D, b)
        for term, S in lo.similarity.items():
            k = schema.abbrev(term)
            self.sim[k] = self.sim[k] + S.detach().float() if k in self.sim else S.detach().float()
            self.sim_batches[k] = self.sim_batches.get(k, 0) + 1
        for term, d in lo.diagnostics.items():
            k = schema.abbrev(term)
            self.kargs.setdefault(k, []).append(d["kernel_args"].float().cpu())
            self.gammas.setdefault(k, []).append(d["gamma"])
        for head, score in heads.items():
            self._add(schema.acc(head), (score.argmax(dim=1) == hard).float().sum(), 1)

    def result(self) -> tuple[dict, dict]:
        """(scalars averaged over samples, similarity matrices averaged over batches as numpy)."""
        scalars = {k: float(v) / max(self.n, 1) for k, v in self.sums.items()}
        sims = {k: (v / self.sim_batches[k]).cpu().numpy() for k, v in self.sim.items()}
        for k, S in sims.items():
            off = offdiag(S)
            if off.size:
                scalars[schema.S_offdiag(k)] = float(off.mean())          # 0: saturated, 1: learners identical
                scalars[schema.S_offdiag_max(k)] = float(off.max())
        for k, parts in self.kargs.items():
            args = torch.cat(parts)
            qs = torch.quantile(args.double(), torch.tensor(schema.QUANTILES, dtype=torch.float64))
            scalars.update({schema.karg(k, q): float(v) for q, v in zip(schema.QUANTILES, qs)})
            scalars[schema.gamma(k)] = float(np.mean(self.gammas[k]))
        return scalars, sims


def _grad_norms(model, lo) -> dict[str, float]:
    """Norm of the parameter gradient of the CE part, of each diversity term in the loss and of
    the whole loss; ``gradshare_D_<t>``: the norm of the term's weighted gradient over the loss's."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    parts = {"ce": lo.ce_total}
    parts.update({schema.D(t): lo.diversity[t] for t in lo.in_loss})
    if lo.in_loss:
        parts["total"] = lo.total
    for key, value in parts.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        sq = sum((g.float().pow(2).sum() for g in grads if g is not None), torch.zeros((), device=value.device))
        out[schema.gradnorm(key)] = float(sq.sqrt())
    weight = getattr(getattr(model, "diversity", None), "weight", 1.0)
    for t in lo.in_loss:
        out[schema.gradshare(t)] = weight * out[schema.gradnorm(schema.D(t))] / max(out[schema.gradnorm("total")], 1e-30)
    return out


def _input(x: torch.Tensor, device, model) -> torch.Tensor:
    """Batch on ``device`` in the model's memory format (channels-last when its weights are)."""
    x = x.to(device, non_blocking=True)
    w = next((p for p in model.parameters() if p.dim() == 4), None)
    if w is not None and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def run_epoch(model, loader, device, optimizer=None, progress=False, desc="", callbacks=(), event=None,
              amp: str = "none", forward=None, scaler=None, augment=None):
    """One pass over ``loader``; trains when ``optimizer`` is given. Returns ``(scalars, sims)``.

    ``amp``: autocast dtype of the forward pass (``none``, ``bf16``, ``fp16``); ``forward``: the
    callable that runs the model (e.g. its ``torch.compile`` version; default the model);
    ``scaler``: a ``torch.amp.GradScaler`` for fp16; ``augment``: a batch augmentation applied
    to each training batch on the device (:func:`fer_lab.data.transforms.batch_transform`).
    """
    from tqdm.auto import tqdm

    training = optimizer is not None
    model.train(training)
    forward = model if forward is None else forward
    meter = EpochMeter()
    extra = {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16,
                              enabled=amp != "none")
    with torch.set_grad_enabled(training):
        bar = tqdm(batches(loader), desc=desc, leave=False, disable=not progress, dynamic_ncols=True,
                   total=len(loader) if hasattr(loader, "__len__") else None)
        for i, (x, y) in enumerate(bar):
            x = _input(x, device, model)
            if training and augment is not None:
                x = augment(x)
            y = y.to(device, non_blocking=True)
            with autocast:
                out = forward(x)
                lo = model.loss(out, y)
            if training:
                if not torch.isfinite(lo.total):
                    raise FloatingPointError(f"{desc}: loss became {float(lo.total)} at batch {i}; "
                                             "lower the learning rate or check the data")
                if i == 0:
                    extra = _grad_norms(model, lo)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(lo.total).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    lo.total.backward()
                    optimizer.step()
            meter.update(lo, model.heads(out), y)
            if callbacks:
                _emit(callbacks, "on_batch_end", {**(event or {}), "batch": i, "loss": lo})
    scalars, sims = meter.result()
    scalars.update(extra)
    return scalars, sims


@torch.no_grad()
def predict(model, loader, device) -> dict[str, np.ndarray]:
    """Softmax of every head's ``(N, K)`` scores on ``loader`` in eval mode (``{head: (N, K)}``), plus
    ``target`` ``(N,)`` (the argmax of soft labels)."""
    model.eval()
    acc: dict[str, list] = {}
    for x, y in batches(loader):
        out = model(_input(x, device, model))
        for head, score in model.heads(out).items():
            acc.setdefault(head, []).append(score.float().softmax(dim=1).cpu())
        acc.setdefault("target", []).append((y.argmax(dim=1) if y.dim() == 2 else y).cpu())
    return {k: torch.cat(v).numpy() for k, v in acc.items()}


def confusion_matrix(target: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` counts, rows = true class, columns = predicted class."""
    return np.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


# ---- the engine ---------------------------------------------------------------------------
def _place(model, device, cfg: TrainConfig):
    """Model on ``device``, in channels-last memory format when configured."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def _optimizer(groups: list[dict], cfg: TrainConfig):
    """The configured optimiser over the protocol's parameter groups, and its StepLR."""
    lr = groups[0]["lr"]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    return opt, sched


def _loader(ds, batch_size, shuffle, seed, cfg, device, indices=None):
    if indices is not None:
        ds = Subset(ds, indices)
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=cfg.num_workers,
                      pin_memory=device.type == "cuda", drop_last=False,
                      persistent_workers=False)


def _flatten(prefix: str, scalars: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in scalars.items()}


def _resolve(cfg: TrainConfig):
    """``(model config, image size, label space, protocol name)`` of a run."""
    spec = model_spec(cfg.model)
    mcfg = resolve_config(cfg.model, **cfg.model_options)
    image_size = cfg.image_size or mcfg.get("input_size", 96)
    if "input_size" in mcfg:
        mcfg["input_size"] = image_size
    label_space = spec.data.get("label_space") if cfg.label_space == "auto" else cfg.label_space
    protocol = cfg.protocol
    if protocol == "auto":
        protocol = spec.data.get("protocol", "single")
    return mcfg, image_size, label_space, protocol


def train(cfg: TrainConfig | dict, resume: bool = False, callbacks: Iterable[Callback] = ()) -> Path:
    """Run (or resume) training; returns the run directory.

    ``resume=True`` continues ``<output_dir>/<name>`` from its last finished epoch; the
    configuration must match the saved one (except progress, device, workers, figures).
    A resumed run ends with the same metrics as an uninterrupted one with the same seed.
    PyTorch's deterministic mode (``cfg.deterministic``) and flushing CPU denormals to zero
    (see :func:`fer_lab.utils.flush_denormal`) hold during the call only.
    """
    cfg = TrainConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
    with deterministic_mode(cfg.deterministic), flush_denormal():
        return _train(cfg, resume, list(callbacks))


def train_or_resume(cfg: TrainConfig | dict, callbacks: Iterable[Callback] = ()) -> Path:
    """What a notebook does with its parameters: a finished run (``metrics.json`` present) is
    left as it is, a started one resumes from its checkpoint, otherwise the run trains; returns
    the run directory."""
    cfg = TrainConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
    run_dir = Path(cfg.output_dir) / cfg.run_name
    if (run_dir / "metrics.json").exists():
        print(f"{run_dir} is finished; delete it to train again")
        return run_dir
    return train(cfg, resume=(run_dir / "config.json").exists(), callbacks=callbacks)


class EpochLine(Callback):
    """One line per epoch (visible in papermill's ``--log-output``): the decision head's train
    and val accuracy, the model's other decision heads, each diversity term's D, the time."""

    def on_epoch_end(self, event):
        r, head = event["record"], event["model"].main_head
        others = [h for h in schema.decision_heads(r, "val") if h != head]
        parts = [f"stage {r['stage'] + 1} epoch {r['epoch'] + 1}", f"train acc ({head}) "
                 f"{r[schema.col('train', schema.acc(head))]:.3f}", f"val acc {r[schema.col('val', schema.acc(head))]:.3f}"]
        parts += [f"val {h} {r[schema.col('val', schema.acc(h))]:.3f}" for h in others]
        parts += [f"D_{t} {r[schema.col('val', schema.D(t))]:.3f}" for t in schema.terms(r, "val")]
        print(", ".join(parts + [f"{r['time_s']:.0f} s"]), flush=True)


def _fresh_model(cfg: TrainConfig, protocol: Protocol):
    """The model a fresh run starts from (the protocol's start configuration), initialised
    from ``cfg.init_weights`` when given. Returns ``(model, load report or None)``."""
    model = build_model(cfg.model, **{k: v for k, v in protocol.start_config().items() if k != "name"})
    if not cfg.init_weights:
        return model, None
    from .models.pretrained import load_pretrained

    return model, load_pretrained(model, cfg.init_weights, allow_partial=cfg.init_partial,
                                  new_heads=cfg.init_new_heads, channel_order=cfg.init_channel_order)


def _preset_record(cfg: TrainConfig) -> dict | None:
    """``{"name", "differs": {field: [preset value, run value]}}`` for ``config.json``."""
    if not cfg.preset:
        return None
    from .presets import preset_fields

    ref = TrainConfig.from_dict(preset_fields(cfg.preset, {})).to_dict()
    mine = cfg.to_dict()
    return {"name": cfg.preset, "differs": {k: [ref[k], v] for k, v in mine.items()
                                            if k not in _VOLATILE | {"name", "output_dir", "cache_dir", "seed", "data_root", "init_weights", "preset"}
                                            and ref[k] != v}}


def _train(cfg: TrainConfig, resume: bool, callbacks: list) -> Path:
    if resume:
        run = runs.RunDir.open_existing(cfg.output_dir, cfg.run_name)
        saved = runs.read_json(run.config)["train"]
        diff = {k: (saved.get(k), v) for k, v in cfg.to_dict().items()
                if k not in _VOLATILE and saved.get(k) != v and not (isinstance(v, tuple) and list(v) == saved.get(k))}
        if diff:
            raise ValueError(f"cannot resume {run.path}: the configuration differs from the saved one in "
                             + ", ".join(f"{k} (saved {a!r}, given {b!r})" for k, (a, b) in diff.items()))
    else:
        run = None
    mcfg, image_size, label_space, protocol_name = _resolve(cfg)
    device = pick_device(cfg.device)
    if cfg.keep_freed_memory and device.type == "cpu":
        keep_freed_memory()
    set_seed(derive_seed(cfg.seed, "init"))

    data = build_data(cfg, image_size, label_space)
    if mcfg.get("num_classes") != len(data.classes):
        raise ValueError(f"model {cfg.model} has num_classes={mcfg.get('num_classes')} but dataset "
                         f"{cfg.dataset} (label_space={label_space!r}) has {len(data.classes)} classes "
                         f"{list(data.classes)}; set model_options num_classes or label_space")
    protocol = make_protocol(protocol_name, cfg, mcfg)
    stages = protocol.stages()
    # a fresh run builds (and initialises) its model before writing anything, so a bad
    # --init-weights file leaves no half-made run directory behind
    fresh = _fresh_model(cfg, protocol) if not resume else None
    if run is None:
        run = runs.RunDir.create(cfg.output_dir, cfg.run_name)
        runs.write_json(run.config, {"train": cfg.to_dict(), "model": mcfg, "protocol": protocol_name,
                                     "protocol_description": protocol.description,
                                     "stages": [s.to_dict() for s in stages], "preset": _preset_record(cfg),
                                     "image_size": image_size, "label_space": label_space,
                                     "classes": list(data.classes)})
        runs.write_json(run.dataset, data.describe)
    runs.write_json(run.env, runs.environment(device))

    # ---- state: fresh or from last.pt ----
    state = {"stage": 0, "epoch": -1, "history": [], "sims": [], "warnings": [], "best_score": -math.inf, "best_epoch": None,
             "elapsed": 0.0}
    ckpt = runs.load_checkpoint(run.last) if resume and run.last.exists() else None
    if ckpt is not None:
        model = _place(build_model_from_config(ckpt["model_config"]), device, cfg)
        model.load_state_dict(ckpt["model"])
        state.update(ckpt["state"])
        log.info("resuming %s at stage %d after epoch %d", run.path, state["stage"], state["epoch"])
    else:
        model, init_report = fresh or _fresh_model(cfg, protocol)
        if init_report is not None:
            runs.write_json(run.path / "init_weights.json", init_report)
        model = _place(protocol.begin_stage(model, stages[0]), device, cfg)
    t_start = time.perf_counter() - state["elapsed"]
    augment = batch_transform(cfg.train_transform or model_spec(cfg.model).data.get("train_transform"))

    for stage in stages[state["stage"]:]:
        continuing = ckpt is not None and ckpt["state"]["stage"] == stage.index
        if not continuing and stage.index > 0:
            # a later stage starts from the previous stage's best checkpoint
            best = runs.load_checkpoint(run.stage_best(stage.index - 1))
            model = build_model_from_config(best["model_config"])
            model.load_state_dict(best["model"])
            model = _place(protocol.begin_stage(model, stage), device, cfg)
            state.update(stage=stage.index, epoch=-1, best_score=-math.inf, best_epoch=None)
        optimizer, scheduler = _optimizer(protocol.param_groups(model, stage), cfg)
        forward = torch.compile(model, backend=cfg.compile_backend) if cfg.compile else model
        scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
        if continuing:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
        subset = balanced_subset(data.train_targets, cfg.subset_per_class, derive_seed(cfg.seed, "subset", stage.index))
        _emit(callbacks, "on_stage_start", {"stage": stage.index, "model": model, "subset_size": len(subset)})
        for epoch in range(state["epoch"] + 1, stage.epochs):
            t0 = time.perf_counter()
            eseed = derive_seed(cfg.seed, "epoch", stage.index, epoch)
            set_seed(eseed)
            train_loader = _loader(data.train, cfg.batch_size, True, eseed, cfg, device, subset)
            val_loader = _loader(data.val, cfg.eval_batch_size, False, 0, cfg, device)
            if cfg.lr_step_at == "start":
                _step_before_epoch(scheduler)
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            event = {"stage": stage.index, "epoch": epoch, "model": model}
            tr, tr_sim = run_epoch(model, train_loader, device, optimizer, cfg.progress,
                                   f"stage {stage.index + 1}/{len(stages)} epoch {epoch + 1}/{stage.epochs}",
                                   callbacks, event, amp=cfg.amp, forward=forward, scaler=scaler, augment=augment)
            if cfg.lr_step_at == "end":
                scheduler.step()
            va, va_sim = run_epoch(model, val_loader, device, progress=False)
            record = {"stage": stage.index, "epoch": epoch, "global_epoch": len(state["history"]),
                      "num_branches": stage.branches,
                      **{f"lr_{k.replace(' ', '_').replace('+', '_')}": v for k, v in lrs.items()},
                      **_flatten("train", tr), **_flatten("val", va), "time_s": time.perf_counter() - t0}
            state["history"].append(record)
            state["sims"].append({"train": tr_sim, "val": va_sim})
            for msg in saturation_warnings(tr, stage.index, epoch, state.setdefault("warnings", [])):
                log.warning("%s: %s", run.path.name, msg)
            score = va[f"acc_{model.main_head}"]
            if score > state["best_score"]:
                state.update(best_score=score, best_epoch=epoch)
                runs.save_checkpoint(run.stage_best(stage.index), _checkpoint(model, cfg, stage, epoch, score))
            state.update(stage=stage.index, epoch=epoch, elapsed=time.perf_counter() - t_start)
            runs.save_checkpoint(run.last, {**_checkpoint(model, cfg, stage, epoch, score),
                                            "optimizer": optimizer.state_dict(),
                                            "scheduler": scheduler.state_dict(), "state": _plain(state),
                                            "scaler": scaler.state_dict() if scaler is not None else {}})
            runs.write_csv(run.history, state["history"])
            _write_similarity(run.similarity, state)
            log.info("stage %d epoch %d: train acc %.4f, val acc %.4f", stage.index, epoch,
                     tr[f"acc_{model.main_head}"], score)
            _emit(callbacks, "on_epoch_end", {**event, "record": record})
        ckpt = None

    return _finish(run, cfg, stages, state, data, device, t_start, callbacks)


#: A term is saturated when every off-diagonal of its epoch-mean S is below this and its share of
#: the loss's gradient (first batch of the epoch) is below this too.
SATURATION = 1e-3


def saturation_warnings(scalars: dict, stage: int, epoch: int, seen: list) -> list[str]:
    """Messages for the diversity terms that are saturated in this epoch's training ``scalars``
    (off-diagonals of S and gradient share both below :data:`SATURATION`), each term once per
    stage; appends ``{"stage", "epoch", "term", "S_offdiag_max", "gradshare", "kernel_arg_median"}``
    records to ``seen`` (kept in ``metrics.json``)."""
    out = []
    for t in schema.gradshare_terms(scalars):
        smax, share = scalars.get(schema.S_offdiag_max(t)), scalars[schema.gradshare(t)]
        if smax is None or not (smax < SATURATION and share < SATURATION):
            continue
        if any(w["stage"] == stage and w["term"] == t for w in seen):
            continue
        med = scalars.get(schema.karg(t, 0.5), float("nan"))
        seen.append({"stage": stage, "epoch": epoch, "term": t, "S_offdiag_max": smax, "gradshare": share,
                     "kernel_arg_median": med})
        out.append(f"stage {stage + 1} epoch {epoch + 1}: diversity term D_{t} is saturated (largest off-diagonal "
                   f"of S {smax:.1e}, {share:.1e} of the loss's gradient, median kernel argument gamma*d^2 "
                   f"{med:.3g}): its learners are so far apart at this gamma that exp(-gamma d^2) is 0 and the "
                   "term does not steer training. Calibrate the bandwidth (gamma='median', CLI --gamma median), "
                   "normalise the pooled features (--normalize l2) or lower --gamma.")
    return out


def _step_before_epoch(scheduler) -> None:
    """``scheduler.step()`` before the epoch's first optimiser step (``lr_step_at="start"``, the
    public ESR scripts' order), without PyTorch's warning about that order: it is intended."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()


def _plain(state: dict) -> dict:
    """The resumable state with numpy arrays as nested lists (``weights_only``-loadable)."""
    s = dict(state)
    s["sims"] = [{ph: {k: np.asarray(v).tolist() for k, v in d.items()} for ph, d in e.items()} for e in state["sims"]]
    return s


def _checkpoint(model, cfg, stage, epoch, score) -> dict:
    return {"model": model.state_dict(), "model_config": model.config, "train_config": cfg.to_dict(),
            "stage": stage.index, "epoch": epoch, "val_score": score}


def _write_similarity(path, state) -> None:
    """``similarity.npz``: per phase and term, ``(E, L, L)`` epoch-mean matrices (NaN-padded)."""
    sims = state["sims"]
    arrays = {"stage": np.array([r["stage"] for r in state["history"]]),
              "epoch": np.array([r["epoch"] for r in state["history"]]),
              "num_branches": np.array([r["num_branches"] or 0 for r in state["history"]])}
    keys = sorted({(ph, k) for e in sims for ph, d in e.items() for k in d})
    for ph, k in keys:
        mats = [np.asarray(e[ph][k]) if k in e[ph] else None for e in sims]
        L = max(m.shape[0] for m in mats if m is not None)
        stack = np.full((len(mats), L, L), np.nan, dtype=np.float32)
        for i, m in enumerate(mats):
            if m is not None:
                stack[i, :m.shape[0], :m.shape[1]] = m
        arrays[f"{ph}_S_{k}"] = stack
    runs.save_npz(path, **arrays)


def _finish(run, cfg, stages, state, data, device, t_start, callbacks) -> Path:
    last_stage = stages[-1].index
    best = runs.load_checkpoint(run.stage_best(last_stage))
    runs.save_checkpoint(run.best, best)
    model = build_model_from_config(best["model_config"])
    model.load_state_dict(best["model"])
    model = _place(model, device, cfg)
    metrics: dict[str, Any] = {
        "selected": {"stage": best["stage"], "epoch": best["epoch"], "val_score": best["val_score"],
                     "head": model.main_head},
        "num_parameters": count_parameters(model),
        "train_time_s": state["elapsed"],
        "classes": list(data.classes),
        "test_split": data.describe["roles"].get("test"),
        "saturation_warnings": state.get("warnings", []),
    }
    val_loader = _loader(data.val, cfg.eval_batch_size, False, 0, cfg, device)
    metrics["val"], _ = run_epoch(model, val_loader, device)
    if data.test is not None:
        test_loader = _loader(data.test, cfg.eval_batch_size, False, 0, cfg, device)
        test, test_sim = run_epoch(model, test_loader, device)
        preds = predict(model, test_loader, device)
        target = preds["target"]
        main = preds[model.main_head]
        main_pred = main.argmax(axis=1)
        metrics["test"] = test
        metrics["test"]["similarity"] = {k: v.tolist() for k, v in test_sim.items()}
        metrics["test"]["confusion"] = confusion_matrix(target, main_pred, len(data.classes)).tolist()
        runs.save_npz(run.predictions, **{k: v.astype(np.float32) if v.dtype.kind == "f" else v
                                          for k, v in preds.items()})
    runs.write_json(run.metrics, metrics)
    if cfg.figures:
        from . import viz
        try:
            viz.run_figures(run.path, model=model, dataset=data.test if data.test is not None else data.val,
                            device=device)
        except Exception:  # figures must never cost a finished run its metrics
            log.exception("figure generation failed for %s", run.path)
            raise
    _emit(callbacks, "on_train_end", {"model": model, "metrics": metrics, "run": run.path})
    log.info("finished %s in %.1f s", run.path, time.perf_counter() - t_start)
    return run.path
