"""The training engine: protocol, run directory, resume equivalence, errors, CLI."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
from pathlib import Path

import pytest
import torch

from fer_lab import runs
from fer_lab.cli import main as cli_main
from fer_lab.train import Callback, TrainConfig, confusion_matrix, holdout_split, plan_stages, train

RUN_FILES = ["config.json", "env.json", "dataset.json", "history.csv", "similarity.npz", "metrics.json",
             "checkpoints/last.pt", "checkpoints/best.pt"]


class Interrupt(Callback):
    """Raise KeyboardInterrupt after global epoch ``after`` (or at a batch inside the next one)."""

    def __init__(self, after: int, mid_epoch: bool = False):
        self.after, self.mid_epoch, self.seen = after, mid_epoch, 0

    def on_epoch_end(self, event):
        if not self.mid_epoch and event["record"]["global_epoch"] == self.after:
            raise KeyboardInterrupt
        self.seen = event["record"]["global_epoch"] + 1

    def on_batch_end(self, event):
        if self.mid_epoch and self.seen == self.after + 1 and event["batch"] == 1:
            raise KeyboardInterrupt


def _numbers(run_path):
    h = pd.read_csv(run_path / "history.csv").drop(columns=["time_s"])
    m = runs.read_json(run_path / "metrics.json")
    m.pop("train_time_s")
    return h, m


def test_plan_stages():
    cfg = TrainConfig(model="esr9_div", epochs=50, epochs_later=20, lr=0.1, lr_new=0.1, lr_old=0.01)
    stages = plan_stages(cfg)
    assert len(stages) == 9 and [s.branches for s in stages] == list(range(1, 10))
    assert stages[0].epochs == 50 and all(s.epochs == 20 for s in stages[1:])
    assert stages[0].lrs == {"all": 0.1}
    assert stages[3].lrs == {"base+old branches": 0.01, "new branch": 0.1}
    assert len(plan_stages(cfg, "single")) == 1
    ft = TrainConfig(model="esr9_div", protocol="esr_finetune", init_weights="x.pt", epochs=100, epochs_later=60,
                     lr=0.1, lr_new=0.1, lr_old=0.02)
    stages = plan_stages(ft)
    assert [s.branches for s in stages] == list(range(1, 10)) and [s.epochs for s in stages] == [100] + [60] * 8
    assert stages[0].lrs == {"base+branch 1": 0.1, "other branches": 0.02}
    assert stages[5].lrs == {"base+other branches": 0.02, "new branch": 0.1}
    with pytest.raises(ValueError, match="init_weights"):
        plan_stages(TrainConfig(model="esr9_div", protocol="esr_finetune"))
    with pytest.raises(ValueError, match="ESR model"):
        plan_stages(TrainConfig(model="manet", protocol="esr_growth"))


def test_run_directory_and_protocol(tiny_cfg):
    path = train(tiny_cfg(figures=True))
    for f in RUN_FILES:
        assert (path / f).is_file(), f
    h = pd.read_csv(path / "history.csv")
    # growth: 2 epochs with 1 branch, then 1 epoch each with 2 and 3 branches
    assert h["num_branches"].tolist() == [1, 1, 2, 3] and h["stage"].tolist() == [0, 0, 1, 2]
    # later-stage rates follow lr (0.05): the new branch at lr, the rest at lr / 10
    assert h.loc[2, "lr_new_branch"] == 0.05 and h.loc[2, "lr_base_old_branches"] == pytest.approx(0.005)
    for col in ("train_acc_ensemble", "val_acc_ensemble", "train_acc_branch_3", "val_D_sp", "train_D_ch",
                "train_gradnorm_D_sp", "train_gradnorm_ce", "val_ce"):
        assert col in h, col
    assert h["train_D_sp"].isna().tolist() == [True, True, False, False]    # one branch: no term
    sim = np.load(path / "similarity.npz")
    assert sim["train_S_sp"].shape == (4, 3, 3) and np.isnan(sim["train_S_sp"][2, 2]).all()
    S = sim["val_S_sp"][3]
    assert np.allclose(np.diag(S), 1) and np.allclose(S, S.T)
    m = runs.read_json(path / "metrics.json")
    assert m["selected"]["stage"] == 2 and m["num_parameters"] > 0
    cm = np.array(m["test"]["confusion"])
    assert cm.shape == (8, 8) and cm.sum() == 48
    assert cm.trace() / 48 == pytest.approx(m["test"]["acc_ensemble"])
    ds = runs.read_json(path / "dataset.json")
    assert ds["splits"]["train"]["size"] == 48 and len(ds["splits"]["train"]["fingerprint"]) == 64
    env = runs.read_json(path / "env.json")
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    best = torch.load(path / "checkpoints" / "best.pt", weights_only=True)
    assert best["model_config"]["num_branches"] == 3 and best["stage"] == 2
    model = runs.load_run(path).load_model()
    assert not model.training and model.num_branches == 3
    for name in ("accuracy_curves", "determinant_trends", "similarity_sp", "similarity_ch", "confusion_matrix",
                 "attention_maps"):
        for ext in ("pdf", "svg", "png"):
            assert (path / "figures" / f"{name}.{ext}").stat().st_size > 0
    with pytest.raises(runs.RunExistsError, match="already exists"):
        train(tiny_cfg())                                  # never overwritten


@pytest.mark.parametrize("after,mid", [(1, False), (2, False), (2, True)], ids=["stage-boundary", "mid-stage",
                                                                                   "mid-epoch"])
def test_resume_equals_uninterrupted(tiny_cfg, after, mid):
    ref = train(tiny_cfg(name="ref"))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(name="cut"), callbacks=[Interrupt(after, mid)])
    assert not (ref.parent / "cut" / "metrics.json").exists()
    resumed = train(tiny_cfg(name="cut"), resume=True)
    h_ref, m_ref = _numbers(ref)
    h_cut, m_cut = _numbers(resumed)
    pd.testing.assert_frame_equal(h_ref, h_cut)
    assert m_ref == m_cut


def test_resume_checks_config(tiny_cfg):
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(), callbacks=[Interrupt(0)])
    with pytest.raises(ValueError, match="lr"):
        train(tiny_cfg(lr=0.2), resume=True)
    with pytest.raises(FileNotFoundError, match="no run"):
        train(tiny_cfg(name="nothing-here"), resume=True)
    # where a run lives is not what it trains: a moved run (or batch) resumes from its new place
    old = Path(tiny_cfg().runtime.output_dir)
    moved = old.parent / "moved"
    old.rename(moved)
    done = train(tiny_cfg(output_dir=str(moved), cache_dir=str(moved.parent / "cache2")), resume=True)
    assert done == moved / "tiny" and (done / "metrics.json").is_file()


def test_single_protocol_and_no_diversity(tiny_cfg):
    path = train(tiny_cfg(model="esr9", protocol="single", epochs=1, name="single", deterministic=True))
    assert not torch.are_deterministic_algorithms_enabled()       # restored after the call
    h = pd.read_csv(path / "history.csv")
    assert h["num_branches"].tolist() == [3]
    assert "train_D_sp" in h and "train_gradnorm_D_sp" not in h     # monitored, not optimised
    assert h["train_loss"].iloc[0] == pytest.approx(h["train_ce"].iloc[0])


def test_bad_configuration_messages(tiny_cfg):
    with pytest.raises(ValueError, match="epochs=0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="protocol"):
        TrainConfig(protocol="grow")
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="num_classes"):
        train(tiny_cfg(model_options=dict(num_branches=2, width=0.25, num_classes=7), name="k7"))


def test_holdout_and_confusion():
    t = np.repeat(np.arange(4), 10)
    keep, held = holdout_split(t, 0.2, 0)
    assert len(set(keep) & set(held)) == 0 and len(keep) + len(held) == 40
    assert np.bincount(t[held]).tolist() == [2, 2, 2, 2]
    small = np.array([0, 0, 0, 1, 1, 2])                 # 10 % rounds to 0: still one per class that has two
    assert np.bincount(small[holdout_split(small, 0.1, 0)[1]], minlength=3).tolist() == [1, 1, 0]
    cm = confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 2, 1, 2]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_cli_train_and_errors(tmp_path, capsys):
    args = ["train", "--model", "esr9_div", "--branches", "2", "--width", "0.25", "--image-size", "64",
            "--data-option", "num_samples=32", "--epochs", "1", "--epochs-later", "1", "--batch-size", "16",
            "--subset-per-class", "4", "--output-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "c"),
            "--no-progress", "--no-figures", "--name", "cli", "--gamma", "2", "--diagonal", "reference"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    cfg = json.loads((tmp_path / "runs" / "cli" / "config.json").read_text())
    assert cfg["model"]["diversity"]["gamma"] == 2.0 and cfg["model"]["diversity"]["diagonal"] == "reference"
    assert cli_main(args) == 2                                 # exists: clear error, not a traceback
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["train", "--model", "esr7", "--output-dir", str(tmp_path)]) == 2
    assert "known models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["train", "--diversity-terms", "space"])
    assert "unknown diversity term" in capsys.readouterr().err


def test_cli_help_explains_options():
    out = subprocess.run([sys.executable, "-m", "fer_lab", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for opt in ("--model", "--dataset", "--data-root", "--gamma", "--diagonal", "--epochs-later", "--resume",
                "--subset-per-class", "--deterministic", "--seed"):
        assert opt in out


def test_amp_and_compile_paths_train(tiny_cfg):
    """bf16 autocast and torch.compile (the cheap ``eager`` backend: dynamo tracing, no codegen)
    run the same protocol; the first epoch's loss stays close to float32's."""
    one = dict(epochs=1, protocol="single", model_options=dict(num_branches=2, width=0.25, gamma=1.0))
    ref = pd.read_csv(train(tiny_cfg(name="fp32", **one)) / "history.csv")
    bf16 = pd.read_csv(train(tiny_cfg(name="bf16", amp="bf16", **one)) / "history.csv")
    comp = pd.read_csv(train(tiny_cfg(name="comp", compile=True, compile_backend="eager", **one)) / "history.csv")
    assert len(bf16) == len(comp) == len(ref) == 1
    assert abs(bf16["train_loss"][0] - ref["train_loss"][0]) < 0.05
    assert abs(comp["train_loss"][0] - ref["train_loss"][0]) < 1e-4
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_keep_freed_memory_stops_one_mmap_per_large_block():
    """After keep_freed_memory() a 64 MiB tensor comes from the heap, not from its own mmap
    (glibc's mallinfo2 counts the bytes in mmapped blocks). Run in a fresh interpreter: the
    setting is process-wide."""
    code = textwrap.dedent("""
        import ctypes, json, torch
        from fer_lab.utils import keep_freed_memory
        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                      "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info
        def mmapped_by_64_mib():
            before = libc.mallinfo2().hblkhd
            t = torch.ones(64 * 2 ** 20, dtype=torch.uint8)
            return libc.mallinfo2().hblkhd - before
        print(json.dumps([mmapped_by_64_mib(), keep_freed_memory(), mmapped_by_64_mib()]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0 and "mallinfo2" in proc.stderr:
        pytest.skip("C library without mallinfo2 (not glibc >= 2.33)")
    assert proc.returncode == 0, proc.stderr
    default, applied, kept = json.loads(proc.stdout.strip().splitlines()[-1])
    assert applied is True
    assert default >= 64 * 2 ** 20 and kept == 0


def test_cli_release_freed_memory_flag():
    """``--release-freed-memory`` turns the allocator setting off; it is not part of a run's
    identity (a run resumes whichever way it is set)."""
    from fer_lab.cli import build_parser, config_from_args
    from fer_lab.train import _VOLATILE

    for argv, expected in ((["train"], True), (["train", "--release-freed-memory"], False)):
        assert config_from_args(build_parser().parse_args(argv), argv).runtime.keep_freed_memory is expected
    assert "keep_freed_memory" in _VOLATILE
    assert TrainConfig().runtime.keep_freed_memory is False          # the library leaves process-wide state alone
    from fer_lab.cli import DEMO
    assert DEMO["train_options"]["keep_freed_memory"] is True


def test_atomic_writes_are_readable_by_others(tmp_path):
    """Results written atomically get the usual 0644, not mkstemp's owner-only 0600."""
    import stat

    path = runs.write_json(tmp_path / "r.json", {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert json.loads(path.read_text()) == {"a": 1}


def test_batches_builds_each_batch_on_one_thread():
    from torch.utils.data import DataLoader, Dataset

    from fer_lab.utils import batches

    class Probe(Dataset):
        def __init__(self, fail_at=None):
            self.seen, self.fail_at = [], fail_at

        def __len__(self):
            return 10

        def __getitem__(self, i):
            if i == self.fail_at:
                raise IOError(f"item {i} unreadable")
            self.seen.append(torch.get_num_threads())
            return torch.tensor([float(i)]), i

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ds = Probe()
        got = []
        for x, y in batches(DataLoader(ds, batch_size=4)):
            got += y.tolist()
            assert torch.get_num_threads() == 2          # the model's step sees the training threads
        assert got == list(range(10)) and ds.seen == [1] * 10
        with pytest.raises(IOError, match="item 5"):
            list(batches(DataLoader(Probe(fail_at=5), batch_size=4)))
        assert torch.get_num_threads() == 2              # restored when loading fails
    finally:
        torch.set_num_threads(before)


def test_batch_augmentation_trains_and_resumes(tiny_cfg):
    kw = dict(model="esr9", protocol="single", epochs=2, train_transform="light_batch")
    ref = train(tiny_cfg(name="batch-ref", **kw))
    plain = train(tiny_cfg(name="batch-eval", **{**kw, "train_transform": "eval"}))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(name="batch-cut", **kw), callbacks=[Interrupt(0)])
    resumed = train(tiny_cfg(name="batch-cut", **kw), resume=True)
    h_ref, m_ref = _numbers(ref)
    pd.testing.assert_frame_equal(h_ref, _numbers(resumed)[0])     # seeded per epoch: resume = uninterrupted
    assert m_ref == _numbers(resumed)[1]
    assert h_ref["train_loss"].iloc[0] != pytest.approx(_numbers(plain)[0]["train_loss"].iloc[0])  # it augments
    assert runs.read_json(ref / "config.json")["train"]["data"]["train_transform"] == "light_batch"


@pytest.mark.parametrize("outside", [False, True])
def test_flush_denormal_restores_the_previous_setting(outside):
    from fer_lab.utils import flush_denormal, flushing_denormals

    tiny = torch.tensor(2.0 ** -130)                # a float32 denormal: 2^-130 > 2^-149
    if not torch.set_flush_denormal(outside):
        pytest.skip("this CPU cannot flush denormals")
    try:
        assert flushing_denormals() is outside
        assert (float(tiny * 1.0) == 0.0) is outside          # the independent check of the setting
        with flush_denormal():
            assert flushing_denormals() and float(tiny * 1.0) == 0.0
        assert flushing_denormals() is outside and (float(tiny * 1.0) == 0.0) is outside
    finally:
        torch.set_flush_denormal(False)


def test_cli_model_options_use_the_flat_name_table():
    """The command line's model options land under the constructor keys of the one alias table
    (fer_lab.config.MODEL_OPTIONS) that notebooks and sweeps use too."""
    from fer_lab.cli import build_parser, config_from_args
    from fer_lab.config import MODEL_OPTIONS
    from fer_lab.train import config_from_flat

    argv = ["train", "--normalize", "l2", "--gamma", "median", "--branches", "2", "--cbam-position", "before_pool",
            "--width", "0.5", "--diversity-weight", "0.5"]
    cfg = config_from_args(build_parser().parse_args(argv), argv)
    expected = {"diversity_normalize": "l2", "gamma": "median", "num_branches": 2, "cbam_position": "before_pool",
                "width": 0.5, "diversity_weight": 0.5}
    assert cfg.model_options == expected
    flat = dict(normalize="l2", gamma="median", branches=2, cbam_position="before_pool", width=0.5,
                diversity_weight=0.5)
    assert config_from_flat(**flat).model_options == expected
    assert all(MODEL_OPTIONS[k] in expected for k in flat)
