"""Figure functions on small arrays (valid PDF/SVG/PNG files), Grad-CAM and the Table 1 report."""
import xml.etree.ElementTree as ET

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from fer_lab import viz
from fer_lab.cam import grad_cam, grad_cam_per_learner
from fer_lab.models import build_model
from fer_lab.report import PUBLISHED, markdown_table, table1
from fer_lab.toy import closed_form_det, det_sweep, diversity_direction


def check_files(paths):
    assert sorted(p.suffix for p in paths) == [".pdf", ".png", ".svg"]
    for p in paths:
        data = p.read_bytes()
        if p.suffix == ".pdf":
            assert data.startswith(b"%PDF") and b"%%EOF" in data[-1024:]
            assert b"/FontFile2" in data or b"/Type0" in data or b"TrueType" in data   # fonttype 42
        elif p.suffix == ".png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n")
        else:
            assert ET.fromstring(data).tag.endswith("svg")


@pytest.fixture
def history():
    rows = []
    for e, (st, L) in enumerate([(0, 1), (0, 1), (1, 2), (2, 3)]):
        r = {"stage": st, "epoch": e, "global_epoch": e, "num_branches": L, "train_acc_ensemble": 0.2 + e / 10,
             "val_acc_ensemble": 0.2 + e / 12, "val_acc_vote": 0.2, "train_D_sp": np.nan if L < 2 else 0.9,
             "val_D_sp": np.nan if L < 2 else 0.8}
        r.update({f"val_acc_branch_{l + 1}": 0.1 * (l + 1) for l in range(L)})
        rows.append(r)
    return pd.DataFrame(rows)


def test_figures_are_written_in_three_valid_formats(tmp_path, history):
    viz.set_style()
    S = np.array([[1.0, 0.3, np.nan], [0.3, 1.0, np.nan], [np.nan, np.nan, np.nan]])
    ax = viz.plot_similarity(S)
    assert ax.images[0].get_clim() == (0.0, 1.0)          # fixed colour limits
    assert len(ax.texts) == 4                             # annotated, NaN learner dropped
    check_files(viz.save_figure(ax.figure, tmp_path, "similarity"))
    sims = {"train_S_sp": np.stack([S, S]), "stage": np.array([1, 2]), "epoch": np.array([0, 0])}
    check_files(viz.save_figure(viz.plot_similarity_epochs(sims, "sp"), tmp_path, "sim_epochs"))
    check_files(viz.save_figure(viz.plot_determinant_trends(history).figure, tmp_path, "det"))
    check_files(viz.save_figure(viz.plot_accuracy_curves(history).figure, tmp_path, "acc"))
    ax = viz.plot_accuracy_curves(history, "val", main_head="vote")
    styles = {ln.get_label(): (ln.get_linewidth(), ln.get_linestyle()) for ln in ax.lines}
    assert styles["vote"] == (2, "-") and styles["softmax mean"][1] != "-"      # the decision is the thick line
    assert [k for k in styles if k.startswith("branch")] == ["branch 1", "branch 2", "branch 3"]
    grads = history.assign(train_gradnorm_ce=1.0, train_gradnorm_D_sp=1e-3, train_gradnorm_total=1.0)
    ax = viz.plot_gradient_norms(grads)
    assert [ln.get_label() for ln in ax.lines if not ln.get_label().startswith("_")] == ["ce", "D_sp", "total"]
    check_files(viz.save_figure(viz.plot_confusion(np.eye(3) * 5 + 1, ["a", "b", "c"]).figure, tmp_path, "cm"))
    images = np.random.rand(2, 3, 16, 16)
    fig = viz.plot_map_grid(images, np.random.rand(3, 2, 4, 4), ["a", "b"], [0, 1], [[0, 1]] * 3)
    assert len(fig.axes) == 2 * 4 + 1                                   # 2 faces x (image + 3 maps), one colourbar
    assert len(viz.plot_map_grid(images, np.random.rand(3, 2, 4, 4), colorbar=False).axes) == 2 * 4
    check_files(viz.save_figure(fig, tmp_path, "grid"))
    fig = viz.plot_map_grid(images, {"run A": np.random.rand(2, 4, 4), "run B": np.random.rand(2, 4, 4)})
    check_files(viz.save_figure(fig, tmp_path, "grid_dict"))
    check_files(viz.save_figure(viz.plot_channel_attention(np.random.rand(3, 2, 16)).figure, tmp_path, "ca"))
    check_files(viz.save_figure(viz.plot_diagonal_conventions(6), tmp_path, "diag"))
    check_files(viz.save_figure(viz.plot_det_vs_distance((2, 3), (10.0,)), tmp_path, "detdist"))
    check_files(viz.save_figure(viz.plot_determinant_trends_many({"a s0": history, "b s0": history}).figure,
                                tmp_path, "many"))
    assert plt.rcParams["pdf.fonttype"] == 42
    plt.close("all")
    assert not list(tmp_path.glob(".*.tmp"))


