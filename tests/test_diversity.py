"""The diversity term against independent expectations: brute force, closed forms, gradcheck."""
import itertools
import math

import pytest
import torch

from fer_lab.diversity import (LOGDET_JITTER, DiversityConfig, channel_pool, diversity, diversity_terms,
                               similarity_matrix, spatial_pool)


def brute_force_similarity(features, gamma, diagonal):
    """The public code's way: an explicit double loop over learners and samples."""
    L, N = features.shape[:2]
    f = features.reshape(L, N, -1).double()
    S = torch.zeros(L, L, dtype=torch.float64)
    for l in range(L):
        for k in range(L):
            if l == k:
                S[l, k] = 1.0 if diagonal == "paper" else 0.0
                continue
            S[l, k] = sum(math.exp(-gamma * float(((f[l, i] - f[k, i]) ** 2).sum())) for i in range(N)) / N
    return S


def simplex_features(L, c):
    """L learners, one sample, pairwise squared distance exactly 2c^2 (scaled basis vectors)."""
    return (torch.eye(L, dtype=torch.float64) * c).unsqueeze(1)


@pytest.mark.parametrize("diagonal", ["paper", "reference"])
@pytest.mark.parametrize("shape", [(5, 7, 3, 4), (3, 1, 6), (9, 4, 36), (2, 3, 512)])
def test_matches_brute_force(diagonal, shape):
    g = torch.Generator().manual_seed(0)
    f = torch.rand(*shape, generator=g) * 0.4
    S = similarity_matrix(f, gamma=2.0, diagonal=diagonal)
    torch.testing.assert_close(S.double(), brute_force_similarity(f, 2.0, diagonal), atol=1e-6, rtol=1e-5)
    D, S2 = diversity(f, gamma=2.0, diagonal=diagonal)
    torch.testing.assert_close(S, S2)
    assert torch.allclose(D.double(), torch.linalg.det(brute_force_similarity(f, 2.0, diagonal)), atol=1e-5)


def test_two_learners_closed_form():
    f = torch.tensor([[[0.0, 0.0]], [[0.3, 0.4]]], dtype=torch.float64)   # distance^2 = 0.25
    D, S = diversity(f, gamma=4.0)
    s = math.exp(-4.0 * 0.25)
    assert S[0, 1].item() == pytest.approx(s)
    assert D.item() == pytest.approx(1 - s ** 2)


@pytest.mark.parametrize("L", range(2, 10))
def test_equal_off_diagonal_closed_forms(L):
    gamma, c = 3.0, 0.3
    a = math.exp(-gamma * 2 * c * c)
    f = simplex_features(L, c)
    D_paper, S = diversity(f, gamma, "paper")
    assert torch.allclose(S[~torch.eye(L, dtype=bool)], torch.full((L * L - L,), a, dtype=torch.float64))
    assert D_paper.item() == pytest.approx((1 - a) ** (L - 1) * (1 + (L - 1) * a), rel=1e-9)
    D_ref, _ = diversity(f, gamma, "reference")
    # SPEC section 1: det(S - I) = (L-1) (-1)^(L-1) a^L -- the sign flips with L
    assert D_ref.item() == pytest.approx((L - 1) * (-1) ** (L - 1) * a ** L, rel=1e-9)
    assert (D_ref.item() > 0) == (L % 2 == 1)


def test_permutation_invariance():
    g = torch.Generator().manual_seed(1)
    f = torch.rand(6, 5, 10, generator=g) * 0.3
    D, S = diversity(f, gamma=5.0)
    for perm in (torch.tensor([5, 3, 1, 0, 2, 4]), torch.tensor([1, 0, 2, 3, 4, 5])):
        Dp, Sp = diversity(f[perm], gamma=5.0)
        torch.testing.assert_close(Sp, S[perm][:, perm])
        assert Dp.item() == pytest.approx(D.item(), abs=1e-6)


def test_paper_determinant_in_unit_interval():
    g = torch.Generator().manual_seed(2)
    for trial in range(50):
        L = 2 + trial % 8
        scale = 10 ** (-3 + trial % 5)
        base = torch.rand(1, 4, 8, generator=g)
        f = base + scale * torch.randn(L, 4, 8, generator=g)   # from near-identical to far apart
        D, _ = diversity(f, gamma=10.0)
        assert 0.0 <= D.item() <= 1.0


