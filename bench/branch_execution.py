"""ESR branch execution: a loop over the branches vs all branches fused as grouped convolutions.

For ESR-9 (``esr9``) and ESR*-9 (``esr9_div``, CBAM + diversity) at full width and at
quarter width (96 px, batch 32, channels-last as the training engine runs them), on CPU
and on CUDA when available, this times

- a **training step**: ``zero_grad``, forward, ``model.loss``, backward, SGD step
  (lr 0.01, momentum 0.9);
- an **eval forward** under ``torch.no_grad()``;

for ``branch_execution="loop"`` and ``"fused"`` (two copies of one initial model), with
``--warmup`` untimed and ``--reps`` timed repetitions, interleaved (loop, fused, fused,
loop, ...) so background load hits both alike; the median is reported. The warm-up
step doubles as the agreement check: branch logits, ensemble probabilities, features and
attention maps (train mode from one initial state; eval mode after loading the loop's
state into the fused copy), the loss and the BatchNorm buffers after the step, loop vs
fused, each within ``1e-5`` relative to
``max(1, scale)`` (TF32 off during the check on CUDA) -> ``agreement.ok``.

Gradients are reported, not held to 1e-5: ``gradients.fused_vs_loop`` (branch and base
parameters, relative to ``max(1, largest |grad|)``) next to ``loop_vs_loop_other_format``,
the same loop run in the other memory format (NCHW vs channels-last: same math, another
float32 summation order), and ``within_fp32_noise`` (fused-vs-loop at most
``max(1e-5, 2 x`` that yardstick``)``. Through train-mode BatchNorm and 9 branches these
gradients are ill-conditioned in float32 whatever the execution: at quarter width,
batch 32, the loop's own float32 gradients lie 1e-4 to 6e-3 (relative) from a float64
run, while loop and fused agree to 1e-15 in float64 (``tests/test_fused.py`` checks
float64 to 1e-9 and float32 to 1e-5 on a small batch).

Writes ``bench/results/branch_execution.json`` (atomically) with machine info and date;
``main(argv)`` returns the same dict. Run: ``.venv/bin/python bench/branch_execution.py``
(about 3 minutes on 2 CPU cores); ``--quick`` for quarter width only, 1 repetition.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fer_lab.models import build_model  # noqa: E402
from fer_lab.runs import environment, write_json  # noqa: E402
from fer_lab.utils import flush_denormal  # noqa: E402

OUT = ROOT / "bench" / "results" / "branch_execution.json"
MODELS = ("esr9", "esr9_div")
TOL = 1e-5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _exact(device: torch.device):
    """TF32 off on CUDA (so the 1e-5 agreement check measures the fusion, not TF32)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _maxdiff(a, b) -> float:
    """Largest absolute difference, divided by ``max(1, largest |a|)`` (1e-5 "relative to scale")."""
    if a is None and b is None:
        return 0.0
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max()) / max(1.0, float(a.abs().max()))


def _out_diffs(oa, ob) -> dict:
    return {"branch_logits": _maxdiff(oa.branch_logits, ob.branch_logits), "probs": _maxdiff(oa.probs, ob.probs),
            "features": _maxdiff(oa.features, ob.features),
            "channel_attention": _maxdiff(oa.channel_attention, ob.channel_attention),
            "spatial_attention": _maxdiff(oa.spatial_attention, ob.spatial_attention)}


def _grad_diff(pairs) -> float:
    """Largest gradient difference over ``(param_a, param_b)`` pairs, relative to ``max(1, largest |grad|)``."""
    pairs = list(pairs)
    scale = max(1.0, max(float(p.grad.abs().max()) for p, _ in pairs))
    return max(float((p.grad - q.grad).abs().max()) for p, q in pairs) / scale