def test_toy_closed_forms_and_direction():
    d2 = np.array([0.01, 0.05, 0.2])
    for L in (2, 3, 5):
        for diag in ("paper", "reference"):
            np.testing.assert_allclose(det_sweep([L], d2, 10.0, diag)[0], closed_form_det(L, np.exp(-10 * d2), diag),
                                       rtol=1e-9, atol=1e-12)
    # maximising D pushes learners apart with the unit diagonal; the zero diagonal flips with parity
    assert all(diversity_direction(L, 0.05) > 0 for L in range(2, 8))
    assert [diversity_direction(L, 0.05, diagonal="reference") > 0 for L in range(2, 8)] == \
        [True, False, True, False, True, False]


def test_grad_cam_restores_mode_and_targets_each_branch():
    torch.manual_seed(0)
    model = build_model("esr9_div", num_branches=2, width=0.25).train()
    x = torch.rand(2, 3, 96, 96)
    maps = grad_cam_per_learner(model, x)
    assert set(maps) == {"ensemble", "branch_1", "branch_2"}
    assert all(m.shape == (2, 96, 96) and m.min() >= 0 and m.max() <= 1 for m in maps.values())
    assert model.training                                   # restored
    model.eval()
    grad_cam(model, x, "branch_2", targets=[3, 4])
    assert not model.training
    with pytest.raises(ValueError, match="one class per image"):
        grad_cam(model, x, "branch_1", targets=[1])
    with pytest.raises(KeyError, match="no head"):
        grad_cam(model, x, "branch_9", layer="base")


def test_table1_layout():
    runs = pd.DataFrame({"model": ["esr9_div", "esr9_div", "esr9", "esr9_div"],
                         "dataset": ["ferplus", "ferplus", "ferplus", "rafdb"],
                         "seed": [0, 1, 0, 0], "test_acc": [88.0, 90.0, 87.0, 80.0]})
    t = table1(runs)
    assert list(t.index) == ["ESR-9", "ESR*-9 (+ spatial + channel div)"]
    assert t.loc["ESR*-9 (+ spatial + channel div)", "FER+"] == "89.00 ± 1.41 (n=2)"
    assert t.loc["ESR-9", "FER+ (published)"] == PUBLISHED["esr9"]["FER+"]
    assert t.loc["ESR-9", "RAF-DB"] == ""
    md = markdown_table(t)
    assert md.splitlines()[0].startswith("| variant | FER+ |") and len(md.splitlines()) == 4
    assert md.splitlines()[3].startswith("| ESR\\*-9 (+ spatial + channel div) | 89.00 ± 1.41 (n=2) |")
    # runs that change the diversity term form their own rows, without a published number
    from fer_lab.report import _variant

    cfg = {"diversity": {"terms": ["spatial"], "gamma": "median", "diagonal": "reference", "normalize": "none"}}
    assert _variant("esr9_div", cfg) == "esr9_div, gamma median, zero diagonal"
    assert _variant("esr9", {"diversity": {"terms": [], "gamma": 3.0}}) == "esr9"
    study = runs.assign(variant=["esr9_div", "esr9_div, gamma median", "esr9", "esr9_div"])
    t = table1(study)
    assert list(t.index) == ["ESR-9", "ESR*-9 (+ spatial + channel div)", "ESR*-9 (+ spatial + channel div), gamma median"]
    assert t.loc["ESR*-9 (+ spatial + channel div), gamma median", "FER+"] == "90.00 (n=1)"
    assert np.isnan(t.loc["ESR*-9 (+ spatial + channel div), gamma median", "FER+ (published)"])


def test_plot_study_series_one_line_per_seed_and_floored_zeros():
    from fer_lab.report import study_summary

    def rec(seed, share):
        return {"run": f"r{seed}", "seed": seed, "valid_acc_vote": 0.8,
                "series": {"train_karg_sp_q50": [1.0, 2.0], "train_gradshare_D_sp": share}}
    summary = study_summary({"a": [rec(0, [0.0, 0.01]), rec(1, [1e-3, 0.02])], "b": [rec(0, [0.1, 0.2])]},
                            {"a": "A", "b": "B"})
    axes = viz.plot_study_series(summary, {"train_karg_sp_q50": "karg", "train_gradshare_D_sp": "share",
                                           "missing": "nothing"})
    assert [len(ax.lines) for ax in axes] == [3, 3, 0]               # 3 seeds in all; a column no run has
    assert all(ax.get_yscale() == "log" for ax in axes) and axes[1].get_title() == "share"
    first = axes[1].lines[0]
    assert first.get_ydata()[0] == viz.LOG_FLOOR and list(first.get_xdata()) == [1, 2]   # exact 0 floored
    assert axes[1].lines[0].get_color() == axes[1].lines[1].get_color() != axes[1].lines[2].get_color()
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["A", "B"]   # one entry per variant
    plt.close("all")
