"""CBAM and ESR: parameter counts from SPEC, shapes, the ensemble rules, the loss, the registry."""
import pytest
import torch
import torch.nn.functional as F

from fer_lab.diversity import diversity
from fer_lab.models import (CBAM, ESR, build_model, build_model_from_config, count_parameters, list_models,
                            resolve_config)
from fer_lab.models.common import ensemble_from_logits
from fer_lab.models.esr import MIN_INPUT_SIZE, output_size


@pytest.mark.parametrize("channels,expected", [(64, 680), (128, 2284), (256, 8564), (512, 33412)])
def test_cbam_parameter_count(channels, expected):
    assert count_parameters(CBAM(channels)) == expected
    c = channels
    assert expected == 2 * c * c // 16 + c // 16 + c + 98 + 2


def test_cbam_matches_hand_computation():
    torch.manual_seed(0)
    cbam = CBAM(32).eval()
    x = torch.randn(2, 32, 5, 7)
    y, ca, sa = cbam(x)
    mlp = cbam.channel_gate.mlp
    w1, b1, w2, b2 = mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias
    f = lambda v: F.relu(v @ w1.T + b1) @ w2.T + b2  # noqa: E731
    ca_ref = torch.sigmoid(f(x.mean((2, 3))) + f(x.amax((2, 3))))
    xc = x * ca_ref[:, :, None, None]
    pooled = torch.cat([xc.amax(1, keepdim=True), xc.mean(1, keepdim=True)], 1)
    bn = cbam.spatial_gate.bn
    z = F.conv2d(pooled, cbam.spatial_gate.conv.weight, padding=3)
    z = (z - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    sa_ref = torch.sigmoid(z * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)).squeeze(1)
    torch.testing.assert_close(ca, ca_ref)
    torch.testing.assert_close(sa, sa_ref)
    torch.testing.assert_close(y, xc * sa_ref[:, None])
    assert ca.shape == (2, 32) and sa.shape == (2, 5, 7)
    assert cbam.spatial_gate.bn.momentum == 0.01


@pytest.mark.parametrize("name,expected", [("esr9", 20_349_384), ("esr9_att", 20_832_332),
                                           ("esr9_div", 20_832_332), ("esr15_div", 34_465_676),
                                           ("esr15", 374_784 + 15 * 2_219_400)])
def test_esr_parameter_counts(name, expected):
    assert count_parameters(build_model(name)) == expected


def test_esr_part_counts():
    m = build_model("esr9_div")
    assert count_parameters(m.base) == 382_316
    assert count_parameters(m.branches[0]) == 2_272_224
    plain = build_model("esr9")
    assert count_parameters(plain.base) == 374_784
    assert count_parameters(plain.branches[0]) == 2_219_400


def test_output_sizes():
    assert output_size(96) == (20, 6)
    assert output_size(48, "same") == (12, 6)          # 48 -> 48 -> 24 -> 24 -> 12 | 12 -> 6 -> 6 -> 6
    assert MIN_INPUT_SIZE == min(s for s in range(8, 200) if min(output_size(s)) >= 1)
    with pytest.raises(ValueError, match="input_size"):
        build_model("esr9", input_size=MIN_INPUT_SIZE - 1, conv_padding="paper")
    with pytest.raises(ValueError, match="conv_padding"):
        build_model("esr9", conv_padding="valid")


