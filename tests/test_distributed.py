"""Data-parallel training (fer_lab.distributed) on CPU with gloo: two ranks give one process's
gradients, metrics and similarity matrices (same global batch); a killed rank fails the run with
a message and --resume continues it; batches place runs on devices."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fer_lab.distributed import RankSlices

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- one step, in-process: gradients of 2 ranks == gradients of 1 process ------------------------
def _model(name, gamma):
    from fer_lab.models.registry import build_model

    torch.manual_seed(0)
    m = build_model(name, num_branches=3, width=0.25, input_size=48, gamma=gamma)
    return m.train()


def _batch(n):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 48, 48, generator=g), torch.randint(0, 8, (n,), generator=g)


def _rank_step(rank, world, port, similarity, sizes, queue):
    import torch.distributed as dist

    from fer_lab.distributed import Dist, convert_batchnorm

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = convert_batchnorm(_model("esr9_div", "median")).double()
    x, y = _batch(sum(sizes))
    x = x.double()
    start = sum(sizes[:rank])
    xs, ys = x[start:start + sizes[rank]], y[start:start + sizes[rank]]
    d = Dist(rank, world, similarity=similarity)
    with d.training_batch():
        lo = model.loss(model(xs), ys)
    n_global, offset = d.share(xs.shape[0])
    assert (n_global, offset) == (sum(sizes), start)
    d.rescale(lo, xs.shape[0], n_global).total.backward()
    d.average_gradients(model.parameters())
    if rank == 0:
        queue.put([p.grad.numpy().copy() for p in model.parameters()])
    dist.destroy_process_group()


def _two_rank_grads(similarity, sizes):
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_step, args=(r, 2, port, similarity, sizes, queue)) for r in range(2)]
    for p in procs:
        p.start()
    grads = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    return [torch.from_numpy(g) for g in grads]


def _one_process_grads(n):
    model = _model("esr9_div", "median").double()
    x, y = _batch(n)
    model.loss(model(x.double()), y).total.backward()
    return [p.grad for p in model.parameters()]


def _rel(a, b):
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b))
    return (num / sum(float(x.pow(2).sum()) for x in a)) ** 0.5


def test_two_ranks_give_one_process_gradients():
    """ESR*-3 with the calibrated (median) bandwidth, whose diversity gradient is not zero at
    initialisation: global BatchNorm + the gathered similarity matrix + weighted CE give the
    single process's gradient of the whole batch, also for unequal shares (13 = 7 + 6).

    In float64: in float32 the network itself is ill-conditioned at some batches (ReLU/max-pool
    ties flip with the last bit: one process's float32 gradient at batch 16 is 1e-3 away from
    its float64 one), which would hide a real error of that size."""
    ref = _one_process_grads(16)
    assert _rel(ref, _two_rank_grads("global", [8, 8])) < 1e-7
    # per-rank similarity matrices are a different objective: the check can fail
    assert _rel(ref, _two_rank_grads("per_rank", [8, 8])) > 1e-3
    assert _rel(_one_process_grads(13), _two_rank_grads("global", [7, 6])) < 1e-7


def test_rank_slices_partition_every_batch():
    batches = [list(range(i, i + 7)) for i in range(0, 21, 7)] + [[21, 22]]
    shares = [list(RankSlices(batches, r, 3)) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]           # the tail of 2 items cannot feed 3 ranks
    for b, parts in zip(batches[:3], zip(*shares)):
        assert sum(parts, []) == b and [len(p) for p in parts] == [3, 2, 2]
    assert [sum(p, []) for p in zip(*[RankSlices(batches, r, 2) for r in range(2)])] == batches


# ---- torchrun end to end --------------------------------------------------------------------------
ARGS = ["--model", "esr9_div", "--branches", "3", "--width", "0.25", "--image-size", "48", "--dataset", "synthetic",
        "--data-option", "num_samples=96", "--epochs", "2", "--epochs-later", "1", "--batch-size", "24",
        "--gamma", "median", "--amp", "none", "--no-channels-last", "--optimizer", "sgd", "--lr", "0.01",
        "--train-transform", "light_batch", "--no-progress", "--no-figures", "--workers", "0", "--seed", "3"]


def _train(out, name, ranks, *extra, check=True):
    cmd = [PY, "-m", "fer_lab", "train", *ARGS, "--output-dir", str(out), "--name", name, *extra]
    if ranks > 1:
        cmd[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                    str(free_port()), "-m"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _history(run):
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    # all three branches from the first step (protocol single), so the first batch has both terms;
    # learning rate 0: every batch sees the same model, so every epoch mean (losses, accuracies,
    # D, kernel arguments, S, BatchNorm's running statistics behind validation) must agree to
    # round-off (with steps, float32 round-off grows through ReLU/max-pool ties); the step itself
    # is test_two_ranks_give_one_process_gradients
    one = _train(tmp_path, "one", 1, "--protocol", "single", "--lr", "0")
    two = _train(tmp_path, "two", 2, "--protocol", "single", "--lr", "0")
    assert two.stdout.count("run: ") == 1                  # rank 0 alone reports
    h1, h2 = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert [(r["stage"], r["epoch"]) for r in h1] == [(r["stage"], r["epoch"]) for r in h2] == [("0", "0"), ("0", "1")]
    # before the first step (same model, same global batch): gradient norms to float round-off
    for key in ("train_gradnorm_ce", "train_gradnorm_D_sp", "train_gradnorm_total"):
        a, b = float(h1[0][key]), float(h2[0][key])
        assert abs(a - b) <= 1e-4 * abs(a) + 1e-7, key
    keys = [k for k in h1[0] if k.startswith(("train_", "val_")) and "gradnorm" not in k and "gradshare" not in k]
    assert {"train_loss", "train_acc_vote", "val_loss", "train_D_sp", "train_D_ch", "train_karg_sp_q50"} <= set(keys)
    for row1, row2 in zip(h1, h2):
        for key in keys:
            a, b = float(row1[key]), float(row2[key])
            assert abs(a - b) <= 2e-5 * max(abs(a), 1.0), (key, a, b)
    s1, s2 = np.load(tmp_path / "one" / "similarity.npz"), np.load(tmp_path / "two" / "similarity.npz")
    for key in ("train_S_sp", "train_S_ch", "val_S_sp"):
        np.testing.assert_allclose(s2[key], s1[key], atol=2e-5)
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["train"]["runtime"]["distributed_similarity"] == "global"
    assert (tmp_path / "two" / "checkpoints" / "best.pt").is_file()
    assert not list((tmp_path / "two").rglob("*.tmp*"))    # atomic writes leave nothing behind
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["test"]


def _rank_pids(rank: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            environ = (d / "environ").read_bytes().split(b"\0")
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"fer_lab" in cmdline and b"train" in cmdline:
            pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_killed_rank_fails_with_a_message_and_resume_continues(tmp_path):
    run = tmp_path / "r"
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
           "fer_lab", "train", *ARGS, "--epochs", "4", "--output-dir", str(tmp_path), "--name", "r"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.2)
    for pid in _rank_pids(1):
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "another rank failed or was killed" in err and "--resume" in err and str(run) in err
    done = len(_history(run))
    assert 1 <= done < 5
    resumed = _train(tmp_path, "r", 2, "--epochs", "4", "--resume")
    assert resumed.stdout.count("run: ") == 1
    h = _history(run)
    assert [(r["stage"], r["epoch"]) for r in h] == [("0", str(e)) for e in range(4)] + [("1", "0"), ("2", "0")]
    assert (run / "metrics.json").is_file()


# ---- batches on devices ---------------------------------------------------------------------------
def test_batch_places_one_run_per_device(tmp_path):
    import nbformat
    import yaml

    from fer_lab.batch import parse_devices, run_batch

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "fer_lab", "display_name": "Python (fer_lab)", "language": "python"}
    params = nbformat.v4.new_code_cell("output_dir = None\nrun_name = None\nprogress = False\nseed = 0")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import os, pathlib, time\n"
        "d = pathlib.Path(output_dir) / run_name\n"
        "(d / 'device.txt').write_text(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))\n"
        "(d / 'window.txt').write_text(f'{time.time()} ' + (time.sleep(2) or f'{time.time()}'))")]
    nbformat.write(nb, tmp_path / "where.ipynb")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "dev", "notebook": str(tmp_path / "where.ipynb"),
                                     "output_dir": str(tmp_path), "grid": {"seed": [0, 1, 2, 3]}}))
    with pytest.raises(ValueError, match="list a device twice"):
        run_batch(sweep, jobs=3, devices="0,1")
    with pytest.raises(ValueError, match="GPU indices or 'cpu'"):
        parse_devices("0,gpu1")
    run_batch(sweep, devices="0,cpu")
    runs = sorted((tmp_path / "dev").glob("seed*"))
    assert len(runs) == 4
    seen = [(r / "device.txt").read_text() for r in runs]
    assert sorted(set(seen)) == ["''", "'0'"] and seen.count("'0'") == 2     # each run saw its device only
    status = [json.loads((r / "batch_status.json").read_text()) for r in runs]
    assert sorted(s["device"] for s in status) == ["0", "0", "cpu", "cpu"]
    windows = sorted(tuple(map(float, (r / "window.txt").read_text().split())) for r in runs)
    assert any(b[0] < a[1] for a, b in zip(windows, windows[1:]))           # two ran at once
