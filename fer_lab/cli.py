"""Command line: ``python -m fer_lab <command>``. A thin layer over the package.

Commands: ``train`` (any model on any dataset, every option documented in ``--help``),
``demo`` (the CPU-sized diversified ESR on synthetic faces that ``make demo`` runs),
``models`` (the registered variants), ``presets`` (the published protocols), ``batch``
(papermill sweeps), ``data check`` (validate a dataset on disk).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from .diversity import TERMS
from .presets import PRESETS, format_presets, preset_fields, preset_help
from .config import MODEL_OPTIONS, PARTS, TrainConfig, cli_options, flat_defaults
from .train import train

#: The demo: a 4-branch ESR* at quarter width on 96 px synthetic faces, grown one branch per
#: stage, sized to finish within 10 minutes on 2 CPU cores (README states the measured time).
#: Adam instead of the papers' SGD: on this budget SGD is still near chance when the demo
#: ends (bench/results/demo_sizing.json).
DEMO = dict(
    model="esr9_div", branches=4, width=0.25, image_size=96,
    dataset="synthetic", data_options={"num_samples": {"val": 600, "test": 1200}},
    optimizer="adam", lr=1e-3, lr_new=1e-3, lr_old=3e-4, lr_step=6, lr_gamma=0.5,
    epochs=7, epochs_later=3, batch_size=32, subset_per_class=200, seed=0,
    run_name="esr4_div-synthetic-demo", output_dir="outputs/demo",
    train_options={"keep_freed_memory": True},     # the library leaves malloc alone; the demo opts in
)


def _kv(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass
    return key.strip(), value


def _argument_type(parse):
    """``parse`` for argparse: its ValueError becomes argparse's message (the option and the text)."""
    if parse in (int, float, str):
        return parse

    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    wrapped.__name__ = getattr(parse, "__name__", "value").strip("_")
    return wrapped


def _gamma(text: str):
    if text == "median":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'median', got {text!r}") from None