def test_conv_padding_derived_from_the_input_size():
    """The paper's layout while it leaves a last map of at least 6x6 (96 px and up), every conv
    padded below: 48 px FER+ faces run natively with the paper's 6x6 attention maps."""
    from fer_lab.models.esr import resolve_conv_padding

    # paper layout at 93 px: 89, 87 -> 43, 41, 39 -> 19 | 17, 15 -> 7, 5, 5: a 5x5 last map; at 94 px 6x6
    assert [resolve_conv_padding(s) for s in (48, 64, 93, 94, 96, 224)] == ["same"] * 3 + ["paper"] * 3
    assert output_size(93)[1] == 5 and output_size(94)[1] == 6
    m = build_model("esr9_div", num_branches=2, width=0.25, input_size=48).eval()
    assert m.config["conv_padding"] == "same"
    with torch.no_grad():
        out = m(torch.rand(2, 3, 48, 48), return_all_attention=True)
    assert out.spatial_attention.shape == (2, 2, 6, 6) and out.layer_attention["base.0"][1].shape == (2, 48, 48)
    assert count_parameters(m) == count_parameters(build_model("esr9_div", num_branches=2, width=0.25))
    assert build_model("esr9").config["conv_padding"] == "paper"
    m64 = build_model("esr9_div", num_branches=2, width=0.25, input_size=64)
    assert m64.conv_padding == "same"
    old = {k: v for k, v in m64.config.items() if k != "conv_padding"}    # a config written before the option
    assert build_model_from_config(old).conv_padding == "paper"           # as it was trained


def test_esr_forward_shapes_and_attention():
    m = build_model("esr9_div", num_branches=3, width=0.25).eval()
    x = torch.rand(5, 3, 96, 96)
    out = m(x, return_all_attention=True)
    assert out.branch_logits.shape == (3, 5, 8)
    assert out.logits.shape == (5, 8) and out.probs.shape == (5, 8)
    assert out.spatial_attention.shape == (3, 5, 6, 6)
    assert out.channel_attention.shape == (3, 5, 128)
    assert out.features.shape == (3, 5, 128, 6, 6)
    assert ((out.spatial_attention > 0) & (out.spatial_attention < 1)).all()
    assert len(out.layer_attention) == 4 + 3 * 4
    assert out.layer_attention["base.0"][1].shape == (5, 92, 92)
    torch.testing.assert_close(out.probs, out.branch_logits.softmax(-1).mean(0))
    torch.testing.assert_close(out.logits.exp(), out.probs)
    plain = build_model("esr9", num_branches=2, width=0.25)(torch.rand(2, 3, 64, 64))
    assert plain.spatial_attention is None and plain.branch_logits.shape == (2, 2, 8)
    gray = build_model("esr9", num_branches=1, width=0.25, in_channels=1)
    assert gray(torch.rand(2, 1, 96, 96)).logits.shape == (2, 8)
    with pytest.raises(ValueError, match="expects input"):
        gray(torch.rand(2, 3, 96, 96))


def test_plurality_vote_brute_force():
    torch.manual_seed(1)
    K = 4
    for _ in range(20):
        logits = torch.randn(5, 16, K)
        _, _, counts, votes = ensemble_from_logits(logits)
        preds = logits.argmax(-1)
        for b in range(16):
            c = [int((preds[:, b] == k).sum()) for k in range(K)]
            best = max(c)
            assert counts[b].tolist() == c
            assert votes[b].item() == c.index(best)          # ties to the lowest index
    # an explicit tie: two branches vote 3, two vote 1 -> class 1
    logits = torch.full((4, 1, K), -5.0)
    logits[0, 0, 3] = logits[1, 0, 3] = logits[2, 0, 1] = logits[3, 0, 1] = 5.0
    assert ensemble_from_logits(logits)[3].item() == 1


def test_branches_are_registered_modules():
    m = build_model("esr9_att", num_branches=3, width=0.25)
    keys = m.state_dict().keys()
    assert any(k.startswith("branches.2.") for k in keys)
    m.eval()
    assert all(not mod.training for mod in m.branches.modules())
    m.add_branch()
    assert m.num_branches == 4 and count_parameters(m) == count_parameters(m.base) + 4 * count_parameters(
        m.branches[0])
    m.add_branch("copy")
    for a, b in zip(m.branches[-1].parameters(), m.branches[-2].parameters()):
        assert torch.equal(a, b) and a is not b
    with pytest.raises(ValueError, match="init"):
        m.add_branch("zeros")


