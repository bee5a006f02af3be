"""The attention explorer behind ``04_attention_explorer``: any run (any model that keeps the
contract of :mod:`fer_lab.models.base`), optionally a second run side by side, the run's own
evaluation faces or your photographs.

:meth:`Explorer.figures` draws one face: for each run a row of each learner's spatial attention
at a chosen layer and a row of Grad-CAM per head, every panel titled with that learner's class
and confidence, on one colour scale with a colourbar. :meth:`Explorer.widget` wraps it in
ipywidgets: face slider, layer, learners, views, the second run, and an upload box for your
own image (face found and cropped as ``fer_lab.predict`` does).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .models.common import NON_DIFFERENTIABLE_HEADS
from .style import display_name

__all__ = ["Explorer", "live_kernel", "resolve_interactive", "require_run"]

VIEWS = ("attention", "Grad-CAM")


def live_kernel() -> bool:
    """True inside a Jupyter kernel that a person drives (JupyterLab, Notebook, VS Code);
    False in a plain Python process and in papermill runs started by fer_lab (which pass
    ``interactive=False``)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def resolve_interactive(interactive) -> bool:
    """A notebook's ``interactive`` parameter: ``None`` (the default) means widgets on in a live
    kernel (:func:`live_kernel`), off elsewhere; ``True``/``False`` force it."""
    return live_kernel() if interactive is None else bool(interactive)


def require_run(run_dir) -> Path:
    """``run_dir`` as a Path when it is a fer_lab run directory, else a ``FileNotFoundError``
    that says how to get one (``make demo``, or ``run_dir=`` a run of yours)."""
    path = Path(run_dir) if run_dir else None
    if path is None or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no fer_lab run at {str(run_dir)!r} (no config.json there). Run `make demo` first (it trains the demo "
            "run this notebook opens by default), or set the parameter run_dir to a run directory of yours "
            "(python -m fer_lab train ... writes one under outputs/runs/).")
    if not (path / "checkpoints" / "best.pt").is_file():
        raise FileNotFoundError(f"{path} has no checkpoints/best.pt yet: the run has not finished an epoch; "
                                "let it train (it resumes) or pick another run")
    return path


@dataclass
class Panels:
    """What one run says about a batch of faces: per learner its attention maps ``(B, h, w)``,
    per head its Grad-CAM ``(B, H, W)``, and per learner/head the predicted classes ``(B,)`` and
    confidences ``(B,)`` in percent."""

    attention: dict[str, np.ndarray]
    grad_cam: dict[str, np.ndarray]
    verdicts: dict[str, tuple[np.ndarray, np.ndarray]]


