"""The :class:`SyntheticFaces` dataset: sampled and rendered items, cached as a memory map."""
from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torchvision import tv_tensors

from ..base import FaceDataset, to_chw_uint8
from ..cache import cache_path, open_cache, write_cache
from ..labels import AFFECTNET8
from .expressions import SPLITS, balanced_labels, sample_params
from .render import RENDER_VERSION, _Frame, _Geometry, _occluded_fractions, render_params

DEFAULT_SIZES: dict[str, int] = {"train": 6000, "val": 1200, "test": 1200}


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


class SyntheticFaces(FaceDataset):
    """Procedurally rendered faces with 8 expression classes (AffectNet order).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; splits never share items.
        size: image side in pixels (16..1024; faces are drawn at this size directly).
        num_samples: number of items (default 6000 train / 1200 val / 1200 test), or a
            dict ``{split: n}`` giving some splits their own size (the others keep the
            default). Item ``i`` is the same image whatever ``num_samples`` is.
        seed: non-negative int; with ``split`` and the index it fixes every item.
        grayscale: ``load_image`` returns ``(H, W)`` instead of ``(H, W, 3)``.
        transform: applied to the uint8 ``(C, H, W)`` tensor (jointly with the masks
            when ``return_masks``; v2 transforms accept ``transform(image, mask)``).
            When None, ``__getitem__`` returns float32 ``(C, H, W)`` in ``[0, 1]``.
        label_space: see :class:`FaceDataset`.
        return_masks: ``__getitem__`` returns ``(image, label, masks)`` with ``masks`` a
            ``tv_tensors.Mask`` ``(4, H, W)`` uint8 in :data:`REGIONS` order.
        cache: None (render on the fly) or a directory: all images are rendered once
            into one memory-mapped uint8 ``.npy`` named after the generation parameters.
        occlusion_rate: probability in [0, 1] that an image has an occluder (hand,
            medical mask, sunglasses, patch). Independent of ``difficulty``: pass 0 for
            unoccluded faces.
        difficulty: nuisance strength in [0, 2]: 0 = clean frontal faces on a plain
            background, no glasses (identity and expression still vary), 1 = default "in the
            wild" level, 2 = extreme.
    """

    name = "synthetic"
    native_classes = AFFECTNET8

    def __init__(self, split: str = "train", size: int = 96, num_samples: int | dict | None = None, seed: int = 0,
                 grayscale: bool = False, transform: Callable | None = None, label_space: str | None = None,
                 return_masks: bool = False, cache: str | os.PathLike | None = None,
                 occlusion_rate: float = 0.25, difficulty: float = 1.0):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        if not _is_int(size) or not 16 <= size <= 1024:
            raise ValueError(f"size={size!r}: expected an int between 16 and 1024 (pixels)")
        if isinstance(num_samples, dict):
            unknown = sorted(set(num_samples) - set(DEFAULT_SIZES))
            if unknown:
                raise ValueError(f"num_samples: unknown split(s) {unknown}; expected keys from {tuple(DEFAULT_SIZES)}")
            num_samples = num_samples.get(split)
        if num_samples is not None and (not _is_int(num_samples) or num_samples < 1):
            raise ValueError(f"num_samples={num_samples!r}: expected None, an int >= 1 or a dict of them per split")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed={seed!r}: expected a non-negative int")
        if not isinstance(grayscale, bool):
            raise ValueError(f"grayscale={grayscale!r}: expected a bool")
        if not isinstance(return_masks, bool):
            raise ValueError(f"return_masks={return_masks!r}: expected a bool")
        if transform is not None and not callable(transform):
            raise ValueError(f"transform={transform!r}: expected None or a callable")
        if cache is not None and not isinstance(cache, (str, os.PathLike)):
            raise ValueError(f"cache={cache!r}: expected None or a directory path")
        if not _is_real(occlusion_rate) or not 0.0 <= float(occlusion_rate) <= 1.0:
            raise ValueError(f"occlusion_rate={occlusion_rate!r}: expected a number in [0, 1]")
        if not _is_real(difficulty) or not 0.0 <= float(difficulty) <= 2.0:
            raise ValueError(f"difficulty={difficulty!r}: expected a number in [0, 2]")
        super().__init__(transform=transform, label_space=label_space)
        self.split = split
        self.size = int(size)
        self.seed = int(seed)
        self.grayscale = grayscale
        self.return_masks = return_masks
        self.occlusion_rate = float(occlusion_rate)
        self.difficulty = float(difficulty)
        self._split_id = SPLITS.index(split)
        n = DEFAULT_SIZES[split] if num_samples is None else int(num_samples)
        self.native_targets = balanced_labels(self.seed, split, n)
        _ = self.targets  # reject a label space that lacks some of the classes now
        self.cache_path: Path | None = None
        self._images: np.ndarray | None = None
        if cache is not None:
            params = self.generation_params()
            self.cache_path = cache_path(cache, "synthetic", split, params)
            opened = open_cache(self.cache_path, params, len(self))
            if opened is None:
                shape = (len(self), self.size, self.size) + (() if self.grayscale else (3,))
                opened = write_cache(self.cache_path, params, shape, lambda i: self._render(i, True, False)[1])
            self._images = opened[0]

    # ---- identity ---------------------------------------------------------------------
    def generation_params(self) -> dict[str, Any]:
        """Everything that determines the images (cache key and item ids)."""
        return {"version": RENDER_VERSION, "split": self.split, "size": self.size, "num_samples": len(self),
                "seed": self.seed, "grayscale": self.grayscale, "occlusion_rate": self.occlusion_rate,
                "difficulty": self.difficulty}

    def item_ids(self) -> list[str]:
        q = (f"v{RENDER_VERSION}&size={self.size}&gray={int(self.grayscale)}"
             f"&occ={self.occlusion_rate:g}&diff={self.difficulty:g}")
        return [f"synthetic/{self.split}/{self.seed}/{i}?{q}" for i in range(len(self))]

    def describe(self, indices=None) -> dict[str, Any]:
        """The base summary plus ``"generation"``: the parameters that determine the images."""
        d = super().describe(indices)
        d["generation"] = self.generation_params()
        return d

    # ---- rendering --------------------------------------------------------------------
    def params(self, index: int) -> dict[str, Any]:
        """The sampled actions, intensity, identity and nuisances of item ``index`` (JSON-able)."""
        i = self.check_index(index)
        return sample_params(self.seed, self.split, i, int(self.native_targets[i]),
                             difficulty=self.difficulty, occlusion_rate=self.occlusion_rate)

    def _render(self, i: int, image: bool, masks: bool):
        p = sample_params(self.seed, self.split, i, int(self.native_targets[i]),
                          difficulty=self.difficulty, occlusion_rate=self.occlusion_rate)
        noise_rng = np.random.default_rng([self.seed, self._split_id, 2, i])
        img, m = render_params(p, self.size, grayscale=self.grayscale, image=image, masks=masks,
                               noise_rng=noise_rng)
        return p, img, m

    def render(self, index: int) -> dict[str, Any]:
        """Render item ``index`` from scratch (ignores the cache and the transform).

        Returns ``{"image": uint8 (H, W) or (H, W, 3), "label": int (in :attr:`classes`
        order), "masks": uint8 (4, H, W) 0/1 in REGIONS order, "params": dict}``;
        ``params["occluded"]`` gives the fraction of each region hidden by the occluder.
        Masks mark where the regions are, occluded or not.
        """
        i = self.check_index(index)
        p, img, m = self._render(i, True, True)
        fr, g = _Frame(self.size, p["pose"]), _Geometry(p)
        p["occluded"] = _occluded_fractions(fr, g, p, m)
        return {"image": img, "label": int(self.targets[i]), "masks": m, "params": p}

    def render_masks(self, index: int) -> np.ndarray:
        """Region masks of item ``index``: uint8 ``(4, H, W)``, 0/1, :data:`REGIONS` order."""
        return self._render(self.check_index(index), False, True)[2]

    def load_image(self, index: int) -> np.ndarray:
        """Item ``index`` as uint8 ``(H, W)`` (grayscale) or ``(H, W, 3)`` (RGB), from the cache if any."""
        i = self.check_index(index)
        if self.cache_path is not None:
            return np.array(self._cached()[i])
        return self._render(i, True, False)[1]

    def __getitem__(self, index: int):
        """``(image, label)``, or ``(image, label, masks)`` with ``return_masks``.

        Without a transform ``image`` is float32 ``(C, H, W)`` in ``[0, 1]`` (C = 1 or 3) and
        ``masks`` a uint8 ``tv_tensors.Mask`` ``(4, H, W)``; with one, both are what
        ``transform(image)`` / ``transform(image, masks)`` return for the uint8 ``(C, H, W)`` image.
        """
        i = self.check_index(index)
        label = int(self.targets[i])
        if self.return_masks and self.cache_path is None:
            _, img, m = self._render(i, True, True)
        else:
            img = self.load_image(i)
            m = self.render_masks(i) if self.return_masks else None
        image = to_chw_uint8(img)
        if not self.return_masks:
            if self.transform is None:
                return image.to(torch.float32).div_(255.0), label
            return self.transform(image), label
        masks = tv_tensors.Mask(torch.from_numpy(m))
        if self.transform is None:
            return image.to(torch.float32).div_(255.0), label, masks
        image, masks = self.transform(image, masks)
        return image, label, masks

    # ---- cache ------------------------------------------------------------------------
    def _cached(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.cache_path, mmap_mode="r")
        return self._images

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_images"] = None  # reopen the memory map in each worker
        return state
