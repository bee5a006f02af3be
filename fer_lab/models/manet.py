"""MA-Net: global multi-scale and local attention network (Zhao et al., IEEE TIP 2021).

A ResNet-18 stem (conv1 .. layer2, torchvision's ``BasicBlock``) feeds two branches
(SPEC section 4):

- the **local** branch splits the stem's map into four non-overlapping quadrants
  (patches); each patch has its own residual layers (``layer3``: 2 blocks 128->256
  stride 2, ``layer4``: 2 blocks 256->512 stride 1) of BasicBlocks with CBAM after the
  second BatchNorm (:class:`AttentiveBlock`). The four patch maps are re-tiled, average
  pooled and classified by ``fc_local``;
- the **global** branch runs the whole map through two layers of two multi-scale
  blocks each (:class:`MultiScaleBlock`; 128->256 and 256->512, both stride 2),
  average pools and classifies with ``fc_global``.

Logits are fused as ``w * local + (1 - w) * global`` with ``w = local_weight = 0.6``;
the loss is ``w CE(local) + (1 - w) CE(global) - (D_b + D_sp + D_ch)`` over the terms
switched on in the :class:`~fer_lab.diversity.DiversityConfig` (MA-Net* of Heidari &
Iosifidis). Parameters: 50,547,214 for 7 classes (stem+layer1+layer2 683,072; each
patch branch 10,577,392; global branch 7,547,392; two heads).

The patch split is derived from the stem's output size, so any input whose stem map
has even sides works (224 px -> 28x28 map -> four 14x14 patches, as in the paper;
112 px -> four 7x7 patches for CPU work); :func:`check_input_size` explains the rest.

Chain order of the multi-scale block (``chain_order``): the block splits its channels
into 4 groups and runs two Res2Net-style chains of 3x3 conv+BN over them. The first
chain always goes group 1 -> 4. The second goes 1 -> 4 as well in the 2021 public code,
the MS-Celeb-1M checkpoint and the diversity paper's ``diversified_manet.py``
(``"ascending"``, the default: the version the published numbers come from; both chains
have the same structure and differ only by their weights), and 4 -> 1 after a 2023
change to the public code (``"descending"``). The option changes outputs, not the
parameter count or the checkpoint layout; loading an MS-Celeb-1M checkpoint into a
``"descending"`` model warns.

This file holds the architecture and its loss; loading MS-Celeb-1M or torchvision
weights lives in :mod:`fer_lab.models.pretrained`, training in :mod:`fer_lab.train`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1, conv3x3

from ..diversity import DiversityConfig
from .base import CamTarget, FERModel
from .cbam import CBAM
from .common import LossOutput, diversity_loss, multi_head_ce
from .registry import register_model

#: Number of patches of the local branch (a 2 x 2 grid of quadrants, row-major:
#: top-left, top-right, bottom-left, bottom-right).
NUM_PATCHES = 4
PATCH_GRID = 2
CHAIN_ORDERS = ("ascending", "descending")
FEATURE_CHANNELS = 512


# ---- geometry -----------------------------------------------------------------------------
def stem_output_size(side: int) -> int:
    """Side of the stem's (layer2) map for an input side in pixels: ``224 -> 28``, ``112 -> 14``.

    conv1 (7x7, stride 2, pad 3), max-pool (3x3, stride 2, pad 1) and layer2's stride-2
    3x3 conv each map ``n -> floor((n - 1) / 2) + 1 = ceil(n / 2)``.
    """
    n = int(side)
    for _ in range(3):
        n = (n - 1) // 2 + 1
    return n


def _splittable(side: int) -> bool:
    n = stem_output_size(side)
    return n >= PATCH_GRID and n % PATCH_GRID == 0


def check_input_size(height: int, width: int | None = None) -> tuple[int, int]:
    """Validate an input size; returns the stem map size ``(h, w)``.

    Raises ``ValueError`` naming the input size, the stem map it gives and the nearest
    input sides that work (those whose stem map has even sides, e.g. 112, 128, 224).
    """
    width = height if width is None else width
    bad = [s for s in (height, width) if not _splittable(s)]
    if bad:
        s = bad[0]
        below = next((t for t in range(s - 1, 0, -1) if _splittable(t)), None)
        above = next(t for t in range(s + 1, s + 64) if _splittable(t))
        near = f"{below} or {above}" if below else f"{above}"
        raise ValueError(
            f"MA-Net input {height}x{width} px gives a {stem_output_size(height)}x{stem_output_size(width)} map "
            f"after layer2, which cannot be split into {PATCH_GRID}x{PATCH_GRID} equal patches (each side of the "
            f"map, ceil(side / 8), must be even and >= {PATCH_GRID}). Nearest working side for {s} px: {near}; "
            f"the paper uses 224, CPU work 112 (sides in (16k - 8, 16k] work for any k >= 1)")
    return stem_output_size(height), stem_output_size(width)


def split_patches(x: torch.Tensor) -> list[torch.Tensor]:
    """Four non-overlapping quadrants, row-major: ``(B, C, H, W) -> 4 x (B, C, H/2, W/2)``."""
    H, W = x.shape[-2:]
    if H % PATCH_GRID or W % PATCH_GRID:
        raise ValueError(f"a {H}x{W} map cannot be split into {PATCH_GRID}x{PATCH_GRID} equal patches")
    h, w = H // PATCH_GRID, W // PATCH_GRID
    return [x[..., i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(PATCH_GRID) for j in range(PATCH_GRID)]


def tile_patches(patches) -> torch.Tensor:
    """Inverse of :func:`split_patches`: ``(4, B, ..., h, w)`` (or a list of 4) -> ``(B, ..., 2h, 2w)``.

    Also re-tiles the patches' spatial attention ``(4, B, h, w)`` into one face-aligned
    ``(B, 2h, 2w)`` map for display.
    """
    rows = [torch.cat([patches[i * PATCH_GRID + j] for j in range(PATCH_GRID)], dim=-1) for i in range(PATCH_GRID)]
    return torch.cat(rows, dim=-2)


# ---- building blocks ----------------------------------------------------------------------
def _downsample(inplanes: int, planes: int, stride: int) -> nn.Module | None:
    """The 1x1 conv + BN shortcut of a residual block that changes shape (else ``None``)."""
    if stride == 1 and inplanes == planes:
        return None
    return nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))


class AttentiveBlock(BasicBlock):
    """torchvision's ``BasicBlock`` with CBAM after the second BatchNorm, before the residual add.

    ``forward(x)`` with ``x`` ``(B, Cin, H, W)`` returns ``(y (B, C, H', W'), channel attention
    (B, C), spatial attention (B, H', W'))``.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, reduction: int = 16):
        super().__init__(inplanes, planes, stride, _downsample(inplanes, planes, stride))
        self.cbam = CBAM(planes, reduction)

    def forward(self, x: torch.Tensor):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out, ca, sa = self.cbam(out)
        return self.relu(out + identity), ca, sa


