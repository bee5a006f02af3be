"""Export a trained model for use outside PyTorch: ONNX (onnxruntime, any language) and TorchScript.

The exported graph takes ``input`` ``(B, 3, S, S)`` float in ``[0, 1]`` (ImageNet-normalised
where the run normalised; see ``export.json``) and returns

- ``decision`` ``(B,)`` int64: the main head's class (ESR: the plurality vote of the branches);
- ``probabilities`` ``(B, H, K)``: every head's class probabilities, heads in ``export.json``'s
  ``heads`` order (the vote head: each class's share of the branches' votes);
- ``attention`` ``(B, L, h, w)``: each learner's last spatial attention map, learners in
  ``export.json``'s ``learners`` order (models with attention only).

:func:`export_model` writes the file(s) and ``export.json`` (classes, input size, colour,
normalisation, output names and orders) beside them; ``python -m fer_lab export RUN --format
onnx``. ``tests/test_export.py`` checks onnxruntime's outputs against PyTorch's.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["ExportWrapper", "export_model", "FORMATS"]

FORMATS = ("onnx", "torchscript")


class ExportWrapper(nn.Module):
    """A fer_lab model as a plain tensor function (see the module docstring); the head and
    learner orders are read once from a probe batch through the model contract."""

    def __init__(self, model: nn.Module, image_size: int):
        super().__init__()
        self.model = model.eval()
        with torch.no_grad():
            out = model(torch.zeros(1, 3, image_size, image_size))
            self.heads = list(model.heads(out))
            self.learners = list(model.attention_maps(out, "last")) if model.attention_layers() else []
        self.main_head = model.main_head

    def forward(self, x: torch.Tensor):
        out = self.model(x)
        heads = self.model.heads(out)
        decision = heads[self.main_head].argmax(dim=1)
        probabilities = torch.stack([torch.softmax(heads[h], dim=1) for h in self.heads], dim=1)
        if not self.learners:
            return decision, probabilities
        maps = self.model.attention_maps(out, "last")
        return decision, probabilities, torch.stack([maps[k] for k in self.learners], dim=1)

    @property
    def output_names(self) -> list[str]:
        return ["decision", "probabilities"] + (["attention"] if self.learners else [])


def export_model(path, out_dir=None, formats=("onnx",), which: str = "best", opset: int = 18) -> dict:
    """Export the run (or checkpoint) ``path``; returns ``export.json``'s content.

    Files go to ``out_dir`` (default ``<run>/export/``): ``model.onnx`` and/or
    ``model.torchscript.pt``, and ``export.json``. Batch size is dynamic; the input side is the
    run's.
    """
    from .predict import Predictor
    from .runs import atomic_write_bytes, write_json

    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats={list(formats)}: expected one or more of {FORMATS}")
    predictor = Predictor.load(path, which=which)
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent.parent
    out = Path(out_dir) if out_dir is not None else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    size = predictor.image_size
    wrapper = ExportWrapper(predictor.model.cpu().float(), size).eval()
    example = torch.rand(2, 3, size, size)
    files = {}
    with torch.no_grad(), warnings.catch_warnings():
        # tracing fixes the model's Python control flow (branch count, shapes) for this model, as intended;
        # torch.jit's deprecation notice is not the user's concern here
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if "onnx" in formats:
            buf = io.BytesIO()
            torch.onnx.export(wrapper, (example,), buf, input_names=["input"], output_names=wrapper.output_names,
                              dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in wrapper.output_names}},
                              opset_version=opset, dynamo=False)
            files["onnx"] = str(atomic_write_bytes(out / "model.onnx", buf.getvalue()))
        if "torchscript" in formats:
            traced = torch.jit.trace(wrapper, example, check_trace=False)
            buf = io.BytesIO()
            torch.jit.save(traced, buf)
            files["torchscript"] = str(atomic_write_bytes(out / "model.torchscript.pt", buf.getvalue()))
    info = {"source": str(path), "files": files, "input": {"name": "input", "shape": ["batch", 3, size, size],
                                                           "range": [0, 1], "grayscale": predictor.grayscale,
                                                           "normalize": predictor.normalize},
            "outputs": wrapper.output_names, "classes": list(predictor.classes), "heads": wrapper.heads,
            "main_head": wrapper.main_head, "learners": wrapper.learners}
    write_json(out / "export.json", info)
    return json.loads(json.dumps(info))
