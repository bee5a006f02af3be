"""Initialise a model from weights the user supplies (nothing is downloaded here).

:func:`load_pretrained` reads one file with ``torch.load(weights_only=True)`` (or, for
the official ESR set, one directory of such files) and maps its tensors onto a model by
name:

- ``"esr_official"``: the official ESR checkpoint set (siqueira-hc's ESR repository,
  ``model/ml/trained_models/esr_9/``): a *directory* holding
  ``Net-Base-Shared_Representations.pt`` and ``Net-Branch_1.pt`` ... ``Net-Branch_L.pt``,
  each a plain state dict (torch's legacy serialisation). ESR models only (``family ==
  "esr"``, ``width=1.0``, ``in_channels=3``). Names: the base file's ``conv<j>.*`` /
  ``bn<j>.*`` -> ``base.blocks.<j-1>.conv.*`` / ``.bn.*``; branch file ``k``'s
  ``conv<j>.*`` / ``bn<j>.*`` -> ``branches.<k-1>.convs.blocks.<j-1>.conv.*`` / ``.bn.*``
  and ``fc.*`` -> ``branches.<k-1>.fc.*``; its ``fc_dimensional.*`` (the valence/arousal
  head fer_lab does not have) is dropped. File-side names in the report are
  ``"<file name>:<key>"``. Branch files beyond the model's branch count are ignored (a
  9-branch set into a 4-branch model loads branches 1-4); a branch file missing for a
  branch the model has makes that branch's keys missing. The official code feeds BGR
  images (OpenCV) in [0, 1] at 96 px: with ``channel_order="rgb"`` (default) the first
  conv's input channels are reversed so the loaded model takes RGB like everything else in
  fer_lab; ``channel_order="bgr"`` keeps the file's weights (then feed BGR images). The
  file has no CBAM: loading into ESR* variants (``esr9_att``, ``esr9_div``, ...) leaves
  every ``.cbam.`` tensor as initialised and lists them in ``not_in_source`` (not an
  error). ``path`` may also be the base file itself (its directory is used).
- ``"msceleb"``: MA-Net's MS-Celeb-1M checkpoint, ``{'state_dict': ...}`` with
  ``module.`` prefixes (DataParallel) and the public code's names (``layer3_1_p1``,
  ``layer3_2``, ``conv1_2_1``, ``cbam.ChannelGate.mlp.1``, ...), which are translated to
  fer_lab's (``patches.0.layer3``, ``global_branch.layer3``, ``chains.0.0.conv``,
  ``cbam.channel_gate.mlp.0``, ...); fer_lab's own names pass unchanged. Its heads
  (``fc_1``/``fc_2``, 12,666 identities) are always dropped: the model keeps its own.
  The CBAM names assumed are those of the reference CBAM (Park et al.'s
  ``attention-module``: ``ChannelGate.mlp.{1,3}``, ``SpatialGate.spatial.{conv,bn}``);
  if a file differs, the mismatch report names every key. Loading it into a model with
  ``chain_order="descending"`` warns (the diversity paper's code runs it ``"ascending"``).
- ``"torchvision"``: a torchvision ResNet-18 state dict. Its ``conv1``, ``bn1``,
  ``layer1``, ``layer2`` go into MA-Net's stem (same names, same shapes). Its
  ``layer3``/``layer4``/``fc`` are ignored: the public MA-Net never initialises its
  patch or global branches from ImageNet (it starts every part from MS-Celeb-1M), and
  torchvision's layer4 has stride 2 where a patch branch's has stride 1, so we do not
  invent a mapping it never used. Only the stem is expected; the rest stays as built.
- ``"fer_lab"``: fer_lab's own checkpoints (``checkpoints/best.pt``: ``{"model":
  state_dict, "model_config": ...}``) or a bare state dict, for any model family (e.g.
  an ESR trained on AffectNet fine-tuned with new 7-class heads, ``new_heads=True``).
- ``"auto"``: a directory holding ``Net-Base-Shared_Representations.pt`` (or that file
  itself) -> esr_official; ``{"model", "model_config"}`` -> fer_lab; ``{"state_dict"}``
  -> msceleb; a bare state dict with torchvision ResNet names (``fc.weight``,
  ``layer4.1.conv2.weight``) -> torchvision; another bare state dict with MA-Net public
  names -> msceleb; else fer_lab.

Options of :func:`load_pretrained`:

- ``allow_partial``: any missing key (in the part the source is expected to cover),
  unexpected key or shape mismatch raises :class:`PretrainedMismatchError` listing them,
  unless ``allow_partial=True``, which loads every tensor whose name and shape match and
  leaves the rest as initialised. A load that would take *no* tensor from the file (none
  matches by name and shape) is an error even then, never a silent random start.
- ``new_heads``: drop the file's classifier heads and keep the model's own (ESR:
  ``branches.*.fc.*``; MA-Net: ``fc_local``/``fc_global``): fine-tuning into another class
  set, e.g. RAF-DB's 7 classes from an 8-class AffectNet model. Without it, heads of
  another shape are a mismatch whose message suggests ``new_heads=True``.
- ``channel_order``: ``"rgb"`` (default) or ``"bgr"``, see esr_official; every other
  source is RGB already and accepts ``"rgb"`` only.

BatchNorm's ``num_batches_tracked`` counters are never required. The returned report
(JSON-able, :func:`load_pretrained` lists its fields) says what was loaded, dropped,
ignored and left alone.

This file maps names; it builds no models and trains nothing.
"""
from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

