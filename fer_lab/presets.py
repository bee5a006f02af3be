"""Presets: the published training protocols, each named after what it reproduces.

``TrainConfig.from_preset("esr_ferplus", init_weights=..., data_root=...)`` (CLI:
``--preset esr_ferplus``) gives the model, dataset, protocol, optimiser, schedule, data
pipeline and batch of the public script the preset names; any field can be overridden.
:data:`PRESETS` holds for each preset its ``fields`` (TrainConfig fields), the ``script``
it follows, the ``published`` accuracy it is compared with, and ``differences``: where
fer_lab deliberately departs from that script (each a documented option when a
reproduction needs the script's behaviour).

Sources (read in the public repositories, see ``docs/reproduction.md``): the diversity
paper's code (negarhdr/Diversified-Facial-Expression-Recognition: ``esr_affectnet.py``,
``esr_ferplus.py``, ``esr_rafdb.py``, ``manet_affectnet.py``, ``manet_ferplus.py``,
``manet_rafdb.py``), the official ESR (siqueira-hc/...: ``main_affectnet_discrete.py``,
``main_fer_plus.py``) and the official MA-Net (zengqunzhao/MA-Net: ``main.py``).

Every preset keeps fer_lab's model selection on a validation split (a stratified 10 % of
train where the dataset has none); the scripts select on the reported split for
AffectNet and RAF-DB. This file holds numbers only; nothing here trains.
"""
from __future__ import annotations

__all__ = ["PRESETS", "preset_fields", "preset_help", "PRESET_NAMES", "notebook_parameters", "published_accuracy",
           "format_presets"]

#: Differences from the public scripts shared by every ESR preset.
_ESR_DIFFERENCES = (
    "selection on a validation split, not on the reported split (the AffectNet and RAF-DB scripts select on it)",
    "RGB input (the official ESR weights' first conv is converted from BGR when loaded; "
    "init_channel_order='bgr' keeps it)",
    "unit diagonal of S (diagonal='reference' reproduces the scripts' zero diagonal)",
    "branch BatchNorm in eval mode at test time (model option branch_bn_train_at_test=True reproduces the "
    "scripts, whose branches in a Python list stay in training mode)",
    "validation every epoch, best checkpoint on a strict improvement (the scripts keep the later of equal scores)",
)
_MANET_DIFFERENCES = (
    "selection on a validation split, not on the reported split (manet_rafdb.py and the official main.py "
    "select on the RAF-DB test split)",
    "unit diagonal of S (diagonal='reference' reproduces the scripts' zero diagonal)",
)

_ESR_SGD = dict(optimizer="sgd", momentum=0.9, weight_decay=0.0, batch_size=32, lr_step_at="start", image_size=96)
_ESR_FINETUNE = dict(_ESR_SGD, protocol="esr_finetune", epochs=100, epochs_later=60, lr=0.1, lr_new=0.1,
                     lr_old=0.02, lr_step=10, lr_gamma=0.75)
_MANET_SGD = dict(optimizer="sgd", momentum=0.9, weight_decay=1e-4, lr=0.01, lr_gamma=0.1, lr_step_at="end",
                  protocol="single", image_size=224)
#: RAF-DB's schedule in manet_rafdb.py and the official MA-Net main.py: every training face
_MANET_RAFDB = dict(_MANET_SGD, dataset="rafdb", label_space=None, epochs=100, lr_step=15, batch_size=128,
                    subset_per_class=None)