class Explorer:
    """See the module docstring. ``run`` and ``compare``: run directories (or
    :class:`~fer_lab.runs.Run`); ``split``: the run's evaluation split whose faces the slider
    walks through."""

    def __init__(self, run, compare=None, split: str = "test"):
        from .predict import Predictor
        from .runs import Run, load_run

        self.runs = [r if isinstance(r, Run) else load_run(require_run(r)) for r in [run, compare] if r is not None]
        self.predictors = [Predictor.load(r.path) for r in self.runs]
        self.names = [r.path.name for r in self.runs]
        self.data = self.runs[0].eval_dataset(split)
        self.classes = tuple(self.runs[0].config["classes"])
        self.learners = []      # per run: the learners that have attention maps (ESR: branch_1..L)
        for p in self.predictors:
            with torch.no_grad():
                out = p.model(self.face(0)[0])
            self.learners.append(list(p.model.attention_maps(out, "last")) if p.model.attention_layers() else [])

    # ---- computing -----------------------------------------------------------------------------
    def face(self, index: int) -> tuple[torch.Tensor, int]:
        """``((1, 3, S, S) input, label)`` of evaluation face ``index``."""
        item = self.data[int(index)]
        return item[0][None], int(item[1])

    def panels(self, which: int, x: torch.Tensor, layer: str = "last", views: Sequence[str] = VIEWS) -> Panels:
        """Run ``which`` (0: the run, 1: the comparison) on the faces ``x`` ``(B, 3, S, S)``."""
        from .cam import grad_cam

        net = self.predictors[which].model
        with torch.no_grad():
            out = net(x, return_all_attention=layer != "last")
            heads = net.heads(out)
            layers = net.attention_layers()
            att = net.attention_maps(out, layer if layer in layers else "last") if layers and "attention" in views \
                else {}
        probs = {h: torch.softmax(s.float(), 1) for h, s in heads.items()}
        verdicts = {h: (p.argmax(1).numpy(), 100 * p.max(1).values.numpy()) for h, p in probs.items()}
        for learner in att:       # a learner without a head of its own speaks through the main head (MA-Net)
            verdicts.setdefault(learner, verdicts[net.main_head])
        cams = {h: grad_cam(net, x, h) for h in heads if h not in NON_DIFFERENTIABLE_HEADS} \
            if "Grad-CAM" in views else {}
        return Panels({k: v.float().numpy() for k, v in att.items()}, cams, verdicts)

    def figures(self, x: torch.Tensor, labels=None, layer: str = "last", learners: Sequence[str] | None = None,
                views: Sequence[str] = VIEWS, compare: bool = True, panel: float = 2.1) -> dict:
        """``{view: figure}`` for the faces ``x`` ``(B, 3, S, S)`` (``labels`` ``(B,)`` or None): one
        row per face, the chosen ``learners``' maps (default all; heads that are not learners,
        such as the ensemble, always) of the run and, with ``compare``, of the second run beside
        them (columns ``A: ...``, ``B: ...``); every panel titled with its class and confidence,
        one colour scale per figure with a colourbar."""
        from . import viz

        runs = range(len(self.runs) if compare else 1)
        panels = [self.panels(r, x, layer, views) for r in runs]
        figs = {}
        for view in views:
            columns, preds, conf = {}, [], []
            for r, p in zip(runs, panels):
                maps = p.attention if view == "attention" else p.grad_cam
                prefix = f"{'AB'[r]}: " if len(runs) > 1 else ""
                for k, m in maps.items():
                    # unpicked learners are left out; heads that are not learners (ensemble, fused, ...) stay
                    if learners is None or k in learners or k not in self.learners[r]:
                        columns[f"{prefix}{display_name(k)}"] = m
                        preds.append(p.verdicts[k][0])
                        conf.append(p.verdicts[k][1])
            if not columns:
                continue
            fig = viz.plot_map_grid(x.numpy(), columns, self.classes, labels, preds, confidences=conf, panel=panel,
                                    cmap="inferno" if view == "attention" else "jet",
                                    alpha=0.55 if view == "attention" else 0.45)
            names = " | ".join(f"{'AB'[r]}: {self.names[r]}" if len(runs) > 1 else self.names[r] for r in runs)
            fig.suptitle(f"{view}" + (f" ({layer})" if view == "attention" else "") + f" - {names}", fontsize=11,
                         y=1.0 + 0.12 / max(1, x.shape[0]))
            figs[view] = fig
        return figs

    def upload_input(self, content: bytes, detect: bool = True) -> torch.Tensor:
        """An uploaded image file's bytes -> the first run's model input of its largest face."""
        import io

        from PIL import Image

        from .predict import ImageReadError

        try:
            with Image.open(io.BytesIO(content)) as im:
                array = np.asarray(im.convert("RGB"))
        except Exception as e:     # noqa: BLE001 - any decoder failure is the same message to the user
            raise ImageReadError(f"uploaded file: cannot read it as an image ({e})") from None
        p = self.predictors[0]
        (_, _, crop), = p.faces(array, detect=detect, name="uploaded image")
        return p.tensor([crop]).cpu()

    # ---- widgets -------------------------------------------------------------------------------
    def widget(self, index: int = 0, layer: str = "last"):
        """The interactive explorer (ipywidgets ``VBox``); display it in a live notebook."""
        import ipywidgets as W
        import matplotlib.pyplot as plt
        from IPython.display import display

        net, learners = self.predictors[0].model, self.learners[0]
        slider = W.IntSlider(value=index, min=0, max=len(self.data) - 1, description="face",
                             continuous_update=False, layout=W.Layout(width="60%"))
        layer_pick = W.Dropdown(options=net.attention_layers() or ["last"], value=layer, description="layer")
        learner_pick = W.SelectMultiple(options=[(display_name(k), k) for k in learners], value=tuple(learners),
                                        description="learners", rows=min(6, max(2, len(learners))))
        view_pick = W.SelectMultiple(options=VIEWS, value=VIEWS, description="views", rows=2)
        compare = W.Checkbox(value=len(self.runs) > 1, description=f"side by side: {self.names[-1]}",
                             disabled=len(self.runs) < 2, indent=False)
        upload = W.FileUpload(accept="image/*", multiple=False, description="your photo")
        detect = W.Checkbox(value=True, description="find the face", indent=False)
        use_upload = W.ToggleButton(value=False, description="show the photo", disabled=True)
        status = W.HTML()
        out = W.Output()
        state = {"upload": None}

        def render(*_):
            with out:
                out.clear_output(wait=True)
                try:
                    if use_upload.value and state["upload"] is not None:
                        x, label = self.upload_input(state["upload"], detect.value), None
                        status.value = "your photo (largest face)"
                    else:
                        x, label = self.face(slider.value)
                        status.value = f"face {slider.value} of {len(self.data)}: <b>{self.classes[label]}</b>"
                    labels = None if label is None else [label]
                    for fig in self.figures(x, labels, layer_pick.value, learner_pick.value or None, view_pick.value,
                                            compare.value).values():
                        display(fig)
                        plt.close(fig)
                except (ValueError, FileNotFoundError) as e:
                    status.value = f"<span style='color:#D55E00'>{e}</span>"

        def uploaded(change):
            files = change["new"]
            if files:
                f = files[0] if isinstance(files, (list, tuple)) else next(iter(files.values()))
                state["upload"] = bytes(f["content"])
                use_upload.disabled, use_upload.value = False, True
                render()

        for w in (slider, layer_pick, learner_pick, view_pick, compare, detect, use_upload):
            w.observe(render, names="value")
        upload.observe(uploaded, names="value")
        render()
        return W.VBox([W.HBox([slider, layer_pick]), W.HBox([learner_pick, view_pick, compare]),
                       W.HBox([upload, detect, use_upload]), status, out])