def test_gradcheck_det_and_logdet():
    g = torch.Generator().manual_seed(3)
    f = (torch.rand(3, 2, 4, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: diversity(x, gamma=1.5)[0], (f,))
    assert torch.autograd.gradcheck(lambda x: diversity(x, gamma=1.5, reduction="logdet")[0], (f,))
    assert torch.autograd.gradcheck(lambda x: diversity(x, gamma=1.5, diagonal="reference")[0], (f,))
    assert torch.autograd.gradcheck(lambda x: similarity_matrix(x, gamma=1.5), (f,))


def test_logdet_is_jittered_log_of_det():
    g = torch.Generator().manual_seed(4)
    f = torch.rand(4, 3, 5, generator=g, dtype=torch.float64)
    D, S = diversity(f, gamma=2.0, reduction="logdet")
    expected = math.log(torch.linalg.det(S + LOGDET_JITTER * torch.eye(4, dtype=torch.float64)).item())
    assert D.item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="logdet"):
        diversity(f, reduction="logdet", diagonal="reference")


def test_degenerate_inputs_are_predictable():
    f = torch.rand(1, 4, 3)
    D, S = diversity(f)                       # one learner: S = [[1]], det 1
    assert S.shape == (1, 1) and D.item() == 1.0
    same = torch.rand(1, 5, 6).repeat(4, 1, 1).requires_grad_()
    D, S = diversity(same)                    # identical learners: S all ones, det 0, finite gradient
    assert torch.allclose(S, torch.ones(4, 4)) and D.item() == 0.0
    D.backward()
    assert torch.isfinite(same.grad).all()
    D, _ = diversity(torch.rand(3, 1, 4))     # one sample
    assert torch.isfinite(D)
    far = torch.randn(5, 3, 8) * 100
    D, S = diversity(far, gamma=1e6)          # huge gamma: S = I
    assert torch.equal(S, torch.eye(5)) and D.item() == 1.0
    D, _ = diversity(torch.rand(5, 3, 8), gamma=1e-9)   # tiny gamma: S ~ ones, det ~ 0, never negative
    assert 0.0 <= D.item() < 1e-6
    D, _ = diversity(torch.rand(3, 2, 4).log(), diagonal="reference")  # negative inputs are fine
    assert torch.isfinite(D)


