"""Every notebook runs headless under papermill with tiny parameters; the batch runner keeps its promises.

Results are read back from the files the notebooks write (run directories, results JSON),
not scraped from cell output.
"""
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fer_lab.batch import NOTEBOOKS_DIR, execute, load_sweep, run_batch, select_runs
from fer_lab.cli import DEMO

from conftest import make_ferplus

# a 2-branch quarter-width ESR* on 64 px synthetic faces, one epoch per stage
TINY = dict(branches=2, image_size=64, epochs=1, epochs_later=1, subset_per_class=4, batch_size=16,
            data_options={"num_samples": 32}, n_attention_images=3, progress=False)


def run_nb(name, out_dir, **params):
    ok, error, _ = execute(NOTEBOOKS_DIR / f"{name}.ipynb", Path(out_dir) / f"{name}.ipynb", params, timeout=600)
    assert ok, error
    return Path(out_dir) / f"{name}.ipynb"


def valid_figure(path: Path) -> bool:
    data = path.read_bytes()
    if path.suffix == ".pdf":
        return data.startswith(b"%PDF") and b"%%EOF" in data[-1024:]
    if path.suffix == ".png":
        return data.startswith(b"\x89PNG\r\n\x1a\n")
    if path.suffix == ".svg":
        import xml.etree.ElementTree as ET
        return ET.fromstring(data).tag.endswith("svg")
    return False


def test_notebook_defaults_are_the_demo():
    import papermill

    params = papermill.inspect_notebook(str(NOTEBOOKS_DIR / "02_train_esr.ipynb"))
    defaults = {k: v["default"] for k, v in params.items()}
    for key, value in DEMO.items():
        if key == "output_dir":
            continue
        assert eval(defaults[key]) == value, key                       # noqa: S307 (our own notebook)


def _study_records(path):
    """A study JSON in bench/ferplus_study.py's format: a saturated channel term (argument 250) in
    two seeds, a calibrated one (argument 1) in one."""
    def rec(seed, karg_ch, share_ch, warned):
        return {"run": f"v-s{seed}", "seed": seed, "karg_median_sp": 4.0 + seed, "karg_median_ch": karg_ch,
                "S_offdiag_sp": 0.01, "S_offdiag_ch": 0.0, "gradshare_sp": 0.004, "gradshare_ch": share_ch,
                "saturation_warnings": warned, "series": {"train_karg_sp_q50": [2.0, 4.0 + seed],
                                                          "train_gradshare_D_sp": [1e-12, 0.004]}}
    path.write_text(json.dumps({"variants": {
        "g10": {"label": "gamma 10", "runs": [rec(0, 250.0, 0.0, 1), rec(1, 260.0, 0.0, 1)]},
        "med": {"label": "gamma median", "runs": [rec(0, 1.0, 0.2, 0)]}}}))
    return path


def test_01_diversity_explained(tmp_path, tiny_run):
    run_nb("01_diversity_explained", tmp_path, output_dir=str(tmp_path / "out"), L_max=7, run_dir=str(tiny_run),
           n_faces=16, study_json=str(_study_records(tmp_path / "study.json")))
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["max_abs_error"] < 1e-12
    assert res["reference_rewards_similarity_for_L"] == [3, 5, 7]      # odd L: the public code's sign flip
    figs = sorted((tmp_path / "out" / "figures").iterdir())
    assert {p.stem for p in figs} == {"det_vs_distance", "diagonal_conventions", "run_saturation", "study_saturation"}
    study = {r["variant"]: r for r in res["study_saturation"]["rows"]}
    g10, med = study["gamma 10"], study["gamma median"]
    assert (g10["seeds"], g10["runs_warned"], med["runs_warned"]) == (2, 2, 0)
    assert g10["karg_median_ch"] == 255.0 and g10["exp(-karg)_ch"] == 0.0         # mean of 250, 260; exp underflows
    assert g10["karg_median_sp"] == 4.5 and abs(med["exp(-karg)_ch"] - math.exp(-1)) < 1e-7
    assert med["gradshare_ch"] == 0.2
    assert all(valid_figure(p) for p in figs)
    rows = pd.DataFrame(res["run_saturation"]["rows"])
    assert set(rows["term"]) == {"spatial", "channel"} and set(rows["gamma"]) == {"10.0", "median"}
    median = rows[rows["gamma"] == "median"]
    assert ((median["karg_median"] - 1).abs() < 1e-3).all() and (median["grad_norm"] > 0).all()
    # without a run the section says what to do instead of failing
    run_nb("01_diversity_explained", tmp_path / "none", output_dir=str(tmp_path / "none"), L_max=3,
           run_dir=str(tmp_path / "missing"), study_json=str(tmp_path / "missing.json"))
    none = json.loads((tmp_path / "none" / "results.json").read_text())
    assert none["run_saturation"]["rows"] == [] and none["study_saturation"]["rows"] == []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nb02")
    run_nb("02_train_esr", out, output_dir=str(out / "runs"), run_name="tiny", **TINY)
    return out / "runs" / "tiny"