def _terms(text: str):
    if text.lower() == "none":
        return []
    terms = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in terms if t not in TERMS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown diversity term(s) {bad}; expected a comma list of {TERMS} "
                                         "or 'none'")
    return terms


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fer_lab", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages (INFO level)")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model; writes a run directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train a registered model on a dataset with the paper's protocol. "
                                   "Writes <output-dir>/<name>/ (config, env, dataset fingerprint, history, "
                                   "similarity matrices, metrics, checkpoints, figures).")
    g = t.add_argument_group("what to train")
    g.add_argument("--config", type=Path, help="YAML/JSON file of config fields (flat names, or the tree of "
                                                "config.json); command-line options override it")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="a published protocol: model, dataset, protocol and optimiser settings of the script it "
                        "names (" + preset_help() + "); the config file and explicit options override it")
    g.add_argument("--model", default=TrainConfig().model,
                   help="registered model name (see `python -m fer_lab models`)")
    g.add_argument("--name", help="run name (default: <model>-<dataset>-s<seed>)")
    g.add_argument("--data-option", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="extra dataset option, e.g. num_samples=2000 (repeatable; VALUE parsed as JSON)")
    g.add_argument("--branches", type=int, help="ESR branch count (default: the variant's, 9 or 15)")
    g.add_argument("--width", type=float, help="channel width multiplier (1.0 = paper; 0.25 runs on a CPU)")
    g.add_argument("--cbam-position", choices=("after_pool", "before_pool"),
                   help="ESR*: CBAM after the block's max-pooling (the paper's code, default) or before it")
    g.add_argument("--decision", choices=("vote", "mean"),
                   help="ESR's decision, used for model selection: plurality vote (default) or mean softmax")
    g.add_argument("--diversity-scope", choices=("all", "active"),
                   help="esr_finetune: the diversity term compares all L branches (the authors' scripts, "
                        "default) or only the branches trained so far")
    g.add_argument("--model-option", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="any other model constructor option (repeatable; VALUE parsed as JSON), e.g. the "
                        "reproduction quirks channel_term_input=\"spatial\" and branch_bn_train_at_test=true")
    g = t.add_argument_group("diversity term")
    g.add_argument("--diversity-terms", type=_terms, help="comma list of spatial,channel,branch or 'none' "
                                                          "(default: the variant's)")
    g.add_argument("--gamma", type=_gamma,
                   help="RBF bandwidth of the similarity (paper: 10), or 'median': the median heuristic "
                        "1 / median ||phi_l - phi_k||^2, recomputed on every batch")
    g.add_argument("--diagonal", choices=("paper", "reference"),
                   help="'paper': unit diagonal; 'reference': the public code's zero diagonal")
    g.add_argument("--reduction", choices=("det", "logdet"), help="det (paper) or jittered logdet")
    g.add_argument("--normalize", choices=("none", "l2"),
                   help="L2-normalise pooled features before the similarity")
    g.add_argument("--diversity-weight", type=float, help="weight of each term in the loss (paper: 1)")
    # every config field, generated from fer_lab.config (help, choices and defaults live there)
    for title, options in cli_options():
        g = t.add_argument_group(title)
        for flag, kw in options:
            if "type" in kw:
                kw = dict(kw, type=_argument_type(kw["type"]))
            g.add_argument(flag, **kw)
    t.add_argument("--resume", action="store_true", help="continue the run <output-dir>/<name> where it stopped")

    dm = sub.add_parser("demo", help="the CPU demo: notebooks 02 (train a 4-branch ESR* on synthetic faces) "
                                     "and 04 (attention explorer) via papermill (make demo)")
    dm.add_argument("--output-dir", default=DEMO["output_dir"], help="where the demo run goes")
    dm.add_argument("--no-progress", action="store_true", help="do not stream the notebooks' output")

    sub.add_parser("models", help="list the registered model variants")
    sub.add_parser("presets", help="list the presets: the published script each reproduces, its settings and "
                                   "where fer_lab differs")

    bt = sub.add_parser("batch", help="run a sweep of notebooks with papermill (see fer_lab/batch.py)",
                        description="Execute a notebook for every point of a sweep's grid into "
                                    "<output_dir>/<name>/<run>/, keeping summary.csv up to date; finished runs are "
                                    "skipped on restart, failed runs are recorded and the batch goes on.")
    bt.add_argument("sweep", type=Path, help="sweep YAML file (e.g. notebooks/sweeps/table1_esr_synthetic.yaml)")
    bt.add_argument("--jobs", type=int, default=None, help="runs executed at once (default 1, or one per --devices entry)")
    bt.add_argument("--devices", default=None, metavar="0,1,...",
                    help="GPUs to place runs on, one run per listed device at a time (each run sees only its "
                         "device); repeat an index to share a GPU, 'cpu' for a run without GPU")
    bt.add_argument("--set", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                    help="override or add a fixed parameter, e.g. data_root=/data/FERPlus (VALUE parsed as JSON)")
    bt.add_argument("--no-retry", action="store_true", help="skip failed runs too instead of retrying them")
    bt.add_argument("--runs", nargs="+", metavar="PATTERN",
                    help="execute only the runs whose names match these shell-style patterns (e.g. 'esr4_div*-s1')")

    pr = sub.add_parser("predict", help="expressions on your own photos: faces found, cropped and classified by a "
                                        "trained run; attention and Grad-CAM figures, CSV and JSON",
                        description="Find the faces in each image (OpenCV's Haar cascade, eyes levelled), classify "
                                    "them with a trained run or checkpoint (every head, every learner), and write "
                                    "predictions.csv, predictions.json and one figure per face (attention of each "
                                    "learner, Grad-CAM, class probabilities). Unreadable images and images without "
                                    "a face are reported and skipped (exit status 1).")
    pr.add_argument("model", type=Path, help="a run directory or a checkpoint file (checkpoints/best.pt)")
    pr.add_argument("images", type=Path, nargs="+", help="image files (JPEG, PNG, ...)")
    pr.add_argument("--out", type=Path, help="output directory (default: outputs/predict/<run name>)")
    pr.add_argument("--no-detect", action="store_true", help="the images are face crops already: no detection")
    pr.add_argument("--all-faces", action="store_true", help="every face found (default: the largest per image)")
    pr.add_argument("--no-align", action="store_true", help="do not rotate faces to level the eyes")
    pr.add_argument("--no-grad-cam", action="store_true", help="skip Grad-CAM (faster)")
    pr.add_argument("--no-figures", action="store_true", help="only the CSV and JSON")
    pr.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")

    ex = sub.add_parser("export", help="export a trained run to ONNX and/or TorchScript (decision, every head's "
                                       "probabilities, attention maps)")
    ex.add_argument("model", type=Path, help="a run directory or a checkpoint file (checkpoints/best.pt)")
    ex.add_argument("--format", dest="formats", action="append", choices=("onnx", "torchscript"),
                    help="repeatable (default: onnx)")
    ex.add_argument("--out", type=Path, help="output directory (default: <run>/export)")
    ex.add_argument("--which", default="best", choices=("best", "last"), help="which checkpoint of a run")

    da = sub.add_parser("data", help="dataset tools (check)")
    dsub = da.add_subparsers(dest="data_command", required=True)
    ck = dsub.add_parser("check", help="validate a dataset on disk: per-split, per-class counts and every problem",
                         description="Parse every label row and decode every image of a dataset (writes nothing); "
                                     "print per-split, per-class counts and every problem found (missing files or "
                                     "columns, labels out of range with file and line, unreadable images). Exit "
                                     "status 0 when clean, 1 when problems were found.")
    ck.add_argument("name", help="dataset name (ferplus, fer2013, rafdb, affectnet, folder)")
    ck.add_argument("root", help="directory holding the dataset's files")
    ck.add_argument("--split", action="append", default=None,
                    help="split to check (repeatable; default: every split present)")
    ck.add_argument("--label-mode", choices=("majority", "probability", "plurality"),
                    help="FER+ label mode (default: majority)")
    ck.add_argument("--label-space", default=None, help="also map labels into this space (e.g. affectnet8)")
    ck.add_argument("--option", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                    help="other dataset option, e.g. layout=source or images=original (repeatable)")
    return parser


