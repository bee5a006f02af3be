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

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from . import runs
from .distributed import Dist, RankSlices, convert_batchnorm, lost_peer
from .protocols import Protocol, Stage, make_protocol
from .data import balanced_subset
from .data.transforms import batch_transform
from .models import build_model, build_model_from_config, count_parameters, model_spec, resolve_config
from .models.cbam import cbam_path
from .utils import derive_seed, deterministic_mode, flush_denormal, keep_freed_memory, pick_device, set_seed

log = logging.getLogger(__name__)

from .config import (AMP_MODES, LR_STEP_AT, MODEL_OPTIONS, OPTIMIZERS, PROTOCOLS, _VOLATILE, TrainConfig,
                     config_from_flat)
from .data.bundle import DataBundle, build_data, holdout_split
from .epoch import (SATURATION, Callback, EpochLine, EpochMeter, _emit, confusion_matrix, predict, run_epoch,
                    saturation_warnings)

__all__ = ["train", "train_or_resume", "plan_stages", "EpochLine", "TrainConfig", "config_from_flat", "Callback",
           "MODEL_OPTIONS", "PROTOCOLS", "LR_STEP_AT", "OPTIMIZERS", "AMP_MODES", "DataBundle", "build_data",
           "holdout_split", "EpochMeter", "run_epoch", "predict", "confusion_matrix", "SATURATION",
           "saturation_warnings"]
def plan_stages(cfg: TrainConfig, protocol: str | None = None) -> list[Stage]:
    """The stages a run of ``cfg`` goes through (``protocol``: the resolved name; default
    ``cfg``'s, ``auto`` resolved from the model variant)."""
    mcfg, _, _, resolved = _resolve(cfg)
    return make_protocol(protocol or resolved, cfg, mcfg).stages()


# ---- the engine ---------------------------------------------------------------------------
def _place(model, device, cfg: TrainConfig, dist: Dist | None = None):
    """Model on ``device``, in channels-last memory format when configured; BatchNorm over the
    global batch in a data-parallel run."""
    model = convert_batchnorm(model) if dist is not None and dist.active else model
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.runtime.channels_last else model


def _optimizer(groups: list[dict], cfg: TrainConfig):
    """The configured optimiser over the protocol's parameter groups, and its StepLR."""
    lr = groups[0]["lr"]
    if cfg.optim.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=lr, weight_decay=cfg.optim.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.optim.lr_step, gamma=cfg.optim.lr_gamma)
    return opt, sched


def _loader(ds, batch_size, shuffle, seed, cfg, device, indices=None):
    if indices is not None:
        ds = Subset(ds, indices)
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=cfg.runtime.num_workers,
                      pin_memory=device.type == "cuda", drop_last=False,
                      persistent_workers=False)


def _flatten(prefix: str, scalars: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in scalars.items()}


def _resolve(cfg: TrainConfig):
    """``(model config, image size, label space, protocol name)`` of a run."""
    spec = model_spec(cfg.model)
    mcfg = resolve_config(cfg.model, **cfg.model_options)
    image_size = cfg.data.image_size or mcfg.get("input_size", 96)
    if "input_size" in mcfg:
        mcfg["input_size"] = image_size
    label_space = spec.data.get("label_space") if cfg.data.label_space == "auto" else cfg.data.label_space
    protocol = cfg.protocol.name
    if protocol == "auto":
        protocol = spec.data.get("protocol", "single")
    return mcfg, image_size, label_space, protocol


def train(cfg: TrainConfig | dict, resume: bool = False, callbacks: Iterable[Callback] = ()) -> Path:
    """Run (or resume) training; returns the run directory.

    ``resume=True`` continues ``<output_dir>/<name>`` from its last finished epoch; the
    configuration must match the saved one (except progress, device, workers, figures).
    A resumed run ends with the same metrics as an uninterrupted one with the same seed.
    PyTorch's deterministic mode (``cfg.runtime.deterministic``) and flushing CPU denormals to zero
    (see :func:`fer_lab.utils.flush_denormal`) hold during the call only.
    """
    cfg = (TrainConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg).resolved()
    with deterministic_mode(cfg.runtime.deterministic), flush_denormal(), cbam_path(cfg.runtime.cbam_path):
        return _train(cfg, resume, list(callbacks))


