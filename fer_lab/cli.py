"""Command line: ``python -m fer_lab <command>``. A thin layer over the package.

Commands: ``train`` (any model on any dataset, every option documented in ``--help``),
``demo`` (the CPU-sized diversified ESR on synthetic faces that ``make demo`` runs),
``models`` (the registered variants), ``presets`` (the published protocols), ``batch``
(papermill sweeps), ``data check`` (validate a dataset on disk).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .data.transforms import PRESETS as TRANSFORM_PRESETS
from .diversity import TERMS
from .presets import PRESETS, format_presets, preset_fields, preset_help
from .train import MODEL_OPTIONS, PROTOCOLS, TrainConfig, train

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


def _subset(text: str):
    if text.lower() in ("all", "none"):
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'all', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'all', got {text!r}")
    return n


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
    d = TrainConfig()
    g = t.add_argument_group("what to train")
    g.add_argument("--config", type=Path, help="YAML/JSON file of TrainConfig fields; command-line options "
                                                "override it")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="a published protocol: model, dataset, protocol and optimiser settings of the script it "
                        "names (" + preset_help() + "); the config file and explicit options override it")
    g.add_argument("--init-weights", metavar="PATH",
                   help="initialise the fresh model from this file or directory: the official ESR set "
                        "(directory with Net-Base-Shared_Representations.pt, Net-Branch_1..L.pt), MA-Net's "
                        "MS-Celeb-1M checkpoint, a torchvision ResNet-18 state dict (MA-Net's stem) or a fer_lab "
                        "checkpoint (best.pt); nothing is downloaded")
    g.add_argument("--init-partial", action="store_true",
                   help="with --init-weights: load the tensors that match and keep the rest as initialised "
                        "(otherwise any missing, unexpected or reshaped key is an error that lists them)")
    g.add_argument("--init-new-heads", action="store_true",
                   help="with --init-weights: keep the model's own classifier heads (e.g. 7 RAF-DB classes from "
                        "an 8-class AffectNet model)")
    g.add_argument("--init-channel-order", choices=("rgb", "bgr"), default=d.init_channel_order,
                   help="official ESR weights: convert the first conv from the official BGR input to RGB "
                        "(rgb, fer_lab's input everywhere) or keep BGR (then feed BGR images)")
    g.add_argument("--model", default=d.model, help="registered model name (see `python -m fer_lab models`)")
    g.add_argument("--dataset", default=d.dataset, help="dataset name (synthetic needs no files)")
    g.add_argument("--data-root", default=d.data_root, help="directory holding the dataset's files")
    g.add_argument("--data-option", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="extra dataset option, e.g. num_samples=2000 (repeatable; VALUE parsed as JSON)")
    g.add_argument("--label-space", default=d.label_space,
                   help="'auto' (the model's), 'none' (dataset order), 'affectnet8' or 'affectnet7'")
    g.add_argument("--branches", type=int, help="ESR branch count (default: the variant's, 9 or 15)")
    g.add_argument("--width", type=float, help="channel width multiplier (1.0 = paper; 0.25 runs on a CPU)")
    g.add_argument("--image-size", type=int, default=d.image_size, help="input side in px (default: model's)")
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
    g = t.add_argument_group("protocol")
    g.add_argument("--protocol", choices=PROTOCOLS, default=d.protocol,
                   help="esr_growth: one branch per stage from scratch (SPEC 3); esr_finetune: a trained "
                        "ensemble fine-tuned one branch per stage (needs --init-weights); single: one stage, "
                        "all parameters; auto: the model's")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs of the first (or only) stage")
    g.add_argument("--epochs-later", type=int, default=d.epochs_later, help="epochs of each later ESR stage")
    g.add_argument("--lr", type=float, default=d.lr, help="learning rate of the first stage (all parameters)")
    g.add_argument("--lr-new", type=float, default=d.lr_new, help="later stages: the new branch's lr")
    g.add_argument("--lr-old", type=float, default=d.lr_old, help="later stages: base and older branches' lr")
    g.add_argument("--lr-step", type=int, default=d.lr_step, help="StepLR step size (epochs)")
    g.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="StepLR factor")
    g.add_argument("--lr-step-at", choices=("end", "start"), default=d.lr_step_at,
                   help="step StepLR after each epoch (PyTorch's order) or before it (the public ESR scripts)")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default=d.optimizer,
                   help="sgd (the papers') or adam (fewer epochs, for CPU-sized studies)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="SGD weight decay")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="evaluation batch size")
    g.add_argument("--subset-per-class", type=_subset, default=d.subset_per_class,
                   help="class-balanced subset per stage: at most N items per class, or 'all'")
    g.add_argument("--branch-init", choices=("random", "copy"), default=d.branch_init,
                   help="initialise a new ESR branch randomly or as a copy of the last one")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of train held out for model selection when the dataset has no val split")
    g.add_argument("--train-transform", choices=TRANSFORM_PRESETS,
                   help="augmentation preset (default: the model's; light_batch augments whole batches)")
    g.add_argument("--imagenet-normalize", action="store_true", help="ImageNet mean/std normalisation")
    g.add_argument("--random-erasing", action="store_true", help="append RandomErasing to the train transform")
    g = t.add_argument_group("run")
    g.add_argument("--name", default=d.name, help="run name (default: <model>-<dataset>-s<seed>)")
    g.add_argument("--output-dir", default=d.output_dir, help="where run directories go")
    g.add_argument("--cache-dir", default=d.cache_dir, help="where decoded/rendered images are cached")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of every random choice")
    g.add_argument("--deterministic", action="store_true", help="PyTorch deterministic algorithms")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--workers", type=int, default=d.num_workers, help="DataLoader worker processes")
    g.add_argument("--no-channels-last", action="store_true",
                   help="keep NCHW memory format (channels-last is faster and numerically equivalent)")
    g.add_argument("--release-freed-memory", action="store_true",
                   help="leave glibc's allocator at its defaults (by default a CPU run keeps freed memory "
                        "for reuse: faster steps, more resident memory; bench/RESULTS.md)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default=d.amp,
                   help="autocast the training forward pass (the diversity term stays float32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training forward pass")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-figures", action="store_true", help="skip the figures at the end")
    g.add_argument("--resume", action="store_true", help="continue the run <output-dir>/<name> where it stopped")

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
    bt.add_argument("--jobs", type=int, default=1, help="runs executed at once")
    bt.add_argument("--set", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                    help="override or add a fixed parameter, e.g. data_root=/data/FERPlus (VALUE parsed as JSON)")
    bt.add_argument("--no-retry", action="store_true", help="skip failed runs too instead of retrying them")
    bt.add_argument("--runs", nargs="+", metavar="PATTERN",
                    help="execute only the runs whose names match these shell-style patterns (e.g. 'esr4_div*-s1')")

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


#: ``train`` options whose TrainConfig field has another name (or is the inverse flag).
_DEST_FIELD = {"workers": "num_workers", "no_channels_last": "channels_last",
               "release_freed_memory": "keep_freed_memory", "no_progress": "progress",
               "no_figures": "figures", "imagenet_normalize": "image_normalize"}


def _given_fields(argv) -> set[str]:
    """TrainConfig fields whose options appear in the ``train`` command line ``argv`` (even
    at their default value); empty when ``argv`` is unknown."""
    if argv is None:
        return set()
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["train"]._actions:
        action.default = argparse.SUPPRESS
    return {_DEST_FIELD.get(dest, dest) for dest in vars(parser.parse_args(list(argv)))}


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
        base = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(base, dict):
            raise SystemExit(f"--config {args.config}: expected a mapping of TrainConfig fields")
    model_options = {**preset.pop("model_options", {}), **(base.pop("model_options", {}) or {})}
    model_options.update(dict(args.model_option))
    # the model options the command line names, by their flat names (the table notebooks and sweeps use)
    for flat, key in MODEL_OPTIONS.items():
        if getattr(args, flat, None) is not None:
            model_options[key] = getattr(args, flat)
    data_options = {**preset.pop("data_options", {}), **(base.pop("data_options", {}) or {})}
    data_options.update(dict(args.data_option))
    fields = dict(
        model=args.model, dataset=args.dataset, data_root=args.data_root,
        label_space=None if str(args.label_space).lower() == "none" else args.label_space,
        image_size=args.image_size, protocol=args.protocol, epochs=args.epochs, epochs_later=args.epochs_later,
        lr=args.lr, lr_new=args.lr_new, lr_old=args.lr_old, lr_step=args.lr_step, lr_gamma=args.lr_gamma,
        lr_step_at=args.lr_step_at,
        optimizer=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay, batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size, subset_per_class=args.subset_per_class,
        branch_init=args.branch_init, val_fraction=args.val_fraction, train_transform=args.train_transform,
        image_normalize="imagenet" if args.imagenet_normalize else None, random_erasing=args.random_erasing,
        name=args.name, output_dir=args.output_dir, cache_dir=args.cache_dir, seed=args.seed,
        deterministic=args.deterministic, device=args.device, num_workers=args.workers,
        channels_last=not args.no_channels_last, keep_freed_memory=not args.release_freed_memory,
        progress=not args.no_progress, figures=not args.no_figures,
        init_weights=args.init_weights, init_partial=args.init_partial, init_new_heads=args.init_new_heads,
        init_channel_order=args.init_channel_order, amp=args.amp, compile=args.compile,
        preset=getattr(args, "preset", None))
    # a config file sets fields the command line left at their defaults
    defaults = TrainConfig().to_dict()
    merged = {**defaults, **preset, **base}
    given = _given_fields(argv)
    merged.update({k: v for k, v in fields.items() if k in given or v != defaults.get(k)})
    merged.update(model_options=model_options, data_options=data_options)
    return TrainConfig.from_dict(merged)


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
    summary = run_batch(sweep, jobs=args.jobs, retry_failed=not args.no_retry, runs=args.runs)
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
        if args.command == "train":
            cfg = config_from_args(args, sys.argv[1:] if argv is None else argv)
            path = train(cfg, resume=args.resume)
            print(_summary(path))
            return 0
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1
