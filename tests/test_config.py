"""The config tree: parts, flat names, the files it reads and writes, the generated command line.

Expectations are written out here independently of fer_lab.config: the flat field names a
run's config had before the tree (every run directory written before December 2026 holds
them), and which part each belongs to.
"""
import argparse
import dataclasses
import json

import pytest

from fer_lab.cli import build_parser, config_from_args
from fer_lab.config import (FLAT_NAMES, MODEL_OPTIONS, DataConfig, OptimConfig, ProtocolConfig, RuntimeConfig,
                            TrainConfig, config_from_flat)

#: part -> the flat names it holds (the fields of the flat TrainConfig before the tree)
EXPECTED_PARTS = {
    "data": {"dataset", "data_root", "data_options", "label_space", "image_size", "train_transform",
             "image_normalize", "random_erasing", "val_fraction"},
    "init": {"init_weights", "init_partial", "init_new_heads", "init_channel_order"},
    "protocol": {"protocol", "epochs", "epochs_later", "lr_new", "lr_old", "subset_per_class", "branch_init"},
    "optim": {"optimizer", "lr", "momentum", "weight_decay", "batch_size", "lr_step", "lr_gamma", "lr_step_at"},
    "runtime": {"output_dir", "cache_dir", "seed", "deterministic", "device", "num_workers", "eval_batch_size",
                "channels_last", "amp", "compile", "cbam_path", "distributed_similarity", "compile_backend",
                "keep_freed_memory", "progress",
                "figures"},
}
TOP = {"model", "model_options", "preset", "name"}


def test_every_flat_name_has_one_place():
    assert {k: part for k, (part, _) in FLAT_NAMES.items()} == \
        {k: part for part, names in EXPECTED_PARTS.items() for k in names}
    assert not set(MODEL_OPTIONS) & set(FLAT_NAMES) and not TOP & set(FLAT_NAMES)


def test_flat_and_tree_round_trips():
    flat = dict(model="esr9", model_options={"num_branches": 2}, epochs=3, lr=0.01, lr_old=0.001, data_root="/d",
                data_options={"label_mode": "majority"}, init_weights="w.pt", seed=4, amp="bf16", name="x")
    cfg = TrainConfig(**flat)
    assert (cfg.protocol.epochs, cfg.optim.lr, cfg.protocol.lr_old, cfg.data.root, cfg.init.weights, cfg.runtime.seed,
            cfg.runtime.amp) == (3, 0.01, 0.001, "/d", "w.pt", 4, "bf16")
    assert {k: cfg.flat()[k] for k in flat} == flat
    assert set(cfg.flat()) == TOP | set(FLAT_NAMES)
    tree = json.loads(json.dumps(cfg.to_dict()))             # what config.json holds
    assert set(tree) == TOP | set(EXPECTED_PARTS)
    assert tree["optim"]["lr"] == 0.01 and tree["data"]["root"] == "/d" and tree["protocol"]["name"] == "auto"
    assert TrainConfig.from_dict(tree) == cfg
    assert TrainConfig.from_dict(cfg.flat()) == cfg          # flat dicts (runs before the tree, config files)
    assert cfg.replace(lr=0.5).optim.lr == 0.5 and cfg.optim.lr == 0.01
    # parts and flat names together; a part's own default stays next to it
    both = TrainConfig(optim=OptimConfig(lr=0.3, optimizer="adam"), lr_step=2, protocol="single")
    assert (both.optim.lr, both.optim.optimizer, both.optim.lr_step, both.protocol.name) == (0.3, "adam", 2, "single")
    assert TrainConfig(protocol=ProtocolConfig(epochs=2)).protocol.epochs == 2
    assert DataConfig().dataset == "synthetic" and RuntimeConfig().keep_freed_memory is False


def test_old_flat_run_config_loads():
    """A run's config.json from before the tree (flat, with the old ``normalize`` name)."""
    old = {f: v for f, v in TrainConfig().flat().items()}
    old.pop("image_normalize")
    old.update(normalize="imagenet", epochs=7, lr=0.002)
    cfg = TrainConfig.from_dict(old)
    assert (cfg.data.image_normalize, cfg.protocol.epochs, cfg.optim.lr) == ("imagenet", 7, 0.002)