def run_data_check(args: argparse.Namespace) -> int:
    """``data check``: print the report of :func:`fer_lab.data.check.check_dataset`; 0 if clean, else 1."""
    from .data.check import check_dataset, format_report

    options = dict(args.option)
    if args.label_mode is not None:
        if args.name != "ferplus":
            raise SystemExit(f"--label-mode applies to ferplus only, not {args.name}")
        options["label_mode"] = args.label_mode
    splits = None
    if args.split:
        splits = [s.strip() for part in args.split for s in part.split(",") if s.strip()]
    report = check_dataset(args.name, args.root, splits=splits, label_space=args.label_space, **options)
    print(format_report(report))
    return 0 if report.ok else 1


def _given_fields(argv) -> set[str]:
    """Flat names of the options that appear in the ``train`` command line ``argv`` (even at
    their default value); empty when ``argv`` is unknown."""
    if argv is None:
        return set()
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["train"]._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(list(argv))))


def config_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from parsed ``train`` arguments: the ``--preset`` first, then the config file,
    then options given on the command line (those in ``argv`` when given, even at their
    default value, and any whose value differs from the default)."""
    preset = preset_fields(args.preset, {}) if getattr(args, "preset", None) else {}
    base: dict = {}
    if args.config:
        import yaml

        if not args.config.is_file():
            raise SystemExit(f"--config {args.config}: no such file")
        loaded = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"--config {args.config}: expected a mapping of config fields")
        try:
            base = {k: v for k, v in TrainConfig.from_dict(loaded).flat().items() if k in _flat_keys(loaded)}
        except (TypeError, ValueError) as e:
            raise SystemExit(f"--config {args.config}: {e}") from None
    model_options = {**preset.pop("model_options", {}), **(base.pop("model_options", {}) or {})}
    model_options.update(dict(args.model_option))
    # the model options the command line names, by their flat names (the table notebooks and sweeps use)
    for flat, key in MODEL_OPTIONS.items():
        if getattr(args, flat, None) is not None:
            model_options[key] = getattr(args, flat)
    data_options = {**preset.pop("data_options", {}), **(base.pop("data_options", {}) or {})}
    data_options.update(dict(args.data_option))
    defaults = flat_defaults()
    fields = {k: getattr(args, k) for k in defaults if hasattr(args, k)}
    fields["preset"] = getattr(args, "preset", None)
    # a config file sets fields the command line left at their defaults (the command line's own defaults count
    # as defaults: keep_freed_memory is on from the command line, off in the library)
    cli_defaults = {**defaults, **{kw["dest"]: kw["default"] for _, options in cli_options() for _, kw in options}}
    merged = {**defaults, **preset, **base}
    given = _given_fields(argv)
    merged.update({k: v for k, v in fields.items() if k in given or v != cli_defaults.get(k)
                   or (k not in preset and k not in base)})
    merged.update(model_options=model_options, data_options=data_options)
    return TrainConfig(**merged)


def _flat_keys(loaded: dict) -> set[str]:
    """The flat names a config file sets (flat, or the tree of config.json)."""
    parts = [k for k in PARTS if isinstance(loaded.get(k), dict)]
    keys = {k for k in loaded if k not in parts}
    for part in parts:
        names = {f.name: (f.metadata.get("flat") or f.name) for f in dataclasses.fields(PARTS[part])}
        keys |= {names.get(k, k) for k in loaded[part]}
    return keys


def run_predict(args: argparse.Namespace) -> int:
    """``predict``: print one line per face and the files that failed; 0 when every image gave a face."""
    from .predict import Predictor

    predictor = Predictor.load(args.model, device=args.device)
    name = args.model.name if args.model.is_dir() else args.model.parent.parent.name
    out = args.out or Path("outputs") / "predict" / name
    preds, errors = predictor.predict_files(args.images, out, detect=not args.no_detect, align=not args.no_align,
                                            all_faces=args.all_faces, grad_cam=not args.no_grad_cam,
                                            figures=not args.no_figures, progress=True)
    for p in preds:
        row = p.record()
        learners = ", ".join(f"{h.replace('_', ' ')} {row[h + '_class']} {100 * row[h + '_confidence']:.0f}%"
                             for h in p.probabilities if h != p.main_head)
        print(f"{p.image} face {p.face_index + 1}: {p.decision()} "
              f"({p.main_head} {100 * row[p.main_head + '_confidence']:.0f}%; {learners})")
    for path, err in errors.items():
        print(f"skipped: {err}", file=sys.stderr)
    print(f"results: {out / 'predictions.csv'}, {out / 'predictions.json'}"
          + ("" if args.no_figures else f", figures in {out / 'figures'}"))
    return 1 if errors else 0


def run_demo(output_dir: str, progress: bool = True) -> Path:
    """``make demo``: execute ``02_train_esr.ipynb`` with :data:`DEMO` and ``04_attention_explorer``
    on its run, with papermill, into ``output_dir`` (executed notebooks beside the run).

    A finished demo run is reused (delete it to train again); an interrupted one resumes.
    """
    from .batch import NOTEBOOKS_DIR, check_kernel, execute

    check_kernel()
    out = Path(output_dir).resolve()
    run = out / DEMO["run_name"]
    steps = [("02_train_esr", {**DEMO, "output_dir": str(out), "progress": False}),
             ("04_attention_explorer", {"run_dir": str(run)})]
    for name, params in steps:
        if name == "02_train_esr" and (run / "metrics.json").exists():
            logging.getLogger(__name__).warning("demo run %s already finished; delete it to train again", run)
            continue
        ok, error, seconds = execute(NOTEBOOKS_DIR / f"{name}.ipynb", out / f"{name}.ipynb", params,
                                     stream=progress)
        if not ok:
            raise RuntimeError(f"demo notebook {name} failed: {error or 'see the executed notebook'} "
                               f"({out / (name + '.ipynb')})")
    return run


#: parameters that name files or directories: a relative one given on the command line means
#: relative to the shell's directory, not to the notebook's (where papermill runs it)
PATH_PARAMETERS = ("data_root", "init_weights", "cache_dir", "run_dir")


def absolute_paths(params: dict) -> dict:
    """``params`` with relative :data:`PATH_PARAMETERS` made absolute against the current directory."""
    return {k: str(Path(v).resolve()) if k in PATH_PARAMETERS and isinstance(v, str) and v
            and not Path(v).is_absolute() else v for k, v in params.items()}


def run_batch_command(args) -> int:
    """``python -m fer_lab batch``: run a sweep and print where its summary is."""
    from .batch import load_sweep, run_batch

    sweep = load_sweep(args.sweep)
    sweep.fixed.update(absolute_paths(dict(args.set)))
    summary = run_batch(sweep, jobs=args.jobs, retry_failed=not args.no_retry, runs=args.runs,
                        devices=args.devices)
    import pandas as pd

    table = pd.read_csv(summary)
    print(table.drop(columns=[c for c in ("error",) if c in table]).to_string(index=False))
    failed = table[table["status"] == "failed"]
    for row in failed.itertuples():
        print(f"failed: {row.run}: {row.error}", file=sys.stderr)
    print(f"summary: {summary}")
    return 1 if len(failed) else 0


def _summary(path: Path) -> str:
    from .runs import read_json

    m = read_json(path / "metrics.json")
    test = m.get("test", {})
    parts = [f"run: {path}", f"selected: stage {m['selected']['stage'] + 1}, epoch {m['selected']['epoch'] + 1} "
             f"(val {m['selected']['head']} acc {m['selected']['val_score']:.4f})",
             f"train time: {m['train_time_s']:.0f} s, parameters: {m['num_parameters']:,}"]
    accs = {k[4:]: v for k, v in test.items() if k.startswith("acc_")}
    if accs:
        parts.append("test accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in accs.items()))
    ds = {k: v for k, v in test.items() if k.startswith("D_")}
    if ds:
        parts.append("test determinants: " + ", ".join(f"{k} {v:.4f}" for k, v in ds.items()))
    figs = sorted(p.name for p in (path / "figures").glob("*.png"))
    parts.append(f"figures ({path / 'figures'}): {', '.join(figs)}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        if args.command == "models":
            from .models import list_models, model_spec

            for name in list_models():
                print(f"{name:16s} {model_spec(name).description}")
            return 0
        if args.command == "presets":
            print(format_presets())
            return 0
        if args.command == "demo":
            path = run_demo(args.output_dir, progress=not args.no_progress)
            print(_summary(path))
            return 0
        if args.command == "data":
            return run_data_check(args)
        if args.command == "batch":
            return run_batch_command(args)
        if args.command == "predict":
            return run_predict(args)
        if args.command == "export":
            from .export import export_model

            info = export_model(args.model, args.out, formats=tuple(args.formats or ("onnx",)), which=args.which)
            print("\n".join(f"{fmt}: {f}" for fmt, f in info["files"].items()))
            print(f"outputs {info['outputs']}; heads {info['heads']}; learners {info['learners']}; "
                  f"input {info['input']['shape']}")
            return 0
        if args.command == "train":
            cfg = config_from_args(args, sys.argv[1:] if argv is None else argv)
            path = train(cfg, resume=args.resume)
            if os.environ.get("RANK", "0") == "0":     # torchrun: rank 0 speaks for the run
                print(_summary(path))
            return 0
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1