def _train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    out = model(x)
    lo = model.loss(out, y)
    lo.total.backward()
    return out, lo


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bench_one(name: str, width: float, device: torch.device, batch: int, size: int, warmup: int,
              reps: int, eval_reps: int, channels_last: bool = True, seed: int = 0) -> dict:
    """Agreement and median times of loop vs fused for one model on one device."""
    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    models = {"loop": build_model(name, width=width, input_size=size).to(device, memory_format=fmt)}
    models["fused"] = copy.deepcopy(models["loop"])
    models["fused"].branch_execution = "fused"
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, 8, (batch,), generator=g).to(device)
    order = ("loop", "fused")
    # the loop in the other memory format: same math, other float32 summation order, a yardstick
    # for how far two correct float32 gradients of this model lie apart
    other = torch.contiguous_format if channels_last else torch.channels_last
    yardstick = copy.deepcopy(models["loop"]).to(memory_format=other)

    # ---- training: warm-up (agreement check), then timed steps ----
    if warmup < 1:
        raise ValueError("warmup must be >= 1: the first warm-up step is the agreement check")
    agree_train, grads = {}, {}
    for w in range(warmup):
        with _exact(device):
            res = {k: _train_step(models[k], opts[k], x, y) for k in order}
        if w == 0:
            (oa, la), (ob, lb) = res["loop"], res["fused"]
            la_, lb_ = models["loop"], models["fused"]
            agree_train = _out_diffs(oa, ob)
            agree_train["loss"] = _maxdiff(la.total, lb.total)
            agree_train["grad_branches"] = _grad_diff(zip(la_.branches.parameters(), lb_.branches.parameters()))
            grads["fused_vs_loop"] = {"branches": agree_train.pop("grad_branches"),
                                      "base": _grad_diff(zip(la_.base.parameters(), lb_.base.parameters()))}
            yardstick.zero_grad(set_to_none=True)
            with _exact(device):
                yardstick.loss(yardstick(x.contiguous(memory_format=other)), y).total.backward()
            grads["loop_vs_loop_other_format"] = {
                "branches": _grad_diff(zip(la_.branches.parameters(), yardstick.branches.parameters())),
                "base": _grad_diff(zip(la_.base.parameters(), yardstick.base.parameters()))}
            del yardstick
        for k in order:
            opts[k].step()
        if w == 0:
            agree_train["bn_buffers"] = max(_maxdiff(a, b) for a, b in zip(models["loop"].buffers(),
                                                                          models["fused"].buffers()))
        del res
    times = {k: [] for k in order}
    for r in range(reps):
        for k in (order if r % 2 == 0 else order[::-1]):
            def step(k=k):
                _train_step(models[k], opts[k], x, y)
                opts[k].step()
            times[k].append(_timed(step, device))
    train = {k: {"median_s": statistics.median(v), "times_s": [round(t, 4) for t in v]} for k, v in times.items()}

    # ---- eval: warm-up (agreement check), then timed forwards ----
    # both copies in one state (the loop's after the training steps): the float32 gradient
    # noise of the steps would otherwise leave them ~1e-5 apart before the eval check
    models["fused"].load_state_dict(models["loop"].state_dict())
    for m in models.values():
        m.eval()
    agree_eval, finite = {}, None
    with torch.no_grad():
        for w in range(warmup):
            with _exact(device):
                outs = {k: models[k](x) for k in order}
            if w == 0:
                agree_eval = _out_diffs(outs["loop"], outs["fused"])
                finite = bool(torch.isfinite(outs["loop"].branch_logits).all())
            del outs
        times = {k: [] for k in order}
        for r in range(eval_reps):
            for k in (order if r % 2 == 0 else order[::-1]):
                times[k].append(_timed(lambda k=k: models[k](x), device))
    evals = {k: {"median_s": statistics.median(v), "times_s": [round(t, 4) for t in v]} for k, v in times.items()}

    ok = all(v <= TOL for v in {**agree_train, **agree_eval}.values())
    f, n = grads["fused_vs_loop"], grads["loop_vs_loop_other_format"]
    grads["within_fp32_noise"] = all(f[k] <= max(TOL, 2 * n[k]) for k in f)
    return {
        "model": name, "width": width, "device": str(device), "batch": batch, "image_size": size,
        "channels_last": channels_last, "warmup": warmup, "reps": reps, "eval_reps": eval_reps,
        "train_step": train, "eval_forward": evals,
        "fused_speedup_train": train["loop"]["median_s"] / train["fused"]["median_s"],
        "fused_speedup_eval": evals["loop"]["median_s"] / evals["fused"]["median_s"],
        "agreement": {"train": agree_train, "eval": agree_eval, "tolerance": TOL, "ok": ok, "gradients": grads,
                      "eval_outputs_finite": finite},
    }