def test_bad_values_and_keys_name_the_flat_option():
    with pytest.raises(ValueError, match=r"epochs=0: expected an int >= 1(.|\n)*lr_gamma=2: expected a factor"):
        TrainConfig(epochs=0, lr_gamma=2)
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['epoch'\]"):
        TrainConfig(epoch=3)
    with pytest.raises(ValueError, match=r"unknown optim option\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"model": "esr9", "optim": {"learning_rate": 1}})
    with pytest.raises(ValueError, match="subset_per_class=0: expected an int >= 1 or None"):
        TrainConfig(subset_per_class=0)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['bogus'\]"):
        config_from_flat(bogus=1)


def test_command_line_is_generated_from_the_fields():
    """Every flat name but data_options (given as --data-option KEY=VALUE) is a train option,
    with the field's default and choices; flags set the fields they name."""
    parser = build_parser()
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    dests = {a.dest: a for a in train._actions}
    assert set(FLAT_NAMES) - {"data_options"} <= set(dests)
    for f in dataclasses.fields(OptimConfig):
        assert dests[f.name].default == f.default and dests[f.name].help == f.metadata["help"]
    assert dests["protocol"].choices == ("auto", "single", "esr_growth", "esr_finetune")
    argv = ["train", "--epochs", "4", "--lr", "0.02", "--subset-per-class", "all", "--workers", "1", "--no-progress",
            "--imagenet-normalize", "--label-space", "none", "--amp", "bf16", "--init-weights", "w.pt",
            "--data-root", "/d", "--compile-backend", "eager"]
    cfg = config_from_args(parser.parse_args(argv), argv)
    assert (cfg.protocol.epochs, cfg.optim.lr, cfg.protocol.subset_per_class, cfg.runtime.num_workers,
            cfg.runtime.progress, cfg.data.image_normalize, cfg.data.label_space, cfg.runtime.amp, cfg.init.weights,
            cfg.data.root, cfg.runtime.compile_backend) == \
        (4, 0.02, None, 1, False, "imagenet", None, "bf16", "w.pt", "/d", "eager")
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--subset-per-class", "-3"])


def test_config_file_flat_or_tree_under_the_command_line(tmp_path):
    """--config reads flat names or config.json's tree; the command line wins; the preset is below both."""
    tree = TrainConfig(epochs=9, lr=0.3, batch_size=8).to_dict()
    f = tmp_path / "c.json"
    f.write_text(json.dumps(tree))
    argv = ["train", "--config", str(f), "--lr", "0.1"]       # 0.1 is the default: given, so it wins
    cfg = config_from_args(build_parser().parse_args(argv), argv)
    assert (cfg.protocol.epochs, cfg.optim.lr, cfg.optim.batch_size) == (9, 0.1, 8)
    flat = tmp_path / "c.yaml"
    flat.write_text("epochs: 5\nmodel: esr9\n")
    argv = ["train", "--preset", "ferplus_cpu", "--config", str(flat)]
    cfg = config_from_args(build_parser().parse_args(argv), argv)
    assert (cfg.protocol.epochs, cfg.model, cfg.optim.batch_size, cfg.runtime.amp) == (5, "esr9", 128, "bf16")
    flat.write_text("epoch: 5\n")
    with pytest.raises(SystemExit, match="epoch"):
        config_from_args(build_parser().parse_args(["train", "--config", str(flat)]), ["train", "--config", str(flat)])


def test_later_stage_rates_follow_lr_unless_given():
    """--optimizer adam --lr 1e-3 must not leave the later stages at SGD's 0.1 / 0.01: lr_new
    defaults to lr and lr_old to lr / 10 (the papers' 0.1 and 0.01 at lr 0.1)."""
    from fer_lab.train import plan_stages

    argv = ["train", "--model", "esr9_div", "--branches", "3", "--optimizer", "adam", "--lr", "1e-3"]
    cfg = config_from_args(build_parser().parse_args(argv), argv)
    stages = plan_stages(cfg)
    assert stages[0].lrs == {"all": 1e-3}
    assert stages[1].lrs == stages[2].lrs == {"base+old branches": 1e-4, "new branch": 1e-3}
    paper = plan_stages(TrainConfig(model="esr9_div"))
    assert paper[1].lrs == {"base+old branches": 0.01, "new branch": 0.1}
    given = TrainConfig(model="esr9_div", lr=1e-3, lr_new=5e-4, lr_old=2e-5).resolved()
    assert (given.protocol.lr_new, given.protocol.lr_old) == (5e-4, 2e-5)
    assert TrainConfig(lr=0.2).resolved().flat()["lr_old"] == pytest.approx(0.02)
