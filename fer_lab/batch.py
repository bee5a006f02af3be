"""Papermill batches: a grid of notebook runs with a summary, skip-on-restart and failure records.

A sweep file (YAML) names a notebook, a ``fixed`` part and a ``grid`` (the product of
parameter lists); every grid point runs the notebook with papermill into
``<output_dir>/<name>/<run>/`` (the executed ``notebook.ipynb`` beside the run directory's
files), and ``<output_dir>/<name>/summary.csv`` is rewritten as runs finish. Runs that
finished are skipped when the batch is started again; a failed run is recorded with its
error and the batch goes on (a restart retries it, and the training notebooks resume from
their last checkpoint). Each run is a separate ``papermill`` process on the ``fer_lab``
kernel, so ``--jobs N`` runs N at once safely. ``--devices 0,1,2,3`` places one run per GPU:
each run's process sees only its device (``CUDA_VISIBLE_DEVICES``), as many runs at once as
devices are listed (repeat an id to share a GPU: ``0,0,1,1``; ``cpu`` hides every GPU).

Sweep file::

    name: table1-esr-synthetic
    notebook: 02_train_esr.ipynb        # relative to the sweep file, then to notebooks/
    output_dir: ../../outputs/batches   # relative to the sweep file (default: outputs/batches)
    timeout: 3600                       # per-cell execution timeout in seconds
    run_name: "{model}-s{seed}"         # optional; default: the grid values joined
    required: [data_root]               # optional; parameters that must be given (--set)
    preset: esr_ferplus                 # optional; a fer_lab.presets entry that fills the parameters
    fixed: {dataset: synthetic, epochs: 2}
    grid: {model: [esr9, esr9_div], seed: [0, 1, 2]}

A grid key ``variant`` names entries of an optional ``variants`` mapping (``variants:
{esr4_median: {model: esr9_div, gamma: median}}``): each grid point gets its variant's
parameters, for studies whose rows are not a product of parameter lists (the ``variant``
value itself is recorded in the summary, not passed to the notebook).

A string in ``fixed`` may name other parameters in braces (``init_weights:
/models/{model}/best.pt``): each grid point fills them in. Parameters of a grid point,
later ones winning: the notebook's defaults, the ``preset``'s
fields (as the notebook's parameters, the rest in its ``train_options``), ``fixed``, the
grid point. Dict-valued parameters (``model_options``, ``data_options``,
``train_options``) are merged key by key.
"""
from __future__ import annotations

import fnmatch
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import schema
from .runs import read_json, write_csv, write_json

log = logging.getLogger(__name__)

KERNEL = "fer_lab"
NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
STATUS_FILE = "batch_status.json"
_SWEEP_KEYS = {"name", "notebook", "output_dir", "timeout", "run_name", "fixed", "grid", "kernel", "required",
               "preset", "variants"}
_MERGED = ("model_options", "data_options", "train_options")


