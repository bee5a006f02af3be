"""Transform presets from SPEC sections 3-5, built on ``torchvision.transforms.v2``.

Every preset takes a uint8 ``(C, H, W)`` tensor (C = 1 or 3) and returns a float32
``(3, size, size)`` tensor in ``[0, 1]`` (or ImageNet-normalised when asked).
Grayscale faces become 3 channels. Region masks (``tv_tensors.Mask``) passed along
with the image follow the same geometric transforms.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRESETS = ("esr_train", "light_train", "rafdb_train", "manet_train", "eval")
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