def train_or_resume(cfg: TrainConfig | dict, callbacks: Iterable[Callback] = ()) -> Path:
    """What a notebook does with its parameters: a finished run (``metrics.json`` present) is
    left as it is, a started one resumes from its checkpoint, otherwise the run trains; returns
    the run directory."""
    cfg = TrainConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
    run_dir = Path(cfg.runtime.output_dir) / cfg.run_name
    if (run_dir / "metrics.json").exists():
        print(f"{run_dir} is finished; delete it to train again")
        return run_dir
    return train(cfg, resume=(run_dir / "config.json").exists(), callbacks=callbacks)


def _fresh_model(cfg: TrainConfig, protocol: Protocol):
    """The model a fresh run starts from (the protocol's start configuration), initialised
    from ``cfg.init.weights`` when given. Returns ``(model, load report or None)``."""
    model = build_model(cfg.model, **{k: v for k, v in protocol.start_config().items() if k != "name"})
    if not cfg.init.weights:
        return model, None
    from .models.pretrained import load_pretrained

    return model, load_pretrained(model, cfg.init.weights, allow_partial=cfg.init.partial,
                                  new_heads=cfg.init.new_heads, channel_order=cfg.init.channel_order)


def _preset_record(cfg: TrainConfig) -> dict | None:
    """``{"name", "differs": {field: [preset value, run value]}}`` for ``config.json``."""
    if not cfg.preset:
        return None
    from .presets import preset_fields

    ref = _as_json(TrainConfig.from_dict(preset_fields(cfg.preset, {})).flat())
    mine = _as_json(cfg.flat())
    ignored = _VOLATILE | {"name", "seed", "data_root", "init_weights", "preset"}
    return {"name": cfg.preset, "differs": {k: [ref[k], v] for k, v in mine.items() if k not in ignored and ref[k] != v}}


def _as_json(flat: dict) -> dict:
    """``flat`` as it reads back from JSON (tuples as lists), so that saved and given configs compare."""
    return json.loads(json.dumps(flat, default=str))


def _train(cfg: TrainConfig, resume: bool, callbacks: list) -> Path:
    """``_run`` in this process, or as one rank of a torchrun job (:mod:`fer_lab.distributed`)."""
    device = pick_device(cfg.runtime.device)
    dist = Dist.from_env(device.type, cfg.runtime.distributed_similarity)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    try:
        with dist.stop_message(Path(cfg.runtime.output_dir) / cfg.run_name):
            return _run(cfg, resume, callbacks, device, dist)
    except RuntimeError as err:
        if dist.active and lost_peer(err):
            raise RuntimeError(f"rank {dist.rank} of {dist.world} lost the other ranks: another rank failed or was "
                               f"killed ({str(err).splitlines()[0][:200]}). Finished epochs are kept in "
                               f"{Path(cfg.runtime.output_dir) / cfg.run_name}; start the same torchrun command with "
                               "--resume to continue") from err
        raise
    finally:
        dist.close()