def test_esr_loss_matches_independent_computation():
    torch.manual_seed(2)
    m = build_model("esr9_div", num_branches=3, width=0.25, gamma=0.5)
    x, y = torch.rand(4, 3, 96, 96), torch.randint(0, 8, (4,))
    out = m(x)
    lo = m.loss(out, y)
    ce = sum(F.cross_entropy(out.branch_logits[l], y) for l in range(3))
    D_sp, _ = diversity(out.spatial_attention, gamma=0.5)
    D_ch, _ = diversity(out.channel_attention, gamma=0.5)
    torch.testing.assert_close(lo.total, ce - D_sp - D_ch)
    assert set(lo.in_loss) == {"spatial", "channel"}
    torch.testing.assert_close(lo.ce_total, ce)
    # soft targets
    soft = torch.softmax(torch.randn(4, 8), -1)
    lo_soft = m.loss(out, soft)
    ce_soft = sum(F.cross_entropy(out.branch_logits[l], soft) for l in range(3))
    torch.testing.assert_close(lo_soft.ce_total, ce_soft)


def test_monitoring_without_diversity_and_single_branch():
    m = build_model("esr9_att", num_branches=2, width=0.25, gamma=0.5)
    out = m(torch.rand(3, 3, 96, 96))
    lo = m.loss(out, torch.tensor([0, 1, 2]))
    assert lo.in_loss == () and set(lo.diversity) == {"spatial", "channel"}
    torch.testing.assert_close(lo.total, lo.ce_total)
    assert not lo.diversity["spatial"].requires_grad
    one = build_model("esr9_div", num_branches=1, width=0.25)
    lo1 = one.loss(one(torch.rand(2, 3, 96, 96)), torch.tensor([0, 1]))
    assert lo1.diversity == {} and torch.equal(lo1.total, lo1.ce_total)


def test_feature_diversity_without_attention():
    m = build_model("esr9", num_branches=2, width=0.25, diversity_terms=["spatial", "channel"])
    assert m.diversity_source == "features"
    out = m(torch.rand(2, 3, 96, 96))
    feats = m.learners(out)
    assert feats["spatial"].shape == (2, 2, 6, 6) and feats["channel"].shape == (2, 2, 128)
    with pytest.raises(ValueError, match="attention"):
        build_model("esr9", diversity_terms=["spatial"], diversity_source="attention")
    with pytest.raises(ValueError, match="branch"):
        build_model("esr9_att", diversity_terms=["branch"])


def test_registry_and_config_roundtrip():
    assert {"esr9", "esr9_att", "esr9_att_sp", "esr9_div", "esr15", "esr15_att", "esr15_att_sp",
            "esr15_div"} <= set(list_models())
    cfg = resolve_config("esr9_div")
    assert cfg["input_size"] == 96 and cfg["num_classes"] == 8 and cfg["diversity"]["gamma"] == 10.0
    assert cfg["diversity"]["terms"] == ["spatial", "channel"]
    assert resolve_config("esr9_att_sp")["diversity"]["terms"] == ["spatial"]
    assert resolve_config("esr9_div", gamma=3, diagonal="reference")["diversity"]["diagonal"] == "reference"
    with pytest.raises(ValueError, match="unknown model"):
        build_model("esr7")
    with pytest.raises(ValueError, match="unknown option"):
        build_model("esr9", depth=3)
    torch.manual_seed(3)
    m = build_model("esr9_div", num_branches=2, width=0.25, gamma=4.0).eval()
    m.add_branch()
    clone = build_model_from_config(m.config).eval()
    clone.load_state_dict(m.state_dict())
    x = torch.rand(2, 3, 96, 96)
    torch.testing.assert_close(clone(x).logits, m(x).logits)
    assert clone.diversity == m.diversity and clone.num_branches == 3
    assert isinstance(clone, ESR)