@dataclass
class Sweep:
    """A parsed sweep file (see the module docstring)."""

    name: str
    notebook: Path
    output_dir: Path
    fixed: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    timeout: int = 3600
    run_name: str | None = None
    kernel: str = KERNEL
    required: list = field(default_factory=list)
    preset: str | None = None
    variants: dict = field(default_factory=dict)

    def check_required(self) -> None:
        """Every ``required`` parameter must have a value (in fixed, e.g. via ``--set``, or grid)."""
        missing = [k for k in self.required if self.fixed.get(k) is None and k not in self.grid]
        if missing:
            raise ValueError(f"sweep {self.name}: parameter(s) {missing} must be set, e.g. "
                             + " ".join(f"--set {k}=..." for k in missing))

    def points(self) -> list[tuple[str, dict]]:
        """``(run name, parameters)`` of every grid point, in grid order."""
        keys = list(self.grid)
        out, seen = [], set()
        base = self.preset_parameters()
        for values in itertools.product(*(self.grid[k] for k in keys)) if keys else [()]:
            point = dict(zip(keys, values))
            variant = self.variants.get(point.get("variant"), {}) if "variant" in point else {}
            params = _merge(base, self.fixed, variant, point)
            params = {k: self._fill(k, v, params) for k, v in params.items()}
            if self.run_name:
                try:
                    name = self.run_name.format(**params)
                except KeyError as err:
                    raise ValueError(f"sweep {self.name}: run_name {self.run_name!r} uses {err}, which is neither "
                                     f"in fixed nor in grid") from None
            else:
                name = "-".join(f"{k}={v}" for k, v in point.items()) or "run"
            name = "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in name)
            if name in seen:
                raise ValueError(f"sweep {self.name}: two grid points get the run name {name!r}; "
                                 "make run_name include every grid key")
            seen.add(name)
            out.append((name, params))
        return out

    def _fill(self, key: str, value, params: dict):
        """A fixed string parameter with ``{grid key}`` placeholders filled in for this point
        (e.g. ``init_weights: /models/{model}/best.pt``)."""
        if not (isinstance(value, str) and "{" in value and key in self.fixed):
            return value
        try:
            return value.format(**params)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"sweep {self.name}: parameter {key}={value!r} has a placeholder that is not a "
                             f"parameter ({err})") from None

    def preset_parameters(self) -> dict:
        """The ``preset``'s fields as parameters of this sweep's notebook (empty without a preset)."""
        if not self.preset:
            return {}
        import papermill

        from .presets import notebook_parameters

        return notebook_parameters(self.preset, set(papermill.inspect_notebook(str(self.notebook))))

    @property
    def directory(self) -> Path:
        return self.output_dir / self.name


def _merge(*layers: dict) -> dict:
    """Later layers win; the dict-valued parameters of ``_MERGED`` are merged key by key."""
    out: dict = {}
    for layer in layers:
        for k, v in layer.items():
            if k in _MERGED and isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = {**out[k], **v}
            else:
                out[k] = v
    return out