def summarise(result: dict) -> str:
    """One paragraph for ``bench/RESULTS.md``: medians per device/model/width, agreement, the verdict."""
    parts = []
    for r in result["results"]:
        t, e = r["train_step"], r["eval_forward"]
        parts.append(f"{r['device']} {r['model']} width {r['width']:g}: train step loop {t['loop']['median_s']:.3f} s "
                     f"vs fused {t['fused']['median_s']:.3f} s (x{r['fused_speedup_train']:.2f}), eval forward "
                     f"{e['loop']['median_s']:.3f} s vs {e['fused']['median_s']:.3f} s (x{r['fused_speedup_eval']:.2f})")
    full = [r for r in result["results"] if r["device"] == "cpu" and r["width"] == 1.0]
    if full:
        wins = all(r["fused_speedup_train"] > 1 for r in full)
        verdict = ("fused is faster on CPU at full width" if wins else
                   "fused is not faster on CPU at full width, so ESR keeps branch_execution='loop' as its default")
    else:
        verdict = "no full-width CPU measurement"
    return (f"Median of {result['results'][0]['reps']} (x = loop time / fused time, > 1: fused faster). "
            + "; ".join(parts) + f". Outputs agree to 1e-5: {result['all_agree']}. Verdict: {verdict}.")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", nargs="*", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--widths", nargs="*", type=float, default=None, help="default: 1.0 0.25")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3, help="timed training steps per variant")
    parser.add_argument("--eval-reps", type=int, default=3, help="timed eval forwards per variant")
    parser.add_argument("--contiguous", action="store_true", help="NCHW instead of channels-last")
    parser.add_argument("--quick", action="store_true", help="quarter width only, 1 repetition")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    widths = args.widths or ([0.25] if args.quick else [1.0, 0.25])
    reps, eval_reps = (1, 1) if args.quick else (args.reps, args.eval_reps)

    rows = []
    t0 = time.perf_counter()
    with flush_denormal():
        for dev in devices:
            device = torch.device(dev)
            for width in widths:
                for name in args.models:
                    rows.append(bench_one(name, width, device, args.batch, args.size, args.warmup, reps,
                                          eval_reps, channels_last=not args.contiguous))
    machine = {**environment(devices[-1]), "loadavg_1_5_15": list(os.getloadavg())}
    result = {
        "benchmark": "branch_execution",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "what": "median seconds of a training step (zero_grad, forward, loss, backward, SGD step) and of an "
                "eval forward (no_grad), ESR branch_execution='loop' vs 'fused'",
        "results": rows,
        "all_agree": all(r["agreement"]["ok"] for r in rows),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    result["summary"] = summarise(result)
    write_json(args.out, result)
    result["path"] = str(args.out)
    return result


if __name__ == "__main__":
    res = main()
    for r in res["results"]:
        print(f"{r['device']:5s} {r['model']:9s} w={r['width']:<5g} "
              f"train loop {r['train_step']['loop']['median_s']:.3f}s fused {r['train_step']['fused']['median_s']:.3f}s "
              f"(x{r['fused_speedup_train']:.2f})  eval loop {r['eval_forward']['loop']['median_s']:.3f}s "
              f"fused {r['eval_forward']['fused']['median_s']:.3f}s (x{r['fused_speedup_eval']:.2f})  "
              f"agree={r['agreement']['ok']}")
    print(f"wrote {res['path']} in {res['seconds']} s")
