"""Diversity diagnostics: kernel arguments, the median-calibrated bandwidth, saturation warnings
and the figures that show a saturated term, against independent expectations."""
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from fer_lab import runs, viz
from fer_lab.diversity import DiversityConfig, diversity, kernel_arguments, resolve_gamma, term_diagnostics
from fer_lab.train import SATURATION, saturation_warnings, train


def brute_pairs(f):
    """Squared distances of every pair l < k and sample i by explicit loops: (P, N)."""
    L, N = f.shape[:2]
    f = f.reshape(L, N, -1).double()
    return torch.tensor([[float(((f[l, i] - f[k, i]) ** 2).sum()) for i in range(N)]
                         for l in range(L) for k in range(l + 1, L)], dtype=torch.float64)


def test_kernel_arguments_and_median_gamma_against_brute_force():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 7, 3, 5, generator=g)
    d2 = brute_pairs(f)
    torch.testing.assert_close(kernel_arguments(f, 2.5).double(), 2.5 * d2, rtol=1e-5, atol=1e-5)
    gamma = resolve_gamma(f, "median")
    assert gamma == pytest.approx(1.0 / float(d2.flatten().median()), rel=1e-5)
    # calibrated: the median kernel argument is 1 whatever the features' scale
    for scale in (1e-3, 1.0, 1e3):
        assert float(kernel_arguments(f * scale, "median").median()) == pytest.approx(1.0, rel=1e-4)
    assert resolve_gamma(torch.zeros(3, 4, 2), "median") == 1.0          # identical learners
    assert resolve_gamma(f, 7.0) == 7.0
    with pytest.raises(ValueError, match="median"):
        DiversityConfig(terms=["spatial"], gamma="mean")