def test_02_train_esr(tiny_run):
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["selected"]["stage"] == 1 and len(m["test"]["confusion"]) == 8
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["model"]["num_branches"] == 2 and cfg["train"]["optim"]["optimizer"] == "adam"
    assert all(valid_figure(p) for p in (tiny_run / "figures").glob("*.*"))


def test_02_fine_tunes_an_affectnet_checkpoint(tmp_path, affectnet_checkpoint):
    """Notebook 02 with the esr_finetune protocol from a fer_lab AffectNet-style checkpoint."""
    run_nb("02_train_esr", tmp_path, output_dir=str(tmp_path / "runs"), run_name="ft", protocol="esr_finetune",
           init_weights=str(affectnet_checkpoint), lr_step_at="start", **TINY)
    run = tmp_path / "runs" / "ft"
    h = pd.read_csv(run / "history.csv")
    assert h["num_branches"].tolist() == [1, 2] and "lr_other_branches" in h and "lr_new_branch" in h
    assert json.loads((run / "init_weights.json").read_text())["source"] == "fer_lab"
    assert json.loads((run / "metrics.json").read_text())["selected"]["head"] == "vote"


def test_batch_runs_the_ferplus_preset_from_the_official_format(tmp_path):
    """A sweep with ``preset: esr_ferplus`` (fine-tuning) on a FER+-format fixture, starting
    from an official-format ESR set; the preset fills the notebook's parameters."""
    from test_esr_official import write_official

    official = write_official(tmp_path / "esr_9", branches=[1, 2], base="random")
    data = make_ferplus(tmp_path / "ferplus", per_class=4)
    sweep = _sweep(tmp_path, {"seed": [0]}, preset="esr_ferplus", run_name="{model}-s{seed}")
    doc = yaml.safe_load(sweep.read_text())
    doc["fixed"] = {"model": "esr9", "branches": 2, "image_size": 64, "epochs": 1, "epochs_later": 1,
                    "batch_size": 16, "n_attention_images": 2, "data_root": str(data), "init_weights": str(official)}
    sweep.write_text(yaml.safe_dump(doc))
    summary = pd.read_csv(run_batch(sweep)).set_index("run")
    assert summary.loc["esr9-s0", "status"] == "done", summary.loc["esr9-s0", "error"]
    assert summary.loc["esr9-s0", "head"] == "vote" and "test_acc_ensemble" in summary
    run = tmp_path / "tiny" / "esr9-s0"
    c = json.loads((run / "config.json").read_text())
    assert c["preset"]["name"] == "esr_ferplus" and c["protocol"] == "esr_finetune"
    assert (c["train"]["protocol"]["lr_old"], c["train"]["optim"]["lr_gamma"], c["train"]["optim"]["lr_step_at"]) == (0.02, 0.75, "start")
    assert c["train"]["optim"]["momentum"] == 0.9 and c["train"]["data"]["options"] == {"label_mode": "majority"}
    assert json.loads((run / "init_weights.json").read_text())["source"] == "esr_official"


