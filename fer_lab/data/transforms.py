"""Transform presets from SPEC sections 3-5, built on ``torchvision.transforms.v2``.

Every preset takes a uint8 ``(C, H, W)`` tensor (C = 1 or 3) and returns a float32
``(3, size, size)`` tensor in ``[0, 1]`` (or ImageNet-normalised when asked).
Grayscale faces become 3 channels. Region masks (``tv_tensors.Mask``) passed along
with the image follow the same geometric transforms.

Batch presets (:data:`BATCH_PRESETS`) split augmentation in two: the dataset applies only the
``eval`` transform to each face, and :func:`batch_transform` gives a module that augments a
whole float batch at once on its device (one ``affine_grid``/``grid_sample`` call for every
face of the batch). On a CPU the per-face transforms are dozens of small Python-dispatched
tensor ops per face, a real share of a small model's training step at 48 px
(``bench/input_pipeline.py``, entry ``batch_augment``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRESETS = ("esr_train", "light_train", "light_batch", "rafdb_train", "manet_train", "eval")
#: presets whose augmentation runs on whole batches (:func:`batch_transform`); the dataset side is ``eval``
BATCH_PRESETS = ("light_batch",)
#: RandomErasing's area range in the diversity paper's RAF-DB scripts (torchvision's default: 0.02-0.33).
ERASING_SCALE = (0.02, 0.25)
#: RandomCrop padding of the RAF-DB scripts (fixed in pixels: 32 at 96 px and at 224 px).
RAFDB_CROP_PADDING = 32


def _affine(degrees: float, scale: tuple[float, float]) -> v2.RandomAffine:
    """RandomAffine with translation 0.1, interpolating bilinearly as the public scripts ask
    (torchvision's default is nearest); region masks are still moved with nearest."""
    return v2.RandomAffine(degrees=degrees, translate=(0.1, 0.1), scale=scale,
                           interpolation=v2.InterpolationMode.BILINEAR)


def build_transform(preset: str, size: int = 96, *, normalize: str | None = None,
                    random_erasing: bool = False, rgb: bool = True) -> v2.Compose:
    """Transform for ``preset`` at ``size`` px.

    - ``esr_train``: ColorJitter(brightness 0.5, contrast 0.5), horizontal flip,
      RandomAffine(30 deg, translate 0.1, scale 1.0-1.25, bilinear), resize to ``size``.
    - ``light_train`` (fer_lab's CPU protocol on small faces): horizontal flip and a mild
      RandomAffine(10 deg, translate 0.1, scale 0.95-1.05, bilinear), resize to ``size``; no
      colour jitter.
    - ``light_batch``: ``light_train``'s augmentation on whole batches; here (per face) the
      ``eval`` transform, the augmentation is :func:`batch_transform`'s module.
    - ``rafdb_train`` (the diversity paper's ``esr_rafdb.py`` and ``manet_rafdb.py``): resize to
      ``size``, horizontal flip, and with probability 0.2 both RandomRotation(20 deg) and
      RandomCrop(``size``, padding 32).
    - ``manet_train`` (the original MA-Net): RandomResizedCrop(``size``) and horizontal flip.
    - ``eval``: resize to ``size`` only.

    ``normalize="imagenet"`` applies ImageNet mean/std (RAF-DB fine-tuning);
    ``random_erasing`` appends RandomErasing(scale 0.02-0.25, after the normalisation, as the
    RAF-DB scripts do; train presets only); ``rgb=False`` keeps
    the input's channel count instead of producing 3 channels.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown transform preset {preset!r}; expected one of {PRESETS}")
    if normalize not in (None, "imagenet"):
        raise ValueError(f"normalize={normalize!r}: expected None or 'imagenet'")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size={size!r}: expected an int >= 8 (pixels)")
    if preset in BATCH_PRESETS:
        if random_erasing:
            raise ValueError(f"random_erasing with the batch preset {preset!r}: erasing would run before the "
                             "batch augmentation, not after it; use a per-face preset (e.g. light_train)")
        preset = "eval"
    ops: list = [v2.RGB()] if rgb else []
    resize = v2.Resize((size, size), antialias=True)
    if preset == "esr_train":
        ops += [resize, v2.ColorJitter(brightness=0.5, contrast=0.5), v2.RandomHorizontalFlip(),
                _affine(30, (1.0, 1.25))]
    elif preset == "light_train":
        ops += [resize, v2.RandomHorizontalFlip(), _affine(10, (0.95, 1.05))]
    elif preset == "rafdb_train":
        ops += [
            resize,
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.RandomRotation(20), v2.RandomCrop((size, size), padding=RAFDB_CROP_PADDING)], p=0.2),
        ]
    elif preset == "manet_train":
        ops += [v2.RandomResizedCrop((size, size), antialias=True), v2.RandomHorizontalFlip()]
    else:
        ops += [resize]
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if normalize == "imagenet":
        ops.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    if random_erasing and preset != "eval":
        ops.append(v2.RandomErasing(scale=ERASING_SCALE))
    return v2.Compose(ops)


class BatchAffine(nn.Module):
    """Per-face random horizontal flip and affine warp of a float batch ``(B, C, H, W)``,
    bilinear, zero outside the image; identity in eval mode (``module.eval()``).

    Each face draws its own parameters as ``v2.RandomAffine`` does: angle uniform in
    ``[-degrees, degrees]``, scale uniform in ``scale``, shift uniform in ``[-translate,
    translate]`` of the width and of the height, about the image centre; unlike it the shift
    is not rounded to whole pixels. Random numbers come from torch's global generator on the
    CPU (seeded per epoch by the engine), so a batch is augmented the same on every device.
    """

    def __init__(self, degrees: float = 10.0, translate: float = 0.1, scale: tuple[float, float] = (0.95, 1.05),
                 flip: bool = True):
        super().__init__()
        if degrees < 0 or not 0 <= translate < 1 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"BatchAffine(degrees={degrees}, translate={translate}, scale={scale}): expected "
                             "degrees >= 0, 0 <= translate < 1 and 0 < scale[0] <= scale[1]")
        self.degrees, self.translate, self.scale, self.flip = float(degrees), float(translate), tuple(scale), flip

    def sample(self, b: int) -> dict[str, torch.Tensor]:
        """Parameters of ``b`` faces: ``angle`` (degrees), ``scale``, ``tx``/``ty`` (fractions of the
        width/height), ``flip`` (bool)."""
        u = torch.rand(b, 5, dtype=torch.float64)
        return {"angle": (2 * u[:, 0] - 1) * self.degrees,
                "scale": self.scale[0] + u[:, 1] * (self.scale[1] - self.scale[0]),
                "tx": (2 * u[:, 2] - 1) * self.translate, "ty": (2 * u[:, 3] - 1) * self.translate,
                "flip": (u[:, 4] < 0.5) if self.flip else torch.zeros(b, dtype=torch.bool)}

    @staticmethod
    def theta(params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, 2, 3)`` maps from output to input coordinates in ``affine_grid``'s normalised
        space ([-1, 1] across the image): the inverse of flip, then rotate and scale about the
        centre, then shift (a shift of ``tx`` of the width is ``2 * tx`` there)."""
        a = params["angle"] * (math.pi / 180)
        cos, sin, s = torch.cos(a), torch.sin(a), params["scale"]
        # forward map p_out = s R p_in + t  =>  p_in = R^T (p_out - t) / s
        inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2) / s[:, None, None]
        t = torch.stack([2 * params["tx"], 2 * params["ty"]], -1)
        shift = -(inv @ t[:, :, None])[:, :, 0]
        flip = torch.where(params["flip"], -1.0, 1.0).to(inv.dtype)
        inv = inv * torch.stack([flip, torch.ones_like(flip)], -1)[:, :, None]     # x_in -> -x_in after the map
        shift = shift * torch.stack([flip, torch.ones_like(flip)], -1)
        return torch.cat([inv, shift[:, :, None]], -1)

    def forward(self, x: torch.Tensor, shard: tuple[int, int] | None = None) -> torch.Tensor:
        """``shard=(offset, total)``: ``x`` is rows ``offset..`` of a batch of ``total`` faces split over
        processes; the parameters of all ``total`` faces are drawn (the same random numbers as one
        process) and this part's rows used."""
        if not self.training:
            return x
        params = self.sample(x.shape[0] if shard is None else shard[1])
        if shard is not None:
            params = {k: v[shard[0]:shard[0] + x.shape[0]] for k, v in params.items()}
        theta = self.theta(params).to(device=x.device, dtype=torch.float32)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(x.dtype)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out   # keep the model's format

    def extra_repr(self) -> str:
        return f"degrees={self.degrees}, translate={self.translate}, scale={self.scale}, flip={self.flip}"


def batch_transform(preset: str | None) -> BatchAffine | None:
    """The batch augmentation of a batch preset (:data:`BATCH_PRESETS`), ``None`` for the others."""
    if preset == "light_batch":
        return BatchAffine(10.0, 0.1, (0.95, 1.05), flip=True)
    return None