def test_median_gamma_has_gradient_where_gamma_10_has_none():
    """Two learners 10 apart (squared distance ~100 per sample): at gamma = 10 the arguments are
    ~1000, S is exactly the identity in float32 and D's gradient is 0; the median heuristic
    puts the arguments near 1 and the gradient is of order one."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 32, 16, generator=g)
    f = torch.cat([base, base + 10.0 / 4 + 0.3 * torch.randn(1, 32, 16, generator=g)]).requires_grad_()
    D10, S10 = diversity(f, gamma=10.0)
    (grad10,) = torch.autograd.grad(D10, f)
    assert float(S10[0, 1].detach()) == 0.0 and float(grad10.abs().max()) == 0.0
    Dm, Sm = diversity(f, gamma="median")
    (gradm,) = torch.autograd.grad(Dm, f)
    assert 0.05 < float(Sm[0, 1].detach()) < 0.95
    assert float(gradm.norm()) > 1e-3
    # diagnostics report the bandwidth the term used and its arguments
    d = term_diagnostics({"spatial": f}, DiversityConfig(terms=["spatial"], gamma="median"), ("spatial",))
    assert d["spatial"]["gamma"] == pytest.approx(resolve_gamma(f, "median"))
    assert float(d["spatial"]["kernel_args"].median()) == pytest.approx(1.0, rel=1e-4)


def test_saturation_warning_rule():
    seen = []
    sat = {"gradshare_D_sp": 1e-6, "S_offdiag_max_sp": 1e-9, "karg_sp_q50": 400.0,
           "gradshare_D_ch": 0.2, "S_offdiag_max_ch": 1e-9}          # channel: small S but a real gradient
    msgs = saturation_warnings(sat, 1, 0, seen)
    assert len(msgs) == 1 and "D_sp" in msgs[0] and "gamma='median'" in msgs[0] and "--normalize l2" in msgs[0]
    assert seen[0]["term"] == "sp" and seen[0]["stage"] == 1
    assert saturation_warnings(sat, 1, 1, seen) == []                      # once per stage and term
    assert len(saturation_warnings(sat, 2, 0, seen)) == 1
    ok = {"gradshare_D_sp": 1e-6, "S_offdiag_max_sp": 2 * SATURATION}
    assert saturation_warnings(ok, 3, 0, []) == []


def test_engine_records_diagnostics_and_warns_when_saturated(tiny_cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="fer_lab.train"):
        sat = train(tiny_cfg(name="sat", model_options=dict(num_branches=3, width=0.25, gamma=1e4)))
    h = pd.read_csv(sat / "history.csv")
    for col in ("train_karg_sp_q05", "train_karg_sp_q50", "train_karg_ch_q95", "val_karg_sp_q50",
                "train_S_offdiag_sp", "train_S_offdiag_max_ch", "train_gradshare_D_sp", "train_gamma_sp"):
        assert col in h, col
    later = h[h["stage"] > 0]
    assert (later["train_karg_sp_q50"] > 1e2).all() and (later["train_gradshare_D_sp"] < SATURATION).all()
    assert (later["train_gamma_sp"] == 1e4).all()
    m = runs.read_json(sat / "metrics.json")
    assert {w["term"] for w in m["saturation_warnings"]} >= {"sp"}
    assert any("saturated" in r.getMessage() for r in caplog.records)
    # the calibrated bandwidth brings the same model into its working range
    cal = train(tiny_cfg(name="median", model_options=dict(num_branches=3, width=0.25, gamma="median")))
    hc = pd.read_csv(cal / "history.csv")
    later = hc[hc["stage"] > 0]
    assert ((later["train_karg_sp_q50"] - 1).abs() < 0.5).all()     # median of the per-batch calibrated arguments
    assert (later["train_S_offdiag_sp"] > 0.05).all()
    assert not runs.read_json(cal / "metrics.json")["saturation_warnings"]
    assert runs.read_json(cal / "config.json")["model"]["diversity"]["gamma"] == "median"


def test_saturation_is_visible_in_the_figures(tmp_path):
    viz.set_style()
    h = pd.DataFrame({"global_epoch": range(4), "stage": [0, 1, 1, 1], "train_D_sp": [np.nan, 1.0, 1 - 1e-9, 1.0],
                      "val_D_sp": [np.nan, 1.0, 1.0, 1.0]})
    ax = viz.plot_determinant_trends(h)
    assert ax.get_yscale() == "log" and "1 - det" in ax.get_ylabel()     # not a flat line at 1
    assert viz.plot_determinant_trends(h, scale="linear").get_yscale() == "linear"
    S = np.array([[1.0, 1e-30], [1e-30, 1.0]])
    assert viz.saturated(S) and not viz.saturated(np.array([[1, 0.2], [0.2, 1]]))
    ax = viz.plot_similarity(S, scale="log")
    assert [t.get_text() for t in ax.texts] == ["1.00", "1e-30", "1e-30", "1.00"]
    sims = {"train_S_sp": np.stack([S, S]), "stage": np.array([1, 1]), "epoch": np.array([0, 1])}
    fig = viz.plot_similarity_epochs(sims, "sp")
    assert "log scale" in fig._suptitle.get_text() and "saturated" in fig.axes[0].get_title()
    k = {f"train_karg_sp_q{q:02d}": [np.nan, 300.0 + q, 310.0 + q, 320.0 + q] for q in (5, 25, 50, 75, 95)}
    h = h.assign(**k, train_S_offdiag_sp=[np.nan, 0.0, 1e-20, 0.0], train_gradshare_D_sp=[np.nan, 0.0, 1e-9, 0.0])
    fig = viz.plot_diversity_diagnostics(h)
    assert [a.get_yscale() for a in fig.axes] == ["log"] * 3
    assert [ln.get_label() for ln in fig.axes[0].lines if not ln.get_label().startswith("_")] == ["spatial"]
    paths = viz.save_figure(fig, tmp_path, "diag")
    assert sorted(p.suffix for p in paths) == [".pdf", ".png", ".svg"]


def test_disagreement_and_overlap_against_hand_counts():
    from fer_lab.analysis import attention_overlap, prediction_disagreement

    preds = np.array([[0, 1, 2, 3], [0, 1, 0, 0], [1, 1, 2, 3]])
    D = prediction_disagreement(preds)
    np.testing.assert_allclose(D, [[0, 0.5, 0.25], [0.5, 0, 0.75], [0.25, 0.75, 0]])
    scores = np.eye(4)[preds]                                   # one-hot scores give the same
    np.testing.assert_allclose(prediction_disagreement(scores), D)
    a = np.zeros((3, 1, 2, 2))
    a[0, 0, 0, 0] = 1                       # all mass top-left
    a[1, 0, 0, 0] = a[1, 0, 1, 1] = 2       # half top-left, half bottom-right
    a[2, 0, 1, 0] = 5                       # bottom-left only
    np.testing.assert_allclose(attention_overlap(a), [[1, 0.5, 0], [0.5, 1, 0], [0, 0, 1]])


def test_branch_agreement_on_a_model():
    from fer_lab.analysis import branch_agreement
    from fer_lab.models import build_model

    class Faces(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(i)), 0

    m = build_model("esr9_div", num_branches=3, width=0.25, input_size=48)
    r = branch_agreement(m, Faces(), batch_size=4)
    assert r["n"] == 10 and np.array(r["disagreement"]).shape == (3, 3)
    assert 0 <= r["disagreement_mean"] <= 1 and 0 < r["overlap_attention_mean"] <= 1 and "overlap_features" in r
    m.active_branches = 2
    assert np.array(branch_agreement(m, Faces(), max_items=5)["disagreement"]).shape == (2, 2)