def test_04_attention_explorer(tiny_run, tmp_path):
    run_nb("04_attention_explorer", tmp_path, run_dir=str(tiny_run), compare_run_dir=str(tiny_run), n_images=3,
           n_region_images=16, output_dir=str(tmp_path / "explorer"))
    res = json.loads((tmp_path / "explorer" / "explorer.json").read_text())
    scores = pd.DataFrame(res["region_scores"])
    assert set(scores["map"]) == {"spatial attention", "Grad-CAM"} and len(scores) == 2 + 3   # + ensemble CAM
    assert ((scores["inside"] >= 0) & (scores["inside"] <= 1)).all()
    assert (scores["lift"] - scores["inside"] / scores["area"]).abs().max() < 0.2   # mean of ratios ~ ratio
    names = {p.stem for p in (tmp_path / "explorer").glob("*.png")}
    assert {"spatial_attention_last", "channel_attention", "grad_cam", "compare_spatial_attention",
            "compare_grad_cam"} <= names


def test_03_train_manet_and_explorer(tmp_path):
    """MA-Net* at 112 px on 16 synthetic faces for one epoch, then the explorer on its run."""
    run_nb("03_train_manet", tmp_path, output_dir=str(tmp_path / "runs"), run_name="manet", epochs=1, batch_size=8,
           data_options={"num_samples": 16}, n_attention_images=2, progress=False)
    run = tmp_path / "runs" / "manet"
    h = pd.read_csv(run / "history.csv")
    for col in ("train_D_sp", "train_D_ch", "train_D_b", "val_acc_fused", "val_acc_local", "val_acc_global",
                "train_gradnorm_D_b"):
        assert col in h, col
    assert json.loads((run / "metrics.json").read_text())["selected"]["head"] == "fused"
    assert (run / "figures" / "attention_maps.png").is_file()
    run_nb("04_attention_explorer", tmp_path, run_dir=str(run), n_images=2, n_region_images=4,
           output_dir=str(tmp_path / "explorer"))
    scores = pd.DataFrame(json.loads((tmp_path / "explorer" / "explorer.json").read_text())["region_scores"])
    assert set(scores["learner"]) == {"local patches", "fused", "local", "global"}


