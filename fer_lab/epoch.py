"""One pass over a loader: the per-batch meter of losses, accuracies, diversity and its
diagnostics (:class:`EpochMeter`), :func:`run_epoch`, predictions, the confusion matrix and the
saturation warning of a diversity term. Record names: :mod:`fer_lab.schema`."""
from __future__ import annotations

import contextlib
import math
from typing import Iterable

import numpy as np
import torch

from . import schema
from .utils import batches, offdiag


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


class EpochLine(Callback):
    """One line per epoch (visible in papermill's ``--log-output``): the decision head's train
    and val accuracy, the model's other decision heads, each diversity term's D, the time."""

    def on_epoch_end(self, event):
        r, head = event["record"], event["model"].main_head
        others = [h for h in schema.decision_heads(r, "val") if h != head]
        parts = [f"stage {r['stage'] + 1} epoch {r['epoch'] + 1}", f"train acc ({head}) "
                 f"{r[schema.col('train', schema.acc(head))]:.3f}", f"val acc {r[schema.col('val', schema.acc(head))]:.3f}"]
        parts += [f"val {h} {r[schema.col('val', schema.acc(h))]:.3f}" for h in others]
        # a single learner (ESR's first stage) has no diversity term: its D is NaN, not shown
        parts += [f"D_{t} {r[schema.col('val', schema.D(t))]:.3f}" for t in schema.terms(r, "val")
                  if not math.isnan(r[schema.col('val', schema.D(t))])]
        print(", ".join(parts + [f"{r['time_s']:.0f} s"]), flush=True)


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

    def reduce(self, dist) -> None:
        """Sums and counts over every rank of a data-parallel run (similarity matrices and kernel
        arguments are of the global batch already, the same on every rank)."""
        keys = sorted(self.sums)
        device = next(iter(self.sums.values())).device if self.sums else "cpu"
        n, *sums = dist.sum_([torch.tensor(float(self.n), device=device), *[self.sums[k] for k in keys]])
        self.n = int(round(float(n)))
        self.sums = dict(zip(keys, sums))

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


def _grad_norms(model, lo, dist=None) -> dict[str, float]:
    """Norm of the parameter gradient of the CE part, of each diversity term in the loss and of
    the whole loss; ``gradshare_D_<t>``: the norm of the term's weighted gradient over the loss's.
    Distributed (``dist``): of the gradients averaged over ranks, as the optimiser sees them."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    parts = {"ce": lo.ce_total}
    parts.update({schema.D(t): lo.diversity[t] for t in lo.in_loss})
    if lo.in_loss:
        parts["total"] = lo.total
    for key, value in parts.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        if dist is not None and dist.active:
            grads = [g / dist.world for g in dist.sum_([torch.zeros_like(p) if g is None else g
                                                        for g, p in zip(grads, params)])]
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
              amp: str = "none", forward=None, scaler=None, augment=None, dist=None):
    """One pass over ``loader``; trains when ``optimizer`` is given. Returns ``(scalars, sims)``.

    ``amp``: autocast dtype of the forward pass (``none``, ``bf16``, ``fp16``); ``forward``: the
    callable that runs the model (e.g. its ``torch.compile`` version; default the model);
    ``scaler``: a ``torch.amp.GradScaler`` for fp16; ``augment``: a batch augmentation applied
    to each training batch on the device (:func:`fer_lab.data.transforms.batch_transform`);
    ``dist``: a :class:`fer_lab.distributed.Dist` when training data-parallel (``loader`` yields
    this rank's share of each batch; see that module for what is global).
    """
    from tqdm.auto import tqdm

    training = optimizer is not None
    model.train(training)
    forward = model if forward is None else forward
    meter = EpochMeter()
    extra = {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16,
                              enabled=amp != "none")
    parallel = training and dist is not None and dist.active
    gather = dist.training_batch() if parallel else contextlib.nullcontext()
    with torch.set_grad_enabled(training), gather:
        bar = tqdm(batches(loader), desc=desc, leave=False, disable=not progress, dynamic_ncols=True,
                   total=len(loader) if hasattr(loader, "__len__") else None)
        for i, (x, y) in enumerate(bar):
            x = _input(x, device, model)
            n_global, offset = dist.share(x.shape[0]) if parallel else (x.shape[0], 0)
            if training and augment is not None:
                x = augment(x, shard=(offset, n_global)) if parallel else augment(x)
            y = y.to(device, non_blocking=True)
            with autocast:
                out = forward(x)
                lo = model.loss(out, y)
            if training:
                if not torch.isfinite(lo.total):
                    raise FloatingPointError(f"{desc}: loss became {float(lo.total)} at batch {i}; "
                                             "lower the learning rate or check the data")
                step = dist.rescale(lo, x.shape[0], n_global) if parallel else lo
                if i == 0:
                    extra = _grad_norms(model, step, dist)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(step.total).backward()
                    if parallel:
                        dist.average_gradients(model.parameters())
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    step.total.backward()
                    if parallel:
                        dist.average_gradients(model.parameters())
                    optimizer.step()
            meter.update(lo, model.heads(out), y)
            if callbacks:
                _emit(callbacks, "on_batch_end", {**(event or {}), "batch": i, "loss": lo})
    if parallel:
        meter.reduce(dist)
    scalars, sims = meter.result()
    scalars.update(extra)
    return scalars, sims


@torch.no_grad()
def predict(model, loader, device, progress: bool = False, desc: str = "predict") -> dict[str, np.ndarray]:
    """Softmax of every head's ``(N, K)`` scores on ``loader`` in eval mode (``{head: (N, K)}``), plus
    ``target`` ``(N,)`` (the argmax of soft labels)."""
    from tqdm.auto import tqdm

    model.eval()
    acc: dict[str, list] = {}
    for x, y in tqdm(batches(loader), total=len(loader), desc=desc, disable=not progress, leave=False):
        out = model(_input(x, device, model))
        for head, score in model.heads(out).items():
            acc.setdefault(head, []).append(score.float().softmax(dim=1).cpu())
        acc.setdefault("target", []).append((y.argmax(dim=1) if y.dim() == 2 else y).cpu())
    return {k: torch.cat(v).numpy() for k, v in acc.items()}


def confusion_matrix(target: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` counts, rows = true class, columns = predicted class."""
    return np.bincount(target * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


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
