"""Procedural synthetic faces: fer_lab's default, shippable FER dataset.

No real facial-expression dataset may ship with the project, so this module draws
cartoon faces analytically (ellipses, bands and curves on a pixel coordinate grid,
anti-aliased through signed distances) at any requested size. Each of the 8
AffectNet classes is a vector of FACS-like facial actions (brow height, inner-brow
angle, brows drawn together, eye openness, mouth curvature / opening / width, lip
press, one-sided lip-corner raise, nose wrinkle, upper-lip raise). Every sample
scales its class's vector by a random intensity and adds per-action noise, so
classes overlap and weak expressions look near-neutral.

On top of the expression come identity (face shape, skin tone, hair, glasses) and
"in the wild" nuisances (rotation, scale, translation, feature shift, lighting
ramps, colour casts, background clutter and texture, blur, noise) scaled by
``difficulty``, plus occluders (hands, medical masks, sunglasses, random patches)
on a fraction ``occlusion_rate`` of images. Because the renderer knows where the
eyes, brows, mouth and nose are, it also returns per-region masks, which
:func:`fer_lab.analysis.attention_in_regions` uses to measure where a model's spatial attention
falls.

What this is deliberately *not*: a realistic face model, a substitute for real FER
data in any claim about real-world accuracy, or a benchmark of anything except a
method's behaviour on a controlled task with known ground-truth regions. Images are
a pure function of ``(seed, split, index, generation parameters)``; nothing is
downloaded or read from disk except the optional cache this module itself writes.
"""
from .dataset import DEFAULT_SIZES, SyntheticFaces
from .expressions import (ACTION_NOISE, ACTIONS, INTENSITY_RANGE, OCCLUDERS, PROTOTYPES, REGIONS, SPLITS,
                          balanced_labels, sample_params)
from .render import RENDER_VERSION, render_params

__all__ = ["SyntheticFaces", "DEFAULT_SIZES", "REGIONS", "ACTIONS", "PROTOTYPES", "SPLITS", "OCCLUDERS",
           "INTENSITY_RANGE", "ACTION_NOISE", "RENDER_VERSION", "balanced_labels", "sample_params",
           "render_params"]