def _sweep(tmp_path, grid, **extra):
    doc = {"name": "tiny", "notebook": str(NOTEBOOKS_DIR / "02_train_esr.ipynb"), "output_dir": str(tmp_path),
           "timeout": 600, "run_name": "{model}-s{seed}", "fixed": {**TINY, "dataset": "synthetic"}, "grid": grid,
           **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_batch_records_failures_and_skips_finished_runs(tmp_path):
    sweep = _sweep(tmp_path, {"model": ["esr9_div", "esr7"], "seed": [0, 1]})
    summary = run_batch(sweep, jobs=2)                   # two notebooks at a time
    table = pd.read_csv(summary).set_index("run")
    assert table.loc["esr9_div-s0", "status"] == "done" and table.loc["esr9_div-s1", "status"] == "done"
    assert (table.loc[["esr7-s0", "esr7-s1"], "status"] == "failed").all()
    assert "unknown model" in table.loc["esr7-s0", "error"]
    assert 0 <= table.loc["esr9_div-s0", "test_acc"] <= 1
    assert (tmp_path / "tiny" / "esr9_div-s0" / "notebook.ipynb").is_file()
    assert (tmp_path / "tiny" / "esr9_div-s0" / "metrics.json").is_file()
    done = tmp_path / "tiny" / "esr9_div-s0" / "notebook.ipynb"
    stamp = done.stat().st_mtime_ns
    # restart without retrying failures: nothing runs again
    run_batch(sweep, retry_failed=False)
    assert done.stat().st_mtime_ns == stamp
    again = pd.read_csv(summary).set_index("run")
    assert (again["status"] == table["status"]).all()
    # --runs: only the matching grid point executes (a failed one is retried), the rest stay
    failed = {n: (tmp_path / "tiny" / n / "notebook.ipynb").stat().st_mtime_ns for n in ("esr7-s0", "esr7-s1")}
    run_batch(sweep, runs=["esr7-s0"])
    assert (tmp_path / "tiny" / "esr7-s0" / "notebook.ipynb").stat().st_mtime_ns != failed["esr7-s0"]
    assert (tmp_path / "tiny" / "esr7-s1" / "notebook.ipynb").stat().st_mtime_ns == failed["esr7-s1"]
    assert done.stat().st_mtime_ns == stamp and len(pd.read_csv(summary)) == 4

    # Table 1 from the batch: 05 aggregates the two seeds
    run_nb("05_reproduce_table", tmp_path, batch_dirs=[str(tmp_path / "tiny")], output_dir=str(tmp_path / "rep"))
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["runs"] == 2
    row = rep["table"][0]
    assert row["variant"].startswith("ESR*-9") and "(n=2)" in row["synthetic"]
    assert (tmp_path / "rep" / "table1.md").read_text().startswith("| variant |")
    study = (tmp_path / "rep" / "study.md").read_text().splitlines()
    assert "disagreement %" in study[0] and len(study) == 3                   # one variant row
    cells = [c.strip() for c in study[2].split("|")]
    assert cells[2] == "2" and "±" in cells[3]                                  # two seeds, mean ± sd
    agree = json.loads((tmp_path / "tiny" / "esr9_div-s0" / "agreement.json").read_text())
    assert 0 <= agree["disagreement_mean"] <= 1 and len(agree["disagreement"]) == 2   # TINY: 2 branches


def test_sweep_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    with pytest.raises(ValueError, match="missing key 'notebook'"):
        load_sweep(bad)
    bad.write_text("name: x\nnotebook: 02_train_esr.ipynb\ngrids: {}\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_sweep(bad)
    bad.write_text("name: x\nnotebook: nope.ipynb\n")
    with pytest.raises(FileNotFoundError, match="nope.ipynb"):
        load_sweep(bad)
    bad.write_text("name: x\nnotebook: 02_train_esr.ipynb\nfixed: {seed: 1}\ngrid: {seed: [1, 2]}\n")
    with pytest.raises(ValueError, match="both"):
        load_sweep(bad)
    sweep = load_sweep(NOTEBOOKS_DIR / "sweeps" / "table1_esr_ferplus.yaml")
    with pytest.raises(ValueError, match="--set data_root"):
        sweep.check_required()
    assert len(load_sweep(NOTEBOOKS_DIR / "sweeps" / "table1_esr_synthetic.yaml").points()) == 12
    dup = load_sweep(_sweep(tmp_path, {"model": ["esr9"], "seed": [0, 1]}, run_name="{model}"))
    with pytest.raises(ValueError, match="run name"):
        dup.points()
    # variants: rows that are not a product of parameter lists; the preset fills the rest
    study = load_sweep(NOTEBOOKS_DIR / "sweeps" / "study_ferplus_cpu.yaml")
    study.fixed["data_root"] = "/data/ferplus"
    points = dict(study.points())
    assert len(points) == 15 and list(points)[:2] == ["esr4-s0", "esr4_att-s0"]
    p = points["esr4_div_median-s1"]
    assert (p["model"], p["gamma"], p["seed"], p["branches"], p["image_size"], p["preset"]) == \
        ("esr9_div", "median", 1, 4, 48, "ferplus_cpu")
    assert p["model_options"] == {"cbam_reduction": 4, "cbam_init": "uniform"} and p["train_options"]["amp"] == "bf16"
    assert points["esr4_div_zero-s2"]["diagonal"] == "reference" and points["esr4-s0"]["gamma"] is None
    assert select_runs(list(points), ["esr4_div*-s1", "esr4-s0"]) == {"esr4-s0", "esr4_div-s1", "esr4_div_median-s1",
                                                                     "esr4_div_zero-s1"}
    assert select_runs(list(points), None) == set(points)
    with pytest.raises(ValueError, match="'esr5-s0' matches no run"):
        select_runs(list(points), ["esr5-s0"])
    bad.write_text("name: x\nnotebook: 02_train_esr.ipynb\nvariants: {a: {model: esr9}}\ngrid: {variant: [a, b]}\n")
    with pytest.raises(ValueError, match="not in 'variants'"):
        load_sweep(bad)


def test_third_model_through_the_notebooks(tmp_path):
    """TinyPair (one model file) through its sweep, notebook 02 and the attention explorer: the
    notebooks and the batch runner work for any model that keeps the contract."""
    doc = yaml.safe_load((NOTEBOOKS_DIR / "sweeps" / "tiny_pair_synthetic.yaml").read_text())
    doc.update(notebook=str(NOTEBOOKS_DIR / "02_train_esr.ipynb"), output_dir=str(tmp_path))
    doc["fixed"].update(image_size=32, epochs=1, batch_size=16, data_options={"num_samples": 32},
                        n_attention_images=2, progress=False)
    sweep = tmp_path / "tiny_pair.yaml"
    sweep.write_text(yaml.safe_dump(doc))
    summary = pd.read_csv(run_batch(sweep, runs=["tiny_pair_div-s0"])).set_index("run")
    assert summary.loc["tiny_pair_div-s0", "status"] == "done", summary.loc["tiny_pair_div-s0", "error"]
    assert summary.loc["tiny_pair_div-s0", "head"] == "ensemble" and "test_D_sp" in summary
    assert (summary.loc[["tiny_pair-s0", "tiny_pair-s1", "tiny_pair_div-s1"], "status"] == "pending").all()
    run = tmp_path / doc["name"] / "tiny_pair_div-s0"
    run_nb("04_attention_explorer", tmp_path, run_dir=str(run), n_images=2, n_region_images=8,
           output_dir=str(tmp_path / "explorer"))
    assert {p.stem for p in (tmp_path / "explorer").glob("*.png")} == {"grad_cam"}   # no attention: Grad-CAM only


def test_batch_set_paths_are_relative_to_the_shell(tmp_path, monkeypatch):
    """`batch --set data_root=rel/dir`: papermill runs notebooks in notebooks/, so a relative path
    from the command line is made absolute against the directory the command runs in."""
    from fer_lab.cli import absolute_paths

    monkeypatch.chdir(tmp_path)
    got = absolute_paths({"data_root": "data/ferplus", "init_weights": "/abs/w.pt", "seed": 1, "gamma": "median",
                          "cache_dir": None})
    assert got == {"data_root": str(tmp_path / "data" / "ferplus"), "init_weights": "/abs/w.pt", "seed": 1,
                   "gamma": "median", "cache_dir": None}


def test_explorer_says_what_to_do_without_a_run(tmp_path):
    """A fresh clone has no demo run: notebook 04 fails with 'run make demo first or set run_dir',
    not a bare FileNotFoundError about config.json."""
    from fer_lab.explorer import require_run, resolve_interactive

    ok, error, _ = execute(NOTEBOOKS_DIR / "04_attention_explorer.ipynb", tmp_path / "04.ipynb",
                           {"run_dir": str(tmp_path / "nothing")}, timeout=300)
    assert not ok and "make demo" in error and "run_dir" in error
    with pytest.raises(FileNotFoundError, match="make demo"):
        require_run(None)
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no checkpoints/best.pt yet"):
        require_run(tmp_path / "started")
    # outside a Jupyter kernel None means off; True/False are kept
    assert (resolve_interactive(None), resolve_interactive(True), resolve_interactive(False)) == (False, True, False)


def test_papermill_runs_are_static_and_quiet(tmp_path, tiny_run):
    """fer_lab's papermill runs pass interactive=False to notebooks with widgets; no cell leaves a
    stray value (``Out[n]: 1760`` from a write) and the training notebook prints one config line."""
    nb = run_nb("01_diversity_explained", tmp_path, output_dir=str(tmp_path / "out"), L_max=3,
                run_dir=str(tmp_path / "missing"))
    cells = json.loads(nb.read_text())["cells"]
    injected = next(c for c in cells if "injected-parameters" in c["metadata"].get("tags", []))
    assert "interactive = False" in "".join(injected["source"])
    texts = ["".join(o.get("text", "")) for c in cells if c["cell_type"] == "code" for o in c["outputs"]]
    assert any("static run" in t for t in texts)
    for c in cells:
        for o in c.get("outputs", []):
            if o["output_type"] == "execute_result":
                assert "text/html" in o["data"] or "image/png" in o["data"], o["data"].get("text/plain")
    executed = json.loads((tiny_run.parent.parent / "02_train_esr.ipynb").read_text())["cells"]
    config_cell = next(c for c in executed if "config_from_flat(" in "".join(c["source"]))
    (out,) = config_cell["outputs"]
    assert out["output_type"] == "stream" and out["text"][0].startswith("esr9_div (num_branches=2")
    lines = "".join("".join(o.get("text", "")) for c in executed for o in c.get("outputs", [])
                    if o["output_type"] == "stream")
    assert "stage 1 epoch 1" in lines and "D_sp nan" not in lines