def _run(cfg: TrainConfig, resume: bool, callbacks: list, device: torch.device, dist: Dist) -> Path:
    if resume:
        run = runs.RunDir.open_existing(cfg.runtime.output_dir, cfg.run_name)
        saved = _as_json(TrainConfig.from_dict(runs.read_json(run.config)["train"]).flat())
        diff = {k: (saved[k], v) for k, v in _as_json(cfg.flat()).items() if k not in _VOLATILE and saved[k] != v}
        if diff:
            raise ValueError(f"cannot resume {run.path}: the configuration differs from the saved one in "
                             + ", ".join(f"{k} (saved {a!r}, given {b!r})" for k, (a, b) in diff.items()))
    else:
        run = None
    mcfg, image_size, label_space, protocol_name = _resolve(cfg)
    if cfg.runtime.keep_freed_memory and device.type == "cpu":
        keep_freed_memory()
    if cfg.runtime.amp == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("amp='bf16' on a CPU without native bfloat16 (AVX512-BF16 or AMX): autocast emulates it and "
                    "training is slower than float32; pass --amp none (amp='none')")
    set_seed(derive_seed(cfg.runtime.seed, "init"))

    data = build_data(cfg, image_size, label_space)
    # what a checkpoint needs to be used on its own (fer_lab.predict): class names, input size, colour
    meta = {"classes": list(data.classes), "image_size": image_size,
            "color": (data.describe.get("splits", {}).get("train") or {}).get("color")}
    if mcfg.get("num_classes") != len(data.classes):
        raise ValueError(f"model {cfg.model} has num_classes={mcfg.get('num_classes')} but dataset "
                         f"{cfg.data.dataset} (label_space={label_space!r}) has {len(data.classes)} classes "
                         f"{list(data.classes)}; set model_options num_classes or label_space")
    protocol = make_protocol(protocol_name, cfg, mcfg)
    stages = protocol.stages()
    # a fresh run builds (and initialises) its model before writing anything, so a bad
    # --init-weights file leaves no half-made run directory behind
    fresh = _fresh_model(cfg, protocol) if not resume else None
    if run is None and dist.main:     # rank 0 writes the run directory; the others open it
        try:
            run = runs.RunDir.create(cfg.runtime.output_dir, cfg.run_name)
        except Exception as err:
            dist.agree(False, str(err))
            raise
        runs.write_json(run.config, {"train": cfg.to_dict(), "model": mcfg, "protocol": protocol_name,
                                     "protocol_description": protocol.description,
                                     "stages": [s.to_dict() for s in stages], "preset": _preset_record(cfg),
                                     "image_size": image_size, "label_space": label_space,
                                     "classes": list(data.classes), "world_size": dist.world})
        runs.write_json(run.dataset, data.describe)
    dist.agree(True)
    run = run or runs.RunDir.open_existing(cfg.runtime.output_dir, cfg.run_name)
    if dist.main:
        runs.write_json(run.env, runs.environment(device))

    # ---- state: fresh or from last.pt ----
    state = {"stage": 0, "epoch": -1, "history": [], "sims": [], "warnings": [], "best_score": -math.inf, "best_epoch": None,
             "elapsed": 0.0}
    ckpt = runs.load_checkpoint(run.last) if resume and run.last.exists() else None
    if ckpt is not None:
        model = build_model_from_config(ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
        model = _place(model, device, cfg, dist)
        state.update(ckpt["state"])
        log.info("resuming %s at stage %d after epoch %d", run.path, state["stage"], state["epoch"])
    else:
        model, init_report = fresh or _fresh_model(cfg, protocol)
        if init_report is not None and dist.main:
            runs.write_json(run.path / "init_weights.json", init_report)
        model = _place(protocol.begin_stage(model, stages[0]), device, cfg, dist)
    t_start = time.perf_counter() - state["elapsed"]
    augment = batch_transform(cfg.data.train_transform or model_spec(cfg.model).data.get("train_transform"))

    for stage in stages[state["stage"]:]:
        continuing = ckpt is not None and ckpt["state"]["stage"] == stage.index
        if not continuing and stage.index > 0:
            # a later stage starts from the previous stage's best checkpoint
            best = runs.load_checkpoint(run.stage_best(stage.index - 1))
            model = build_model_from_config(best["model_config"])
            model.load_state_dict(best["model"])
            model = _place(protocol.begin_stage(model, stage), device, cfg, dist)
            state.update(stage=stage.index, epoch=-1, best_score=-math.inf, best_epoch=None)
        optimizer, scheduler = _optimizer(protocol.param_groups(model, stage), cfg)
        forward = torch.compile(model, backend=cfg.runtime.compile_backend) if cfg.runtime.compile else model
        scaler = torch.amp.GradScaler(device.type) if cfg.runtime.amp == "fp16" else None
        if continuing:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
        subset = balanced_subset(data.train_targets, cfg.protocol.subset_per_class,
                                 derive_seed(cfg.runtime.seed, "subset", stage.index))
        _emit(callbacks, "on_stage_start", {"stage": stage.index, "model": model, "subset_size": len(subset)})
        for epoch in range(state["epoch"] + 1, stage.epochs):
            t0 = time.perf_counter()
            eseed = derive_seed(cfg.runtime.seed, "epoch", stage.index, epoch)
            set_seed(eseed)
            train_loader = _loader(data.train, cfg.optim.batch_size, True, eseed, cfg, device, subset)
            if dist.active:
                train_loader = RankSlices.shard(train_loader, dist.rank, dist.world)
            val_loader = _loader(data.val, cfg.runtime.eval_batch_size, False, 0, cfg, device)
            if cfg.optim.lr_step_at == "start":
                _step_before_epoch(scheduler)
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            event = {"stage": stage.index, "epoch": epoch, "model": model}
            tr, tr_sim = run_epoch(model, train_loader, device, optimizer, cfg.runtime.progress,
                                   f"stage {stage.index + 1}/{len(stages)} epoch {epoch + 1}/{stage.epochs}",
                                   callbacks, event, amp=cfg.runtime.amp, forward=forward, scaler=scaler, augment=augment,
                                   dist=dist)
            if cfg.optim.lr_step_at == "end":
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
            best = score > state["best_score"]
            if best:
                state.update(best_score=score, best_epoch=epoch)
            state.update(stage=stage.index, epoch=epoch, elapsed=time.perf_counter() - t_start)
            if dist.main:
                if best:
                    runs.save_checkpoint(run.stage_best(stage.index), _checkpoint(model, cfg, stage, epoch, score, meta))
                runs.save_checkpoint(run.last, {**_checkpoint(model, cfg, stage, epoch, score, meta),
                                                "optimizer": optimizer.state_dict(),
                                                "scheduler": scheduler.state_dict(), "state": _plain(state),
                                                "scaler": scaler.state_dict() if scaler is not None else {}})
                runs.write_csv(run.history, state["history"])
                runs.write_similarity(run.similarity, state["history"], state["sims"])
            dist.barrier()         # the checkpoints are on disk before any rank reads them
            log.info("stage %d epoch %d: train acc %.4f, val acc %.4f", stage.index, epoch,
                     tr[f"acc_{model.main_head}"], score)
            _emit(callbacks, "on_epoch_end", {**event, "record": record})
        ckpt = None

    if not dist.main:
        dist.barrier()
        return run.path
    path = _finish(run, cfg, stages, state, data, device, t_start, callbacks)
    dist.barrier()
    return path


#: A term is saturated when every off-diagonal of its epoch-mean S is below this and its share of
#: the loss's gradient (first batch of the epoch) is below this too.
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


def _checkpoint(model, cfg, stage, epoch, score, meta) -> dict:
    return {"model": model.state_dict(), "model_config": model.config, "train_config": cfg.to_dict(),
            "stage": stage.index, "epoch": epoch, "val_score": score, "meta": meta}


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
    val_loader = _loader(data.val, cfg.runtime.eval_batch_size, False, 0, cfg, device)
    show = cfg.runtime.progress
    metrics["val"], _ = run_epoch(model, val_loader, device, progress=show, desc="evaluation: val")
    if data.test is not None:
        test_loader = _loader(data.test, cfg.runtime.eval_batch_size, False, 0, cfg, device)
        test, test_sim = run_epoch(model, test_loader, device, progress=show, desc="evaluation: test")
        preds = predict(model, test_loader, device, progress=show, desc="evaluation: test predictions")
        target = preds["target"]
        main = preds[model.main_head]
        main_pred = main.argmax(axis=1)
        metrics["test"] = test
        metrics["test"]["similarity"] = {k: v.tolist() for k, v in test_sim.items()}
        metrics["test"]["confusion"] = confusion_matrix(target, main_pred, len(data.classes)).tolist()
        runs.save_npz(run.predictions, **{k: v.astype(np.float32) if v.dtype.kind == "f" else v
                                          for k, v in preds.items()})
    runs.write_json(run.metrics, metrics)
    if cfg.runtime.figures:
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