PRESETS: dict[str, dict] = {
    "esr_affectnet": {
        "fields": dict(_ESR_SGD, model="esr9_div", dataset="affectnet", protocol="esr_growth", epochs=50,
                       epochs_later=20, lr=0.1, lr_new=0.1, lr_old=0.01, lr_step=10, lr_gamma=0.5,
                       subset_per_class=5000, train_transform="esr_train"),
        "script": "esr_affectnet.py (diversity paper, the version with the channel term on the channel "
                  "attention); official main_affectnet_discrete.py for ESR-9 (--model esr9)",
        "published": ("esr9_div", "AffectNet-8"),
        "differences": _ESR_DIFFERENCES,
    },
    "esr_ferplus": {
        "fields": dict(_ESR_FINETUNE, model="esr9_div", dataset="ferplus", data_options={"label_mode": "majority"},
                       label_space="affectnet8", subset_per_class=5000, train_transform="esr_train"),
        "script": "esr_ferplus.py (diversity paper, from its AffectNet ESR*-9); official main_fer_plus.py for "
                  "ESR-9 (--model esr9 with the official weights)",
        "published": ("esr9_div", "FER+"),
        "differences": _ESR_DIFFERENCES + (
            "96 px input as the official main_fer_plus.py (esr_ferplus.py's loader resizes FER+ to 224 px: "
            "--image-size 224)",
            "the channel term compares channel attention (esr_ferplus.py computes it on the spatial attention: "
            "model option channel_term_input='spatial')",
        ),
    },
    "esr_rafdb": {
        "fields": dict(_ESR_FINETUNE, model="esr9_div", model_options={"num_classes": 7}, dataset="rafdb",
                       label_space=None, init_new_heads=True, subset_per_class=None, train_transform="rafdb_train",
                       image_normalize="imagenet", random_erasing=True),
        "script": "esr_rafdb.py (diversity paper, from its AffectNet ESR*-9): new 7-class heads, RAF-DB's "
                  "native class order",
        "published": ("esr9_div", "RAF-DB"),
        "differences": _ESR_DIFFERENCES + (
            "the channel term compares channel attention (esr_rafdb.py computes it on the spatial attention: "
            "model option channel_term_input='spatial'; as stored, esr_rafdb.py stops at its first forward pass)",
        ),
    },
    "manet_affectnet": {
        "fields": dict(_MANET_SGD, model="manet_div", model_options={"num_classes": 8}, dataset="affectnet",
                       epochs=20, lr_step=5, batch_size=128, subset_per_class=5000, train_transform="esr_train"),
        "script": "manet_affectnet.py (diversity paper): 5,000 faces per class drawn once, ESR's augmentation",
        "published": ("manet_div", "AffectNet-8"),
        "differences": _MANET_DIFFERENCES,
    },
    "manet_ferplus": {
        "fields": dict(_MANET_SGD, model="manet_div", model_options={"num_classes": 8}, dataset="ferplus",
                       data_options={"label_mode": "majority"}, label_space="affectnet8", epochs=100, lr_step=15,
                       batch_size=32, subset_per_class=5000, train_transform="esr_train"),
        "script": "manet_ferplus.py (diversity paper): batch 32 (hard-coded there), 5,000 faces per class "
                  "drawn once, ESR's augmentation at 224 px",
        "published": ("manet_div", "FER+"),
        "differences": _MANET_DIFFERENCES,
    },
    "manet_rafdb": {
        "fields": dict(_MANET_RAFDB, model="manet_div", train_transform="rafdb_train", image_normalize="imagenet",
                       random_erasing=True),
        "script": "manet_rafdb.py (diversity paper): every training face, rotation/crop, ImageNet "
                  "normalisation, RandomErasing",
        "published": ("manet_div", "RAF-DB"),
        "differences": _MANET_DIFFERENCES,
    },
    "manet_rafdb_original": {
        "fields": dict(_MANET_RAFDB, model="manet", train_transform="manet_train"),
        "script": "official MA-Net main.py: RandomResizedCrop(224) + flip, no normalisation",
        "published": ("manet", "RAF-DB", "original"),
        "differences": _MANET_DIFFERENCES[:1],
    },
    "manet_affectnet_original": {
        "fields": dict(_MANET_SGD, model="manet", model_options={"num_classes": 8}, dataset="affectnet", epochs=20,
                       lr_step=5, batch_size=128, subset_per_class=None, train_transform="manet_train"),
        "script": "the MA-Net paper's AffectNet protocol (no public script: the official repository trains "
                  "RAF-DB only); main.py's pipeline with 20 epochs and StepLR(5, 0.1)",
        "published": ("manet", "AffectNet-8", "original"),
        "differences": ("selection on a validation split (the paper reports the validation set it selects on)",),
    },
    "ferplus_cpu": {
        "fields": dict(model="esr9", model_options={"num_branches": 4, "width": 0.25, "cbam_reduction": 4,
                                                    "cbam_init": "uniform"},
                       dataset="ferplus", data_options={"label_mode": "majority"}, label_space="affectnet8",
                       image_size=48, protocol="single", epochs=7, optimizer="adam", lr=2e-3, lr_step=3,
                       lr_gamma=0.3, lr_step_at="end", weight_decay=0.0, batch_size=128, eval_batch_size=256,
                       subset_per_class=None, train_transform="light_batch", amp="bf16"),
        "script": "fer_lab's CPU protocol for real faces (not a published one): ESR-4 at quarter width on "
                  "native 48 px FER+ faces, every training face, all branches trained jointly with Adam, "
                  "mild augmentation, bf16 autocast; --model esr9_div for ESR*-4",
        "published": None,
        "differences": ("not a published protocol: sized for 2 CPU cores (bench/ferplus_cpu.py measures it "
                        "against a plain CNN); the paper's protocols are the other presets",
                        "CBAM gates start uniform (cbam_init='uniform': channel MLP output layer and spatial "
                        "BatchNorm scale at zero) and the channel MLP keeps the paper's full-width hidden sizes "
                        "at width 0.25 (cbam_reduction=4); with the paper's random gate initialisation CBAM "
                        "models trail ESR-4 by 1-3 points after 7 epochs (bench/results/ferplus_cpu.json)",
                        "bf16 autocast for the training forward pass (the diversity term stays float32): "
                        "1.5-2.2x faster steps on CPUs with AVX512-BF16 or AMX"),
    },
}
PRESET_NAMES = tuple(PRESETS)
#: TrainConfig fields a preset never sets: where and how a run executes, not what it trains.
_RUNTIME_FIELDS = {"name", "output_dir", "cache_dir", "seed", "device", "num_workers", "progress", "figures",
                   "deterministic", "keep_freed_memory", "eval_batch_size", "data_root", "init_weights"}