def load_sweep(path) -> Sweep:
    """Parse and validate a sweep YAML file (errors name the file and the key)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with keys {sorted(_SWEEP_KEYS)}")
    unknown = sorted(set(data) - _SWEEP_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; expected some of {sorted(_SWEEP_KEYS)}")
    for key in ("name", "notebook"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"{path}: 'grid' must map parameter names to non-empty lists")
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ValueError(f"{path}: 'fixed' must be a mapping of parameter names to values")
    clash = sorted(set(grid) & set(fixed))
    if clash:
        raise ValueError(f"{path}: {clash} appear both in 'fixed' and in 'grid'")
    nb = Path(data["notebook"])
    candidates = [nb] if nb.is_absolute() else [path.parent / nb, NOTEBOOKS_DIR / nb]
    notebook = next((c.resolve() for c in candidates if c.is_file()), None)
    if notebook is None:
        raise FileNotFoundError(f"{path}: notebook {data['notebook']!r} not found (looked in "
                                f"{', '.join(str(c) for c in candidates)})")
    out = Path(data.get("output_dir", Path.cwd() / "outputs" / "batches"))
    out = out if out.is_absolute() else (path.parent / out)
    timeout = data.get("timeout", 3600)
    if not isinstance(timeout, int) or timeout < 1:
        raise ValueError(f"{path}: 'timeout' must be a positive number of seconds, got {timeout!r}")
    variants = data.get("variants") or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise ValueError(f"{path}: 'variants' must map variant names to mappings of parameters")
    unknown_variants = sorted(set(grid.get("variant", [])) - set(variants)) if variants else []
    if unknown_variants:
        raise ValueError(f"{path}: grid variant(s) {unknown_variants} are not in 'variants' ({sorted(variants)})")
    preset = data.get("preset")
    if preset is not None:
        from .presets import PRESETS

        if preset not in PRESETS:
            raise ValueError(f"{path}: unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
    return Sweep(name=str(data["name"]), notebook=notebook, output_dir=out.resolve(), fixed=fixed, grid=grid,
                 timeout=timeout, run_name=data.get("run_name"), kernel=data.get("kernel", KERNEL),
                 required=list(data.get("required") or []), preset=preset, variants=variants)


def check_kernel(name: str = KERNEL) -> None:
    """Raise a clear error when the Jupyter kernel ``name`` is not installed."""
    from jupyter_client.kernelspec import KernelSpecManager

    if name not in KernelSpecManager().find_kernel_specs():
        raise RuntimeError(f"Jupyter kernel {name!r} is not installed; `make venv` installs it, or run "
                           f"`python -m ipykernel install --sys-prefix --name {name}`")


def parse_devices(devices) -> list[str]:
    """``"0,1"`` or ``[0, 1]`` -> ``["0", "1"]``: GPU indices (``CUDA_VISIBLE_DEVICES`` values) or
    ``cpu``; one entry per concurrent run (an index may repeat)."""
    items = [str(d).strip() for d in (devices.split(",") if isinstance(devices, str) else devices)]
    bad = [d for d in items if not (d.isdigit() or d == "cpu")]
    if not items or bad:
        raise ValueError(f"devices={devices!r}: expected GPU indices or 'cpu' separated by commas (e.g. 0,1,2,3), "
                         f"got {bad or 'nothing'}")
    return items


def execute(notebook: Path, output: Path, parameters: dict, kernel: str = KERNEL, timeout: int = 3600,
            cwd: Path | None = None, threads: int | None = None, stream: bool = False,
            device: str | None = None) -> tuple[bool, str, float]:
    """Run ``notebook`` with papermill in a subprocess; returns ``(ok, error, seconds)``.

    ``error`` is the notebook's exception (``ValueError: ...``) or the tail of papermill's
    output. ``threads`` caps the kernel's OpenMP/torch threads (for parallel jobs);
    ``stream`` shows papermill's progress and the cells' output on this terminal instead
    of capturing them (then ``error`` only points to the executed notebook); ``device`` (a
    GPU index or ``cpu``) is the only device the kernel sees (``CUDA_VISIBLE_DEVICES``). A notebook with
    an ``interactive`` parameter gets ``interactive=False`` unless ``parameters`` set it.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    import papermill

    # nobody is there to move a slider: notebooks with widgets draw their static figures only
    if "interactive" not in parameters and "interactive" in papermill.inspect_notebook(str(notebook)):
        parameters = {**parameters, "interactive": False}
    params_file = output.parent / ".papermill_parameters.json"
    write_json(params_file, parameters)
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(output), "-f", str(params_file), "-k", kernel,
           "--execution-timeout", str(timeout), "--cwd", str(cwd or notebook.parent)]
    cmd += ["--log-output"] if stream else ["--no-progress-bar"]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = "" if device == "cpu" else device
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=not stream, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
        return True, "", seconds
    return False, _error_of((proc.stderr or "") + (proc.stdout or "")), seconds