import torch
from torch import nn

SOURCES = ("auto", "msceleb", "torchvision", "fer_lab", "esr_official")
CHANNEL_ORDERS = ("rgb", "bgr")

#: How many keys of each kind an error message lists before "... and N more".
MAX_LISTED = 20

#: File names of the official ESR checkpoint set (a directory).
ESR_OFFICIAL_BASE = "Net-Base-Shared_Representations.pt"
ESR_OFFICIAL_BRANCH = "Net-Branch_{}.pt"
_ESR_OFFICIAL_BRANCH_RE = re.compile(r"^Net-Branch_([1-9][0-9]*)\.pt$")
_ESR_OFFICIAL_LAYER_RE = re.compile(r"^(conv|bn)([1-4])\.(.+)$")
_ESR_OFFICIAL_FIRST_CONV = "base.blocks.0.conv.weight"
_ESR_HEAD_RE = re.compile(r"^branches\.\d+\.fc\.")

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


def esr_official_key(key: str, branch: int | None = None) -> str | None:
    """fer_lab name of a key of the official ESR set: ``branch=None`` for the base file, ``k``
    (1-based) for ``Net-Branch_k.pt``. ``None`` for a key outside the mapping (``fc_dimensional.*``,
    anything unknown).

    ``esr_official_key("bn2.running_var") == "base.blocks.1.bn.running_var"``;
    ``esr_official_key("conv4.weight", 3) == "branches.2.convs.blocks.3.conv.weight"``;
    ``esr_official_key("fc.bias", 1) == "branches.0.fc.bias"``.
    """
    m = _ESR_OFFICIAL_LAYER_RE.match(key)
    if branch is None:
        return f"base.blocks.{int(m[2]) - 1}.{m[1]}.{m[3]}" if m else None
    if m:
        return f"branches.{branch - 1}.convs.blocks.{int(m[2]) - 1}.{m[1]}.{m[3]}"
    if key.startswith("fc.") and key.count(".") == 1:
        return f"branches.{branch - 1}.{key}"
    return None


def esr_official_dir(path) -> Path | None:
    """The directory of an official ESR set that ``path`` names (the directory holding
    :data:`ESR_OFFICIAL_BASE`, or that file itself), else ``None``."""
    path = Path(path)
    if path.is_dir() and (path / ESR_OFFICIAL_BASE).is_file():
        return path
    if path.is_file() and path.name == ESR_OFFICIAL_BASE:
        return path.parent
    return None


def _expected_official() -> str:
    return (f"the official ESR set is a directory holding {ESR_OFFICIAL_BASE} and "
            f"{ESR_OFFICIAL_BRANCH.format(1)} ... {ESR_OFFICIAL_BRANCH.format('L')} (one per branch)")