def preset_fields(name: str, overrides: dict | None = None) -> dict:
    """TrainConfig fields of preset ``name`` with ``overrides`` on top (``model_options`` and
    ``data_options`` merged key by key) and ``preset=name``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    base = PRESETS[name]["fields"]
    overrides = dict(overrides or {})
    d = {**base, **overrides, "preset": name}
    for key in ("model_options", "data_options"):
        if key in base and key in overrides:
            d[key] = {**base[key], **(overrides[key] or {})}
        elif key in base:
            d[key] = dict(base[key])
    return d


def notebook_parameters(name: str, parameter_names: set[str]) -> dict:
    """Preset ``name`` as parameters of a training notebook whose parameters are ``parameter_names``
    (what a sweep's ``preset:`` injects): each field under the notebook parameter of the same name,
    model options under their flat names (``branches``, ``gamma``, ...) or in ``model_options``,
    every other field in ``train_options``; plus ``preset`` itself. Notebook parameters the preset
    does not set get TrainConfig's default (model options: ``None``, the variant's), except
    where and how the run executes (output and cache directories, seed, device, data root,
    initial weights)."""
    from .config import MODEL_OPTIONS, flat_defaults

    fields = preset_fields(name)
    out: dict = {"preset": name}
    rest: dict = {}
    # what the preset leaves open is TrainConfig's default / the model variant's default,
    # not the notebook's (whose defaults are the CPU demo's); where and how it runs stays
    defaults = flat_defaults()
    for key in parameter_names:
        if key in MODEL_OPTIONS:
            out[key] = None
        elif key in defaults and key not in _RUNTIME_FIELDS:
            out[key] = defaults[key]
    out["preset"] = name
    model_options = dict(fields.pop("model_options", None) or {})
    for flat, target in MODEL_OPTIONS.items():
        if target in model_options and flat in parameter_names:
            out[flat] = model_options.pop(target)
    if model_options:
        (out if "model_options" in parameter_names else rest)["model_options"] = model_options
    for key, value in fields.items():
        if key == "preset":
            continue
        # flat model-option names (e.g. the diversity term's "normalize") are not TrainConfig fields
        if key in parameter_names and key not in MODEL_OPTIONS:
            out[key] = value
        else:
            rest[key] = value
    if rest:
        if "train_options" not in parameter_names:
            raise ValueError(f"preset {name!r} sets {sorted(rest)}, which the notebook has no parameters for "
                             "(and no train_options parameter)")
        out["train_options"] = rest
    return out


def published_accuracy(name: str) -> float | None:
    """The published accuracy (%) the preset ``name`` is compared with (SPEC section 6); ``None``
    for fer_lab's own protocols."""
    from .report import PUBLISHED, PUBLISHED_ORIGINAL

    if PRESETS[name]["published"] is None:
        return None
    model, column, *original = PRESETS[name]["published"]
    table = PUBLISHED_ORIGINAL if original else PUBLISHED
    return table.get(model, {}).get(column)


def preset_help() -> str:
    """One line per preset for ``--help``."""
    return "; ".join(f"{n}: {p['script'].split(' (')[0].split(':')[0]}" for n, p in PRESETS.items())


def format_presets() -> str:
    """Every preset as text: the script it follows, the published accuracy, its fields and
    where fer_lab differs (``python -m fer_lab presets``)."""
    blocks = []
    for name, p in PRESETS.items():
        fields = ", ".join(f"{k}={v!r}" for k, v in p["fields"].items())
        acc = published_accuracy(name)
        pub = f"  published: {acc} % ({p['published'][0]}, {p['published'][1]})" if acc is not None else \
            "  published: - (fer_lab's own protocol)"
        lines = [f"{name}: {p['script']}", pub, f"  fields: {fields}", "  differs from the script:"]
        lines += [f"    - {d}" for d in p["differences"]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