def _error_of(text: str) -> str:
    """The notebook's exception line from papermill's output, else its last lines."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("papermill.exceptions", "Exception encountered")):
            continue
        if any(ln.startswith(p) for p in ("ValueError", "KeyError", "RuntimeError", "FileNotFoundError",
                                          "TypeError", "FileExistsError", "AssertionError", "DatasetError",
                                          "FloatingPointError", "IndexError", "NameError", "ImportError",
                                          "ModuleNotFoundError", "AttributeError", "KeyboardInterrupt",
                                          "TimeoutError", "nbclient.exceptions", "CellTimeoutError")):
            return ln[:2000]
    return " | ".join(lines[-5:])[:2000]


def _status(run_dir: Path) -> dict | None:
    f = run_dir / STATUS_FILE
    return read_json(f) if f.is_file() else None


def _summary_row(name: str, params: dict, run_dir: Path) -> dict:
    row = {"run": name, **{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in params.items()}}
    st = _status(run_dir) or {"status": "pending"}
    row.update(status=st["status"], seconds=st.get("seconds"), error=st.get("error", ""))
    if (run_dir / "metrics.json").is_file():
        m = read_json(run_dir / "metrics.json")
        head = m["selected"]["head"]
        test = m.get("test", {})
        row.update(head=head, val_acc=m["selected"]["val_score"], test_acc=test.get(schema.acc(head)))
        # the model's other decisions beside the selected one (ESR: vote and softmax mean), not each learner's
        keys = list(test)
        row.update({schema.col("test", schema.acc(h)): test[schema.acc(h)]
                    for h in schema.decision_heads(keys, None) if h != head})
        row.update({schema.col("test", schema.D(t)): test[schema.D(t)] for t in schema.terms(keys, None)})
    return row


def select_runs(names: list[str], patterns: list[str] | None) -> set[str]:
    """The run names matching any of the shell-style ``patterns`` (``esr4_div*-s1``); every
    name when ``patterns`` is empty; a pattern that matches nothing is an error."""
    if not patterns:
        return set(names)
    chosen = set()
    for pat in patterns:
        hits = fnmatch.filter(names, pat)
        if not hits:
            raise ValueError(f"runs pattern {pat!r} matches no run of the sweep; its runs are: {', '.join(names)}")
        chosen.update(hits)
    return chosen


def run_batch(sweep: Sweep | str | os.PathLike, jobs: int | None = None, retry_failed: bool = True,
              runs: list[str] | None = None, devices=None) -> Path:
    """Execute every pending grid point of ``sweep``; returns the summary CSV's path.

    Finished runs (status ``done``) are skipped; failed ones are retried unless
    ``retry_failed=False``; ``runs`` (shell-style patterns of run names) restricts which
    grid points execute (the others are left as they are). ``summary.csv`` lists every grid
    point with its status, parameters, time, error and, for training notebooks, the selected
    head's accuracy. ``devices`` (:func:`parse_devices`): one run per listed device at a time
    (``jobs`` defaults to their number and may not differ from it).
    """
    sweep = sweep if isinstance(sweep, Sweep) else load_sweep(sweep)
    slots = parse_devices(devices) if devices is not None else None
    if slots is not None and jobs is not None and jobs != len(slots):
        raise ValueError(f"jobs={jobs} with devices={','.join(slots)}: one run per listed device at a time; "
                         f"list a device twice to run two runs on it (e.g. {','.join(slots + slots[:1])})")
    jobs = len(slots) if slots is not None else (1 if jobs is None else jobs)
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r}: expected an int >= 1")
    free = None
    if slots is not None:
        import queue

        free = queue.Queue()
        for d in slots:
            free.put(d)
    sweep.check_required()
    points = sweep.points()
    chosen = select_runs([n for n, _ in points], runs)
    check_kernel(sweep.kernel)
    sweep.directory.mkdir(parents=True, exist_ok=True)
    write_json(sweep.directory / "sweep.json", {"name": sweep.name, "notebook": str(sweep.notebook),
                                               "preset": sweep.preset, "fixed": sweep.fixed, "grid": sweep.grid, "timeout": sweep.timeout,
                                               "runs": [n for n, _ in points]})
    summary = sweep.directory / "summary.csv"
    lock = threading.Lock()

    def write_summary():
        with lock:
            write_csv(summary, [_summary_row(n, p, sweep.directory / n) for n, p in points])

    def one(item):
        name, params = item
        run_dir = sweep.directory / name
        st = _status(run_dir)
        if st and (st["status"] == "done" or (st["status"] == "failed" and not retry_failed)):
            log.info("batch %s: %s already %s, skipped", sweep.name, name, st["status"])
            return
        injected = {**{k: v for k, v in params.items() if not (k == "variant" and sweep.variants)},
                    "output_dir": str(sweep.directory), "run_name": name, "progress": False}
        device = free.get() if free is not None else None
        placed = {} if device is None else {"device": device}
        try:
            write_json(run_dir / STATUS_FILE, {"status": "running", "parameters": injected, **placed})
            ok, error, seconds = execute(sweep.notebook, run_dir / "notebook.ipynb", injected, sweep.kernel,
                                         sweep.timeout, threads=max(1, (os.cpu_count() or 1) // jobs), device=device)
        finally:
            if free is not None:
                free.put(device)
        write_json(run_dir / STATUS_FILE, {"status": "done" if ok else "failed", "parameters": injected,
                                           "seconds": round(seconds, 1), "error": error, **placed})
        if not ok:
            log.warning("batch %s: %s failed: %s", sweep.name, name, error)
        write_summary()

    write_summary()
    todo = [item for item in points if item[0] in chosen]
    if jobs == 1:
        for item in todo:
            one(item)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(one, todo))
    write_summary()
    return summary