def read_checkpoint(path) -> dict:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that say what to do."""
    path = Path(path)
    if path.is_dir():
        if esr_official_dir(path) is not None:
            raise ValueError(f"initial weights {path}: a directory holding the official ESR set; load it with "
                             "source='esr_official' (or 'auto'); every other source is a single file")
        raise FileNotFoundError(f"initial weights {path}: a directory without {ESR_OFFICIAL_BASE}; "
                                f"{_expected_official()}; every other source is a single file")
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


def read_esr_official(path, num_branches: int) -> dict:
    """Read the official ESR set at ``path`` (its directory, or its base file) for a model with
    ``num_branches`` branches.

    Returns ``{"directory": Path, "states": {file name: state dict} (base first, then the
    branch files 1..num_branches that exist), "missing_files": [names of Net-Branch_k.pt
    absent for k <= num_branches], "ignored_files": [names of branch files with k >
    num_branches, not read]}``. A directory without the base file raises
    :class:`FileNotFoundError` naming the files expected.
    """
    directory = esr_official_dir(path)
    if directory is None:
        raise FileNotFoundError(f"initial weights {path} (source 'esr_official'): no {ESR_OFFICIAL_BASE} there; "
                                f"{_expected_official()}")
    present = {}
    for f in directory.iterdir():
        m = _ESR_OFFICIAL_BRANCH_RE.match(f.name)
        if m and f.is_file():
            present[int(m[1])] = f
    states = {ESR_OFFICIAL_BASE: _tensors(read_checkpoint(directory / ESR_OFFICIAL_BASE),
                                          str(directory / ESR_OFFICIAL_BASE))}
    missing_files = []
    for k in range(1, int(num_branches) + 1):
        if k in present:
            states[present[k].name] = _tensors(read_checkpoint(present[k]), str(present[k]))
        else:
            missing_files.append(ESR_OFFICIAL_BRANCH.format(k))
    ignored = [present[k].name for k in sorted(present) if k > int(num_branches)]
    return {"directory": directory, "states": states, "missing_files": missing_files, "ignored_files": ignored}


def detect_source(obj: dict) -> str:
    """The source ``"auto"`` resolves to for a loaded file (see the module docstring; the
    official ESR set, a directory, is recognised by :func:`esr_official_dir` before reading)."""
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


def _head_test(model: nn.Module):
    """Predicate: is a model key one of its classifier heads (what ``new_heads`` replaces)?"""
    family = getattr(model, "family", None)
    if family == "esr":
        return lambda k: bool(_ESR_HEAD_RE.match(k))
    if family == "manet":
        return lambda k: k.startswith(_MANET_HEADS)
    raise ValueError(f"new_heads=True: fer_lab knows the classifier heads of the ESR and MA-Net families only, "
                     f"not of {family or type(model).__name__!r}")


def _map(model: nn.Module, state: dict, source: str) -> tuple[dict, dict, set, list, list]:
    """``(mapped state, {model key: file key}, keys in scope, dropped file keys, ignored file keys)``.

    For ``esr_official`` ``state`` is ``{file name: state dict}`` and file keys are
    ``"<file name>:<key>"``; a file key outside the mapping (other than ``fc_dimensional``)
    keeps that qualified name, so it is reported as unexpected.
    """
    own = set(model.state_dict())
    dropped, ignored, mapped, origin = [], [], {}, {}

    def put(new, old, value):
        mapped[new], origin[new] = value, old

    if source == "fer_lab":
        for key, value in strip_prefix(state).items():
            put(key, key, value)
        return mapped, origin, own, dropped, ignored
    if source == "esr_official":
        for fname, sd in state.items():
            m = _ESR_OFFICIAL_BRANCH_RE.match(fname)
            branch = int(m[1]) if m else None
            for key, value in strip_prefix(sd).items():
                qualified = f"{fname}:{key}"
                new = esr_official_key(key, branch)
                if new is not None:
                    put(new, qualified, value)
                elif branch is not None and key.startswith("fc_dimensional."):
                    dropped.append(qualified)          # valence/arousal head: fer_lab has none
                else:
                    put(qualified, qualified, value)   # unexpected, named by file
        return mapped, origin, {k for k in own if ".cbam." not in k}, dropped, ignored
    if source == "msceleb":
        for key, value in strip_prefix(state).items():
            new = msceleb_key(key)
            if new.startswith(_MANET_HEADS):
                dropped.append(key)            # identity heads: meaningless for expressions
            else:
                put(new, key, value)
        return mapped, origin, {k for k in own if not k.startswith(_MANET_HEADS)}, dropped, ignored
    # torchvision ResNet-18 -> the stem only
    for key, value in strip_prefix(state).items():
        if key.startswith(_TORCHVISION_IGNORED):
            ignored.append(key)
        else:
            put(f"stem.{key}", key, value)
    return mapped, origin, {k for k in own if k.startswith("stem.")}, dropped, ignored


def _listed(keys, limit: int = MAX_LISTED) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _few(keys) -> list:
    """``keys`` in their order, BatchNorm counters last (what to show of a key list)."""
    keys = list(keys)
    return [k for k in keys if not k.endswith("num_batches_tracked")] + \
        [k for k in keys if k.endswith("num_batches_tracked")]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _family_of(model: nn.Module) -> str:
    return getattr(model, "family", None) or type(model).__name__


def load_pretrained(model: nn.Module, path, source: str = "auto", allow_partial: bool = False, *,
                    new_heads: bool = False, channel_order: str = "rgb") -> dict:
    """Load the weights in ``path`` into ``model`` (in place); returns a JSON-able report.

    ``source``: ``"auto"``, ``"msceleb"``, ``"torchvision"``, ``"fer_lab"`` or
    ``"esr_official"`` (``path`` a directory, or its base file; module docstring). Without
    ``allow_partial``, any missing key (within the part the source covers: all of the model
    but its heads for msceleb, the stem for torchvision, all but the CBAM modules for
    esr_official, all of it for fer_lab; minus the heads with ``new_heads``), unexpected
    key or shape mismatch raises :class:`PretrainedMismatchError` naming them and nothing
    is loaded; with it, the tensors whose names and shapes match are loaded and the others
    left as they are. Loading no tensor at all raises :class:`PretrainedMismatchError`
    either way. ``new_heads=True`` drops the file's classifier heads and keeps the model's
    (ESR ``branches.*.fc``, MA-Net ``fc_local``/``fc_global``). ``channel_order``:
    ``"rgb"`` (default; the official ESR's first conv is converted from BGR) or ``"bgr"``
    (esr_official only: keep the file's BGR weights, feed BGR images).

    The report holds ``path`` (the directory for esr_official), ``sha256`` (of the file;
    for esr_official, of the ``sha256sum``-style lines ``"<sha256>  <name>"`` of the files
    read, sorted by name, each listed in ``files``: ``{name: sha256}``), ``source``,
    ``requested_source``, ``partial``, ``allow_partial``, ``new_heads``, ``channel_order``
    (the input the loaded model expects), ``loaded`` (count of tensors), ``loaded_keys``
    (sorted model keys loaded from the file), ``loaded_parameters`` / ``model_parameters``
    (numbers of weights, buffers excluded), ``missing``, ``unexpected``, ``mismatched``
    (``{key: [file shape, model shape]}``), ``not_in_source`` (sorted model keys the source
    does not cover, left as initialised: MA-Net's heads for msceleb, all but the stem for
    torchvision, every ``.cbam.`` key for esr_official, the heads with ``new_heads``),
    ``dropped`` (file keys deliberately not used: msceleb's identity heads, esr_official's
    ``fc_dimensional``, heads under ``new_heads``) and ``ignored`` (file keys outside the
    mapping: torchvision's ``layer3``/``layer4``/``fc``; esr_official's branch files beyond
    the model's branch count, by file name), plus the checkpoint's model config for fer_lab
    files and, for esr_official, ``missing_files`` (branch files absent for branches the
    model has) and ``converted`` (keys changed on the way: the first conv under ``"rgb"``).
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r}: expected one of {SOURCES}")
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order={channel_order!r}: expected one of {CHANNEL_ORDERS}")
    path = Path(path)
    family = _family_of(model)
    official = esr_official_dir(path) if source in ("auto", "esr_official") else None
    extra: dict = {}
    if source == "esr_official" or official is not None:
        resolved = "esr_official"
        if family != "esr":
            raise ValueError(f"initial weights {path}: the official ESR set maps onto ESR models, but this model's "
                             f"family is {family!r}")
        if getattr(model, "in_channels", 3) != 3:
            raise ValueError(f"initial weights {path}: the official ESR takes 3-channel (BGR) images, but this model "
                             f"has in_channels={model.in_channels}; build it with in_channels=3")
        read = read_esr_official(path, model.num_branches)
        path, state = read["directory"], read["states"]
        files = {name: _sha256(path / name) for name in state}
        digest = hashlib.sha256("".join(f"{files[n]}  {n}\n" for n in sorted(files)).encode()).hexdigest()
        extra = {"files": files, "missing_files": read["missing_files"]}
    else:
        obj = read_checkpoint(path)
        resolved = detect_source(obj) if source == "auto" else source
        if resolved != "fer_lab" and family != "manet":
            raise ValueError(f"initial weights {path}: source {resolved!r} maps onto MA-Net, but this model's "
                             f"family is {family!r} (fer_lab checkpoints of it load with source='fer_lab')")
        if resolved == "msceleb" and getattr(model, "chain_order", "ascending") == "descending":
            warnings.warn(f"initial weights {path}: an MS-Celeb-1M MA-Net checkpoint goes with "
                          "chain_order='ascending' (the diversity paper's diversified_manet.py, which starts from "
                          "it, runs the multi-scale blocks' second chain ascending), but this model's second "
                          "chain is 'descending'; the weights load, the features will differ", stacklevel=2)
        state, extra = _state_of(obj, resolved)
        digest = _sha256(path)
    if channel_order == "bgr" and resolved != "esr_official":
        raise ValueError(f"channel_order='bgr' applies to the official ESR set only (trained on BGR images); "
                         f"source {resolved!r} ({path}) is RGB already: use channel_order='rgb'")
    mapped, origin, scope, dropped, ignored = _map(model, state, resolved)
    if resolved == "esr_official":
        ignored = sorted(ignored) + read["ignored_files"]                # branch files in numeric order
        converted = []
        first = mapped.get(_ESR_OFFICIAL_FIRST_CONV)
        if channel_order == "rgb" and first is not None and first.dim() == 4 and first.shape[1] == 3:
            mapped[_ESR_OFFICIAL_FIRST_CONV] = first.flip(1)       # BGR input channels -> RGB
            converted.append(_ESR_OFFICIAL_FIRST_CONV)
        extra["converted"] = converted
    if new_heads:
        is_head = _head_test(model)
        for key in [k for k in mapped if is_head(k)]:
            dropped.append(origin[key])
            del mapped[key]
        scope = {k for k in scope if not is_head(k)}

    own = model.state_dict()
    not_in_source = sorted(set(own) - scope)
    missing = sorted(k for k in scope - set(mapped) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in mapped if k not in own)
    mismatched = {k: [list(v.shape), list(own[k].shape)] for k, v in mapped.items()
                  if k in own and v.shape != own[k].shape}
    name = getattr(model, "name", type(model).__name__)
    if (missing or unexpected or mismatched) and not allow_partial:
        parts = []
        if extra.get("missing_files"):
            parts.append(f"{len(extra['missing_files'])} branch file(s) not in {path} for branches the model has: "
                         + _listed(extra["missing_files"]))
        if missing:
            parts.append(f"{len(missing)} missing key(s) (in the model, not in the file): {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (in the file, not in the model): {_listed(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} key(s) with another shape (file vs model): "
                         + _listed(f"{k} {tuple(a)} vs {tuple(b)}" for k, (a, b) in mismatched.items()))
        hints = []
        is_head = _head_test(model) if family in ("esr", "manet") else (lambda k: False)
        if not new_heads and any(is_head(k) and a[0] != b[0] for k, (a, b) in mismatched.items()):
            hints.append("The classifier heads have another number of classes: pass new_heads=True "
                         "(CLI: --init-new-heads) to keep the model's own heads and load the rest.")
        if resolved == "esr_official" and getattr(model, "width", 1.0) != 1.0:
            hints.append(f"The official ESR has width 1.0; this model has width {model.width}.")
        raise PretrainedMismatchError(
            f"initial weights {path} (source {resolved!r}) do not match the model {name!r}:\n  "
            + "\n  ".join(parts) + "\n" + "".join(h + "\n" for h in hints)
            + "Nothing was loaded. Pass allow_partial=True (CLI: --init-partial) to load the tensors whose names "
              "and shapes match and keep the others as initialised.", missing, unexpected, mismatched)

    load = {k: v for k, v in mapped.items() if k in own and v.shape == own[k].shape}
    if not any(not k.endswith("num_batches_tracked") for k in load):
        shown = _listed(_few(origin.values()), 5) or (f"none that the source maps (dropped: {_listed(dropped, 5)}; "
                                                      f"ignored: {_listed(ignored, 5)})")
        raise PretrainedMismatchError(
            f"initial weights {path} (source {resolved!r}): nothing matched the model {name!r} (no tensor with a "
            f"model key of the same shape), so nothing was loaded; with allow_partial=True too, an initialisation "
            f"that loads nothing is an error, not a random start. File keys: {shown}; model keys: "
            f"{_listed(_few(own), 5)}",
            missing, unexpected, mismatched)
    model.load_state_dict(load, strict=False)
    params = dict(model.named_parameters())
    return {
        "path": str(path), "sha256": digest, "source": resolved, "requested_source": source,
        "partial": bool(missing or unexpected or mismatched), "allow_partial": bool(allow_partial),
        "new_heads": bool(new_heads), "channel_order": channel_order,
        "loaded": len(load), "loaded_keys": sorted(load),
        "loaded_parameters": int(sum(v.numel() for k, v in load.items() if k in params)),
        "model_parameters": int(sum(p.numel() for p in params.values())),
        "missing": missing, "unexpected": unexpected, "mismatched": mismatched, "not_in_source": not_in_source,
        "dropped": sorted(dropped), "ignored": ignored if resolved == "esr_official" else sorted(ignored), **extra,
    }