@pytest.mark.parametrize("channels_last", [False, True])
def test_cbam_fast_path_matches_autograd(channels_last):
    """CBAM's single hand-written autograd node equals autograd on the plain formulas:
    gradcheck in float64 (input and every parameter, gradients flowing in through the
    refined map and both attention outputs), and float32 against reference_forward."""
    from fer_lab.models.cbam import _Gating

    torch.manual_seed(4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cbam = CBAM(16, reduction=4).double().train()
    x = torch.randn(3, 16, 4, 5, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    params = tuple(cbam.parameters())
    assert torch.autograd.gradcheck(lambda x, *p: _Gating.apply(x, cbam, *p), (x, *params))
    cbam = CBAM(32).train()
    inp = torch.relu(torch.randn(4, 32, 9, 7)).contiguous(memory_format=fmt)
    a, b = inp.clone().requires_grad_(), inp.clone().requires_grad_()
    fast, ref = cbam(a), cbam.reference_forward(b)
    weights = [torch.randn_like(t) for t in fast]
    grads = []
    for out, leaf in ((fast, a), (ref, b)):
        cbam.zero_grad()
        sum((o * w).sum() for o, w in zip(out, weights)).backward()
        grads.append([leaf.grad] + [p.grad.clone() for p in cbam.parameters()])
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=1e-6, rtol=1e-6)
    for gf, gr in zip(*grads):
        torch.testing.assert_close(gf, gr, atol=1e-4, rtol=1e-4)
    assert a.grad.is_contiguous(memory_format=fmt)
    with torch.no_grad():                       # inference takes the same path without recording
        for f, r in zip(cbam(inp), cbam.reference_forward(inp)):
            torch.testing.assert_close(f, r, atol=1e-6, rtol=1e-6)


def test_cbam_path_switch():
    """cbam_path picks the hand-written node or the plain formulas for training (same numbers);
    'auto' follows FAST_PATH per device type; inference never records either."""
    from fer_lab.models import cbam as cb

    torch.manual_seed(0)
    m = CBAM(16, reduction=4).train()
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    node = m(x)
    assert type(node[0].grad_fn).__name__ == "_GatingBackward"
    with cb.cbam_path("plain"):
        plain = m(x)
        assert cb.training_path("cuda") == cb.training_path("cpu") == "plain"
    assert type(plain[0].grad_fn).__name__ != "_GatingBackward"
    for a, b in zip(node, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert cb.training_path("cpu") == cb.FAST_PATH["cpu"] and cb.training_path("cuda") == cb.FAST_PATH["cuda"]
    with pytest.raises(ValueError, match="cbam_path='fast'"):
        with cb.cbam_path("fast"):
            pass


def test_cbam_fast_path_under_flop_counter_and_hooks():
    """Module hooks and FlopCounterMode (whose module tracker hooks every module's inputs)
    work through CBAM's node, and count its gate networks' FLOPs in both directions."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(6)
    cbam = CBAM(16, reduction=4).train()
    seen = []
    cbam.register_full_backward_hook(lambda mod, gin, gout: seen.append(gin[0].shape))
    x = torch.relu(torch.randn(2, 16, 6, 6)).requires_grad_()
    with FlopCounterMode(display=False) as counter:
        sum(o.sum() for o in cbam(x)).backward()
    conv = 2 * 2 * 49 * 2 * 36            # 7x7 conv, 2 -> 1 channels, 2 images of 6x6: 2 FLOPs per MAC
    mlp = 2 * 4 * (16 * 4 + 4 * 16)       # both layers on 2 x 2 pooled vectors
    assert counter.get_total_flops() >= 3 * (conv + mlp)   # forward + both backward products
    assert seen == [torch.Size([2, 16, 6, 6])] and x.grad is not None


def test_cbam_fast_path_partial_gradients():
    """Frozen gate parameters, an input that needs no gradient, and outputs left unused
    (only one attention map in the loss) all give autograd's answer."""
    torch.manual_seed(5)
    cbam = CBAM(16, reduction=4).train()
    for p in cbam.channel_gate.parameters():
        p.requires_grad_(False)
    x = torch.relu(torch.randn(2, 16, 6, 6))
    for needs_x, pick in ((True, 1), (True, 2), (False, 2)):   # (False, 1): nothing needs a gradient
        grads = []
        for fn in (cbam, cbam.reference_forward):
            cbam.zero_grad()
            leaf = x.clone().requires_grad_(needs_x)
            fn(leaf)[pick].pow(2).sum().backward()
            grads.append([leaf.grad] + [p.grad for p in cbam.spatial_gate.parameters()])
        for gf, gr in zip(*grads):
            if gr is None:
                assert gf is None
            else:
                torch.testing.assert_close(gf, gr, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cbam_fast_path_few_channels(dtype):
    """With fewer channels than a SIMD register holds (channels-last), the node writes the spatial
    operands out at full size instead of broadcasting them, and adds the two max-pool gradients
    by index on the map's flat memory: gradcheck in float64 (4 channels); in bf16 (8 channels)
    the node's gradients are as close to the plain formulas' in float64, from the same input,
    as autograd's in bf16 are."""
    from fer_lab.models.cbam import _VECTOR_BYTES, _Gating, _over_channels

    torch.manual_seed(7)
    cl = torch.channels_last
    if dtype == torch.float64:
        cbam = CBAM(4, reduction=2).double().train()
        x = torch.randn(2, 4, 5, 3, dtype=dtype).contiguous(memory_format=cl).requires_grad_()
        assert 4 * 8 < _VECTOR_BYTES and _over_channels(x[:, 0].detach(), x).stride()[1] == 1   # written out
        assert torch.autograd.gradcheck(lambda x, *p: _Gating.apply(x, cbam, *p), (x, *cbam.parameters()))
        return
    # 8 channels (16 bytes a position); values 4^k (1 + u / 10) with k a permutation of the channels
    # at every position: no two channels within a factor 1.5 of each other after the channel gate,
    # so the channel argmax is the same in bf16 and float64 and the comparison is not about ties
    cbam = CBAM(8, reduction=2).train()
    k = torch.argsort(torch.rand(4, 10, 10, 8), dim=-1).permute(0, 3, 1, 2).double()
    inp = (4.0 ** (k - 4) * (1 + torch.rand(k.shape, dtype=torch.float64) / 10)).to(dtype).contiguous(memory_format=cl)

    def grads(fn, amp):
        cbam.zero_grad()
        leaf = (inp if amp else inp.double()).clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            outs = fn(leaf)
        # weights that reach every path: refined map, both maps (the spatial map through smax/smean)
        sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape)).sum()
            for o in outs).backward()
        return [leaf.grad.double()] + [p.grad.double().clone() for p in cbam.parameters()]

    node, plain = grads(cbam, True), grads(cbam.reference_forward, True)
    cbam.double()
    truth = grads(cbam.reference_forward, False)        # the plain formulas in float64, same input
    assert node[0].dtype == torch.float64 and inp.requires_grad is False
    for n, p, t in zip(node, plain, truth):
        err_node, err_plain = (n - t).abs().max().item(), (p - t).abs().max().item()
        assert err_node <= 2 * err_plain + 1e-3 * t.abs().max().item(), (err_node, err_plain)


def test_cbam_add_at_any_dense_layout():
    """The index-add of the backward works on any dense memory order (not only NCHW and
    channels-last), sums repeated positions, and refuses a strided view."""
    from fer_lab.models.cbam import _add_at_

    m = torch.zeros(2, 3, 4, 5).permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)   # (B, H, C, W) memory
    b, c, h, w = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 0]), torch.tensor([3, 1, 1]), torch.tensor([4, 0, 0])
    _add_at_(m, b, c, h, w, torch.tensor([1.0, 2.0, 3.0]))
    expected = torch.zeros(2, 3, 4, 5)
    expected[0, 2, 3, 4], expected[1, 0, 1, 0] = 1.0, 5.0
    assert torch.equal(m, expected)
    with pytest.raises(RuntimeError, match="dense"):
        _add_at_(torch.zeros(2, 3, 4, 10)[..., ::2], b, c, h, w, torch.ones(3))