class _ConvBN(nn.Module):
    """3x3 conv (no bias) + BatchNorm, ``(B, C, H, W) -> (B, C, H, W)``: one link of a chain."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class MultiScaleBlock(nn.Module):
    """MA-Net's multi-scale residual block.

    3x3 conv (stride ``stride``) + BN + ReLU; the result is split into 4 channel groups
    ``g_1..g_4``; each of two chains computes ``y_k = BN(conv_k(g_k + ReLU(y_prev)))``
    (``y_prev`` absent for the chain's first group) in its own group order, and places
    ``y_k`` at group ``k``'s channels; the two chains' outputs are summed, the shortcut
    (identity, or 1x1 conv + BN when the shape changes) is added, then ReLU.
    Chain 1 runs ``1 -> 4``; chain 2 runs ``4 -> 1`` (``chain_order="descending"``) or
    ``1 -> 4`` (``"ascending"``).

    ``forward(x)``: ``(B, inplanes, H, W) -> (B, planes, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, chain_order: str = "ascending",
                 groups: int = 4):
        super().__init__()
        if chain_order not in CHAIN_ORDERS:
            raise ValueError(f"chain_order={chain_order!r}: expected one of {CHAIN_ORDERS}")
        if planes % groups:
            raise ValueError(f"planes={planes} is not divisible into {groups} groups")
        self.chain_order = chain_order
        self.width = planes // groups
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.chains = nn.ModuleList(nn.ModuleList(_ConvBN(self.width) for _ in range(groups)) for _ in range(2))
        self.downsample = _downsample(inplanes, planes, stride)

    @staticmethod
    def _chain(links: nn.ModuleList, groups, order) -> torch.Tensor:
        outs: list = [None] * len(groups)
        prev = None
        for k in order:
            prev = outs[k] = links[k](groups[k] if prev is None else groups[k] + F.relu(prev))
        return torch.cat(outs, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        groups = torch.split(out, self.width, dim=1)
        up = range(len(groups))
        second = reversed(up) if self.chain_order == "descending" else up
        out = self._chain(self.chains[0], groups, up) + self._chain(self.chains[1], groups, second)
        return F.relu(out + identity)


class Stem(nn.Module):
    """ResNet-18 conv1, bn1, max-pool, layer1, layer2: ``(B, 3, S, S) -> (B, 128, ceil(S/8), ceil(S/8))``.

    Module names follow torchvision's ResNet, so its state dict maps onto ``stem.*`` unchanged.
    683,072 parameters.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2, _downsample(64, 128, 2)), BasicBlock(128, 128))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer2(self.layer1(x))


class PatchBranch(nn.Module):
    """One patch's sub-branch: ``layer3`` (2 AttentiveBlocks 128->256, stride 2) and ``layer4``
    (2 AttentiveBlocks 256->512, stride 1). 10,577,392 parameters.

    ``forward(patch)`` with ``patch`` ``(B, 128, h, w)`` returns ``(map (B, 512, h', w'), channel
    attention (B, 512), spatial attention (B, h', w'))`` of the last block (``h' = ceil(h/2)``).
    """

    def __init__(self, reduction: int = 16):
        super().__init__()
        self.layer3 = nn.Sequential(AttentiveBlock(128, 256, 2, reduction), AttentiveBlock(256, 256, 1, reduction))
        self.layer4 = nn.Sequential(AttentiveBlock(256, 512, 1, reduction), AttentiveBlock(512, 512, 1, reduction))

    def forward(self, x: torch.Tensor):
        ca = sa = None
        for block in (*self.layer3, *self.layer4):
            x, ca, sa = block(x)
        return x, ca, sa


class GlobalBranch(nn.Module):
    """The global multi-scale branch: ``layer3`` (2 MultiScaleBlocks 128->256, stride 2) and
    ``layer4`` (2 MultiScaleBlocks 256->512, stride 2). 7,547,392 parameters.

    ``forward(x)``: ``(B, 128, H, W) -> (B, 512, ceil(H/4), ceil(W/4))`` (7x7 at 224 px).
    """

    def __init__(self, chain_order: str = "ascending"):
        super().__init__()
        self.layer3 = nn.Sequential(MultiScaleBlock(128, 256, 2, chain_order),
                                    MultiScaleBlock(256, 256, 1, chain_order))
        self.layer4 = nn.Sequential(MultiScaleBlock(256, 512, 2, chain_order),
                                    MultiScaleBlock(512, 512, 1, chain_order))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(x))


# ---- the model ----------------------------------------------------------------------------
@dataclass
class MANetOutput:
    """What :class:`MANet` returns. Batch ``B``, ``K`` classes, patch map ``h x w`` (7x7 at 224 px).

    - ``logits`` ``(B, K)``: fused ``w * local_logits + (1 - w) * global_logits``
    - ``local_logits`` / ``global_logits`` ``(B, K)``: the two branches' heads
    - ``patch_maps`` ``(4, B, 512, h, w)``: each patch's last map (row-major quadrants)
    - ``local_features`` / ``global_features`` ``(B, 512)``: the pooled branch features
      that ``fc_local`` / ``fc_global`` classify
    - ``patch_spatial_attention`` ``(4, B, h, w)`` / ``patch_channel_attention`` ``(4, B, 512)``:
      each patch's last CBAM maps; :attr:`tiled_spatial_attention` puts the four spatial
      maps back into one face-aligned ``(B, 2h, 2w)`` map
    """

    logits: torch.Tensor
    local_logits: torch.Tensor
    global_logits: torch.Tensor
    patch_maps: torch.Tensor
    local_features: torch.Tensor
    global_features: torch.Tensor
    patch_spatial_attention: torch.Tensor
    patch_channel_attention: torch.Tensor

    @property
    def tiled_spatial_attention(self) -> torch.Tensor:
        """The patches' spatial attention re-tiled over the face: ``(B, 2h, 2w)``."""
        return tile_patches(self.patch_spatial_attention)


class MANet(FERModel):
    """MA-Net, optionally diversified (MA-Net*).

    Args:
        num_classes: classes of both heads (7 for RAF-DB, 8 for AffectNet-8).
        diversity: which terms the loss subtracts (:class:`~fer_lab.diversity.DiversityConfig`):
            ``spatial`` / ``channel`` compare the four patch maps (channel-mean ``(h, w)`` /
            spatial-mean ``512`` vectors, L = 4), ``branch`` the pooled local and global
            features (L = 2). All three are monitored either way.
        input_size: square input side in pixels (224 = paper); any size whose stem map has
            even sides works (see :func:`check_input_size`); inputs are checked at run time.
        chain_order: the multi-scale block's second chain, ``"ascending"`` (the 2021 public code,
            the MS-Celeb-1M checkpoint and the diversity paper; default) or ``"descending"`` (the
            public code since 2023); see the module docstring.
        local_weight: ``w`` in the fusion ``w * local + (1 - w) * global`` and in the loss (0.6).
        cbam_reduction: CBAM's MLP reduction ratio (16). (Not ``reduction``: that flat key
            sets the diversity term's ``det``/``logdet`` in :func:`~fer_lab.models.resolve_config`.)

    ``forward(x)`` with ``x`` ``(B, 3, S, S)`` in ``[0, 1]`` returns :class:`MANetOutput`.
    """

    family = "manet"
    main_head = "fused"

    def __init__(self, num_classes: int = 7, diversity: DiversityConfig | dict | None = None,
                 input_size: int = 224, chain_order: str = "ascending", local_weight: float = 0.6,
                 cbam_reduction: int = 16, name: str = "manet"):
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(f"num_classes={num_classes!r}: expected an int >= 2")
        if chain_order not in CHAIN_ORDERS:
            raise ValueError(f"chain_order={chain_order!r}: expected one of {CHAIN_ORDERS}")
        if not (0.0 <= float(local_weight) <= 1.0):
            raise ValueError(f"local_weight={local_weight!r}: expected a weight in [0, 1]")
        check_input_size(int(input_size))
        self.diversity = diversity if isinstance(diversity, DiversityConfig) else DiversityConfig.from_dict(diversity)
        self.name = name
        self.num_classes = int(num_classes)
        self.input_size = int(input_size)
        self.chain_order = chain_order
        self.local_weight = float(local_weight)
        self.cbam_reduction = int(cbam_reduction)

        self.stem = Stem()
        self.patches = nn.ModuleList(PatchBranch(self.cbam_reduction) for _ in range(NUM_PATCHES))
        self.global_branch = GlobalBranch(chain_order)
        self.fc_local = nn.Linear(FEATURE_CHANNELS, self.num_classes)
        self.fc_global = nn.Linear(FEATURE_CHANNELS, self.num_classes)
        # parameter-free hook points for Grad-CAM: the re-tiled local map and the global map
        self.local_out = nn.Identity()
        self.global_out = nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """He (fan-out) init of every conv, unit/zero BatchNorm, as torchvision's ResNet and MA-Net do."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def config(self) -> dict:
        """JSON-able constructor arguments; ``build_model_from_config`` inverts it."""
        return {"name": self.name, "family": self.family, "num_classes": self.num_classes,
                "diversity": self.diversity.to_dict(), "input_size": self.input_size,
                "chain_order": self.chain_order, "local_weight": self.local_weight,
                "cbam_reduction": self.cbam_reduction}

    # ---- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, return_all_attention: bool = False) -> MANetOutput:
        """``return_all_attention`` is accepted for the model contract: MA-Net records only its
        patches' last CBAM maps, so the output is the same either way."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"MA-Net expects input (B, 3, H, W), got {tuple(x.shape)}")
        check_input_size(x.shape[-2], x.shape[-1])
        shared = self.stem(x)
        maps, cas, sas = [], [], []
        for branch, patch in zip(self.patches, split_patches(shared)):
            m, ca, sa = branch(patch)
            maps.append(m)
            cas.append(ca)
            sas.append(sa)
        local_map = self.local_out(tile_patches(maps))
        global_map = self.global_out(self.global_branch(shared))
        local_features = local_map.mean(dim=(2, 3))
        global_features = global_map.mean(dim=(2, 3))
        local_logits = self.fc_local(local_features)
        global_logits = self.fc_global(global_features)
        w = self.local_weight
        return MANetOutput(logits=w * local_logits + (1 - w) * global_logits, local_logits=local_logits,
                           global_logits=global_logits, patch_maps=torch.stack(maps),
                           local_features=local_features, global_features=global_features,
                           patch_spatial_attention=torch.stack(sas), patch_channel_attention=torch.stack(cas))

    # ---- objective ----------------------------------------------------------------------
    def learners(self, out: MANetOutput) -> dict[str, torch.Tensor]:
        """Per-term learner features: ``spatial`` ``(4, B, h, w)`` and ``channel`` ``(4, B, 512)``
        from the patch maps, ``branch`` ``(2, B, 512)`` (local, global pooled features)."""
        return {"spatial": out.patch_maps.mean(dim=2), "channel": out.patch_maps.mean(dim=(3, 4)),
                "branch": torch.stack([out.local_features, out.global_features])}

    def loss(self, out: MANetOutput, target: torch.Tensor) -> LossOutput:
        """``w CE(local) + (1 - w) CE(global) - weight * (D_b + D_sp + D_ch)`` (configured terms).

        ``target`` is ``(B,)`` class indices or ``(B, K)`` class probabilities. All three
        terms are reported in ``LossOutput.diversity`` (monitored without gradient when not
        in the loss); ``LossOutput.ce`` holds the unweighted ``local`` and ``global`` CE.
        """
        ce = multi_head_ce(torch.stack([out.local_logits, out.global_logits]), target)
        w = self.local_weight
        return diversity_loss(self.learners(out), self.diversity, ("spatial", "channel", "branch"),
                              w * ce[0] + (1 - w) * ce[1], {"local": ce[0], "global": ce[1]})

    def heads(self, out: MANetOutput) -> dict[str, torch.Tensor]:
        """Per-head ``(B, K)`` scores for accuracy: ``fused`` (the model's decision), ``local``, ``global``."""
        return {"fused": out.logits, "local": out.local_logits, "global": out.global_logits}

    def cam_targets(self) -> dict[str, CamTarget]:
        """Layers whose output Grad-CAM reads: ``stem`` (layer2, shared), ``local`` (the
        re-tiled patch maps) and ``global`` (the multi-scale branch's last map)."""
        return {"stem": CamTarget(self.stem.layer2), "local": CamTarget(self.local_out),
                "global": CamTarget(self.global_out)}

    def attention_layers(self) -> list[str]:
        """``"last"``: the four patches' last CBAM maps, re-tiled over the face."""
        return ["last"]

    def channel_attention_maps(self, out: MANetOutput) -> dict[str, torch.Tensor]:
        """``{"patch_<p>": (B, C)}``: each patch's last CBAM channel attention."""
        return {f"patch_{p + 1}": c for p, c in enumerate(out.patch_channel_attention)}

    def attention_maps(self, out: MANetOutput, layer: str = "last") -> dict[str, torch.Tensor]:
        """``{"local patches": (B, 2h, 2w)}``: the patch CBAMs' spatial maps re-tiled face-aligned."""
        if layer != "last":
            raise self._unknown_layer(layer)
        return {"local patches": out.tiled_spatial_attention}


# ---- registered variants (SPEC section 4) ----------------------------------------------------
#: what travels with every MA-Net variant besides its constructor arguments (label space: the dataset's)
_MANET_DATA = {"train_transform": "manet_train", "protocol": "single", "label_space": None}
_manet_common = dict(num_classes=7, input_size=224, chain_order="ascending", local_weight=0.6)
register_model("manet", MANet, "MA-Net: ResNet-18 stem, 4 CBAM patch branches + global multi-scale branch",
               _MANET_DATA, diversity={}, **_manet_common)
register_model("manet_div", MANet, "MA-Net*: MA-Net + patch spatial, patch channel and branch diversity",
               _MANET_DATA, diversity={"terms": ["spatial", "channel", "branch"], "gamma": 10.0}, **_manet_common)