@pytest.mark.parametrize("gamma", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        diversity(torch.rand(3, 2, 4), gamma=gamma)


def test_bad_inputs():
    bad = torch.rand(3, 2, 4)
    bad[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        diversity(bad)
    bad[1, 0, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        similarity_matrix(bad)
    with pytest.raises(ValueError, match=r"\(L, N"):
        diversity(torch.rand(5))
    with pytest.raises(ValueError, match="diagonal"):
        diversity(torch.rand(3, 2, 4), diagonal="zero")
    with pytest.raises(ValueError, match="reduction"):
        diversity(torch.rand(3, 2, 4), reduction="trace")


def test_autocast_computes_in_float32():
    g = torch.Generator().manual_seed(5)
    f = torch.rand(4, 8, 36, generator=g) * 0.3
    ref_D, ref_S = diversity(f, gamma=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        D, S = diversity(f.bfloat16(), gamma=2.0)
    assert S.dtype == torch.float32 and D.dtype == torch.float32
    torch.testing.assert_close(S, ref_S, atol=2e-2, rtol=2e-2)


def test_float32_and_float64_agree():
    f = torch.rand(9, 32, 512, dtype=torch.float64) * 0.05
    D64, S64 = diversity(f, gamma=10.0)
    D32, S32 = diversity(f.float(), gamma=10.0)
    assert torch.allclose(S32.double(), S64, atol=1e-5)
    assert abs(D32.item() - D64.item()) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    f = torch.rand(9, 32, 36) * 0.3
    D, S = diversity(f, gamma=10.0)
    Dc, Sc = diversity(f.cuda(), gamma=10.0)
    torch.testing.assert_close(Sc.cpu(), S, atol=1e-5, rtol=1e-5)


def test_pooling():
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    sp = spatial_pool(maps)
    ch = channel_pool(maps)
    assert sp.shape == (2, 2, 2) and ch.shape == (2, 3)
    for b, i, j in itertools.product(range(2), range(2), range(2)):
        assert sp[b, i, j].item() == pytest.approx(maps[b, :, i, j].mean().item())
    for b, c in itertools.product(range(2), range(3)):
        assert ch[b, c].item() == pytest.approx(maps[b, c].mean().item())
    assert spatial_pool(torch.rand(4, 5, 2, 3, 3)).shape == (4, 5, 3, 3)
    with pytest.raises(ValueError):
        channel_pool(torch.rand(3, 3))


def test_config_and_terms():
    with pytest.raises(ValueError, match="unknown"):
        DiversityConfig(terms=("space",))
    with pytest.raises(ValueError, match="gamma"):
        DiversityConfig(gamma=0)
    with pytest.raises(ValueError, match="logdet"):
        DiversityConfig(reduction="logdet", diagonal="reference")
    cfg = DiversityConfig(terms=("spatial", "channel"), gamma=2.0, normalize="l2")
    assert DiversityConfig.from_dict(cfg.to_dict()) == cfg
    feats = {"spatial": torch.rand(3, 4, 6, 6), "channel": torch.rand(3, 4, 32) * 5}
    out = diversity_terms(feats, cfg)
    assert set(out) == {"spatial", "channel"}
    # l2 normalisation: the channel term sees unit vectors, so scaling the features changes nothing
    out2 = diversity_terms({"spatial": feats["spatial"], "channel": feats["channel"] * 100}, cfg)
    assert out2["channel"][0].item() == pytest.approx(out["channel"][0].item(), rel=1e-5)
    assert diversity_terms({"spatial": torch.rand(1, 4, 9), "channel": torch.rand(1, 4, 9)}, cfg) == {}
    with pytest.raises(KeyError, match="branch"):
        diversity_terms(feats, DiversityConfig(terms=("branch",)))


def test_pairwise_distances_gradcheck_and_brute_force():
    from fer_lab.diversity import pairwise_sq_distances

    g = torch.Generator().manual_seed(6)
    f = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pairwise_sq_distances, (f,))
    d2 = pairwise_sq_distances(f)
    brute = torch.stack([torch.stack([((f[l, i] - f[k, i]) ** 2).sum() for l in range(4) for k in range(4)])
                         .view(4, 4) for i in range(3)])
    torch.testing.assert_close(d2, brute)
    same = torch.rand(1, 2, 7).repeat(3, 1, 1)
    assert torch.equal(pairwise_sq_distances(same), torch.zeros(2, 3, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_underflow_floor(dtype):
    """Pairs far enough apart that exp(-gamma d2) underflows give exactly 0 (the kernel skips
    exp's slow underflow path); the rest of S, and the gradient, match the plain formula
    (``torch.exp`` under autograd) and brute force."""
    from fer_lab.diversity import pairwise_sq_distances

    g = torch.Generator().manual_seed(8)
    f = (torch.rand(4, 6, 3, generator=g) * 0.3).to(dtype)
    f[3] += 40.0 if dtype == torch.float64 else 5.0     # learner 3 far from all others in every sample
    gamma = 10.0
    leaf_a, leaf_b = f.clone().requires_grad_(), f.clone().requires_grad_()
    S = similarity_matrix(leaf_a, gamma)
    plain = torch.exp(pairwise_sq_distances(leaf_b) * -gamma).mean(dim=0)
    plain = plain.masked_fill(torch.eye(4, dtype=torch.bool), 1.0)
    assert (gamma * pairwise_sq_distances(f)[:, 3, :3] > -math.log(torch.finfo(dtype).tiny)).all()
    assert torch.equal(S[3, :3], torch.zeros(3, dtype=dtype)) and torch.equal(S[:3, 3], torch.zeros(3, dtype=dtype))
    torch.testing.assert_close(S.double(), brute_force_similarity(f, gamma, "paper"), atol=1e-6, rtol=1e-5)
    w = torch.rand(4, 4, generator=g).to(dtype)
    (S * w).sum().backward()
    (plain * w).sum().backward()
    torch.testing.assert_close(leaf_a.grad, leaf_b.grad, atol=1e-6, rtol=1e-5)
    assert torch.equal(leaf_a.grad[3], torch.zeros_like(leaf_a.grad[3]))
