"""Initialise a model from weights the user supplies (nothing is downloaded here).

:func:`load_pretrained` reads one file with ``torch.load(weights_only=True)`` and maps
its tensors onto a model by name:

- ``"msceleb"``: MA-Net's MS-Celeb-1M checkpoint, ``{'state_dict': ...}`` with
  ``module.`` prefixes (DataParallel) and the public code's names (``layer3_1_p1``,
  ``layer3_2``, ``conv1_2_1``, ``cbam.ChannelGate.mlp.1``, ...), which are translated to
  fer_lab's (``patches.0.layer3``, ``global_branch.layer3``, ``chains.0.0.conv``,
  ``cbam.channel_gate.mlp.0``, ...); fer_lab's own names pass unchanged. Its heads
  (``fc_1``/``fc_2``, 12,666 identities) are always dropped: the model keeps its own.
  The CBAM names assumed are those of the reference CBAM (Park et al.'s
  ``attention-module``: ``ChannelGate.mlp.{1,3}``, ``SpatialGate.spatial.{conv,bn}``);
  if a file differs, the mismatch report names every key.
- ``"torchvision"``: a torchvision ResNet-18 state dict. Its ``conv1``, ``bn1``,
  ``layer1``, ``layer2`` go into MA-Net's stem (same names, same shapes). Its
  ``layer3``/``layer4``/``fc`` are ignored: the public MA-Net never initialises its
  patch or global branches from ImageNet (it starts every part from MS-Celeb-1M), and
  torchvision's layer4 has stride 2 where a patch branch's has stride 1, so we do not
  invent a mapping it never used. Only the stem is expected; the rest stays as built.
- ``"fer_lab"``: fer_lab's own checkpoints (``checkpoints/best.pt``: ``{"model":
  state_dict, "model_config": ...}``) or a bare state dict, for any model family (e.g.
  an ESR trained on AffectNet fine-tuned with new 7-class heads via a partial load).
- ``"auto"``: ``{"model", "model_config"}`` -> fer_lab; ``{"state_dict"}`` -> msceleb;
  a bare state dict with torchvision ResNet names (``fc.weight``, ``layer4.1.conv2.weight``)
  -> torchvision; another bare state dict with MA-Net public names -> msceleb; else fer_lab.

Any missing key (in the part the source is expected to cover), unexpected key or shape
mismatch raises :class:`PretrainedMismatchError` listing them, unless
``allow_partial=True``, which loads every tensor whose name and shape match and leaves
the rest as initialised. BatchNorm's ``num_batches_tracked`` counters are never
required. The returned report (JSON-able) says what was loaded, dropped and left alone.

This file maps names; it builds no models and trains nothing.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from torch import nn

SOURCES = ("auto", "msceleb", "torchvision", "fer_lab")

#: How many keys of each kind an error message lists before "... and N more".
MAX_LISTED = 20

# public MA-Net name -> fer_lab name (applied in order, after stripping ``module.``)
_MSCELEB_RULES = (
    (re.compile(r"^(conv1|bn1|layer1|layer2)\."), r"stem.\1."),
    (re.compile(r"^layer([34])_1_p([1-4])\."), lambda m: f"patches.{int(m[2]) - 1}.layer{m[1]}."),
    (re.compile(r"^layer([34])_2\."), r"global_branch.layer\1."),
    (re.compile(r"\.(conv|bn)([12])_2_([1-4])\."), lambda m: f".chains.{int(m[2]) - 1}.{int(m[3]) - 1}.{m[1]}."),
    (re.compile(r"\.cbam\.ChannelGate\.mlp\.1\."), ".cbam.channel_gate.mlp.0."),
    (re.compile(r"\.cbam\.ChannelGate\.mlp\.3\."), ".cbam.channel_gate.mlp.2."),
    (re.compile(r"\.cbam\.SpatialGate\.spatial\.(conv|bn)\."), r".cbam.spatial_gate.\1."),
    (re.compile(r"^fc_1\."), "fc_local."),
    (re.compile(r"^fc_2\."), "fc_global."),
)
_MANET_HEADS = ("fc_local.", "fc_global.")
_TORCHVISION_STEM = ("conv1.", "bn1.", "layer1.", "layer2.")
_TORCHVISION_IGNORED = ("layer3.", "layer4.", "fc.")


class PretrainedMismatchError(ValueError):
    """The file does not match the model; ``missing``, ``unexpected`` and ``mismatched``
    (``{key: (file shape, model shape)}``) say how."""

    def __init__(self, message: str, missing: list, unexpected: list, mismatched: dict):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


def strip_prefix(state: dict, prefix: str = "module.") -> dict:
    """``state`` with ``prefix`` removed from every key that starts with it (DataParallel's ``module.``)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def msceleb_key(key: str) -> str:
    """fer_lab name of a public MA-Net key (``module.`` already stripped); fer_lab names pass unchanged.

    ``"layer3_1_p2.0.cbam.ChannelGate.mlp.1.weight" -> "patches.1.layer3.0.cbam.channel_gate.mlp.0.weight"``.
    """
    for pattern, repl in _MSCELEB_RULES:
        key = pattern.sub(repl, key)
    return key


def read_checkpoint(path) -> dict:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that say what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"initial weights {path}: no such file (fer_lab downloads nothing; supply the file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused or not a torch file
        raise ValueError(f"initial weights {path} could not be read with torch.load(weights_only=True): {err}. "
                         "If it holds pickled Python objects besides tensors (optimizer, recorder, ...), "
                         "re-save just its tensors: "
                         "torch.save({'state_dict': ckpt['state_dict']}, 'clean.pth')") from None
    if not isinstance(obj, dict):
        raise ValueError(f"initial weights {path}: expected a dict (a state dict or a checkpoint), "
                         f"got {type(obj).__name__}")
    return obj


def detect_source(obj: dict) -> str:
    """The source ``"auto"`` resolves to for a loaded file (see the module docstring)."""
    if isinstance(obj.get("model"), dict) and "model_config" in obj:
        return "fer_lab"
    if isinstance(obj.get("state_dict"), dict):
        return "msceleb"
    keys = set(strip_prefix(_tensors(obj, "file")))
    if {"fc.weight", "layer4.1.conv2.weight", "conv1.weight"} <= keys:
        return "torchvision"
    if any(re.match(r"layer[34]_(1_p[1-4]|2)\.", k) for k in keys):
        return "msceleb"
    return "fer_lab"


def _tensors(state, what: str) -> dict:
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{what}: expected a non-empty state dict of tensors")
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{what}: expected a state dict of tensors; not tensors: {bad[:MAX_LISTED]}")
    return state


def _state_of(obj: dict, source: str) -> tuple[dict, dict]:
    """``(state dict, extra report fields)`` of a loaded file for ``source``."""
    if source == "fer_lab":
        if isinstance(obj.get("model"), dict):
            extra = {"checkpoint_model_config": obj.get("model_config")}
            for k in ("stage", "epoch", "val_score"):
                if k in obj:
                    extra[f"checkpoint_{k}"] = obj[k]
            return _tensors(obj["model"], "fer_lab checkpoint 'model'"), extra
        return _tensors(obj, "state dict"), {}
    if source == "msceleb" and isinstance(obj.get("state_dict"), dict):
        return _tensors(obj["state_dict"], "MS-Celeb checkpoint 'state_dict'"), {}
    return _tensors(obj, "state dict"), {}


def _map(model: nn.Module, state: dict, source: str) -> tuple[dict, set, list, list]:
    """``(mapped state, keys in scope, dropped file keys, ignored file keys)``."""
    own = set(model.state_dict())
    dropped, ignored = [], []
    if source == "fer_lab":
        return strip_prefix(state), own, dropped, ignored
    mapped = {}
    if source == "msceleb":
        for key, value in strip_prefix(state).items():
            new = msceleb_key(key)
            if new.startswith(_MANET_HEADS):
                dropped.append(key)            # identity heads: meaningless for expressions
            else:
                mapped[new] = value
        return mapped, {k for k in own if not k.startswith(_MANET_HEADS)}, dropped, ignored
    # torchvision ResNet-18 -> the stem only
    for key, value in strip_prefix(state).items():
        if key.startswith(_TORCHVISION_IGNORED):
            ignored.append(key)
        else:
            mapped[f"stem.{key}"] = value
    return mapped, {k for k in own if k.startswith("stem.")}, dropped, ignored


def _listed(keys) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_pretrained(model: nn.Module, path, source: str = "auto", allow_partial: bool = False) -> dict:
    """Load the weights in ``path`` into ``model`` (in place); returns a JSON-able report.

    ``source``: ``"auto"``, ``"msceleb"``, ``"torchvision"`` or ``"fer_lab"`` (module
    docstring). Without ``allow_partial``, any missing key (within the part the source
    covers: all of the model but its heads for msceleb, the stem for torchvision, all of
    it for fer_lab), unexpected key or shape mismatch raises
    :class:`PretrainedMismatchError` naming them and nothing is loaded; with it, the
    tensors whose names and shapes match are loaded and the others left as they are.

    The report holds ``path``, ``sha256``, ``source``, ``partial``, ``loaded`` (count of
    tensors), ``loaded_parameters`` / ``model_parameters`` (numbers of weights, buffers
    excluded), ``missing``, ``unexpected``, ``mismatched`` (``{key: [file shape, model
    shape]}``), ``dropped`` (file heads not used, msceleb) and ``ignored`` (file keys
    outside the mapping, torchvision), plus the checkpoint's model config for fer_lab files.
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: expected one of {SOURCES}")
    path = Path(path)
    obj = read_checkpoint(path)
    resolved = detect_source(obj) if source == "auto" else source
    if resolved != "fer_lab" and getattr(model, "family", None) != "manet":
        raise ValueError(f"initial weights {path}: source {resolved!r} maps onto MA-Net, but this model's family "
                         f"is {getattr(model, 'family', type(model).__name__)!r} (fer_lab checkpoints of it load "
                         "with source='fer_lab')")
    state, extra = _state_of(obj, resolved)
    mapped, scope, dropped, ignored = _map(model, state, resolved)

    own = model.state_dict()
    missing = sorted(k for k in scope - set(mapped) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in mapped if k not in own)
    mismatched = {k: [list(v.shape), list(own[k].shape)] for k, v in mapped.items()
                  if k in own and v.shape != own[k].shape}
    if (missing or unexpected or mismatched) and not allow_partial:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (in the model, not in the file): {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (in the file, not in the model): {_listed(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} key(s) with another shape (file vs model): "
                         + _listed(f"{k} {tuple(a)} vs {tuple(b)}" for k, (a, b) in mismatched.items()))
        raise PretrainedMismatchError(
            f"initial weights {path} (source {resolved!r}) do not match the model "
            f"{getattr(model, 'name', type(model).__name__)!r}:\n  " + "\n  ".join(parts)
            + "\nNothing was loaded. Pass allow_partial=True (CLI: --init-partial) to load the tensors whose names "
              "and shapes match and keep the others as initialised.", missing, unexpected, mismatched)

    load = {k: v for k, v in mapped.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(load, strict=False)
    params = dict(model.named_parameters())
    return {
        "path": str(path), "sha256": _sha256(path), "source": resolved, "requested_source": source,
        "partial": bool(missing or unexpected or mismatched), "allow_partial": bool(allow_partial),
        "loaded": len(load), "loaded_parameters": int(sum(v.numel() for k, v in load.items() if k in params)),
        "model_parameters": int(sum(p.numel() for p in params.values())),
        "missing": missing, "unexpected": unexpected, "mismatched": mismatched,
        "dropped": sorted(dropped), "ignored": sorted(ignored), **extra,
    }
