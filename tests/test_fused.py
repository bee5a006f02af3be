"""ESR's fused branch execution (grouped convolutions) against the loop over branches.

Same outputs, loss, gradients and BatchNorm statistics (float32 to 1e-5, float64 to 1e-9),
after ``add_branch``, with channels-last inputs, with the fallbacks (hooks, per-branch BN
settings), and the ``branch_execution`` option in ``model.config``.
"""
import copy

import pytest
import torch

from fer_lab.models import ESR, build_model, build_model_from_config, count_parameters
from fer_lab.models.fused import branch_hooks_registered, fused_branches_forward

ATOL = 1e-5


def _pair(name="esr9_div", seed=0, **kw):
    """A loop model and a fused deep copy of it (same initial parameters and buffers)."""
    torch.manual_seed(seed)
    kw = {"num_branches": 3, "width": 0.25, **kw}
    loop = build_model(name, **kw)
    fused = copy.deepcopy(loop)
    fused.branch_execution = "fused"
    return loop, fused


def _batch(n=4, size=96, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g).to(dtype), torch.randint(0, 8, (n,), generator=g)


def _close(a, b, atol=ATOL):
    """``|a - b| <= atol * max(1, max |a|)`` (absolute tolerance relative to the tensor's scale)."""
    assert a.shape == b.shape
    scale = max(1.0, float(a.detach().abs().max()))
    torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=atol * scale)


def _same_outputs(oa, ob, atol=ATOL):
    for field in ("branch_logits", "probs", "logits", "features", "channel_attention", "spatial_attention"):
        a, b = getattr(oa, field), getattr(ob, field)
        assert (a is None) == (b is None), field
        if a is not None:
            _close(a, b, atol)
    assert torch.equal(oa.votes, ob.votes) and torch.equal(oa.vote_counts, ob.vote_counts)


def _same_grads(ma, mb, atol=ATOL):
    pa, pb = list(ma.parameters()), list(mb.parameters())
    assert all(p.grad is not None for p in pb), "every (per-branch) parameter gets a gradient"
    scale = max(1.0, max(float(p.grad.abs().max()) for p in pa))
    for (n, p), q in zip(ma.named_parameters(), pb):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=atol * scale, msg=lambda m: f"{n}: {m}")


def _same_buffers(ma, mb, atol=ATOL):
    for (n, a), b in zip(ma.named_buffers(), mb.buffers()):
        if n.endswith("num_batches_tracked"):
            assert torch.equal(a, b), n
        else:
            torch.testing.assert_close(b, a, rtol=0, atol=atol, msg=lambda m: f"{n}: {m}")


def _same_training_step(loop, fused, batch):
    """One forward and backward of both on ``batch``: outputs, gradients and buffers agree."""
    x, y = batch
    oa, ob = loop(x), fused(x)
    _same_outputs(oa, ob)
    loop.loss(oa, y).total.backward()
    fused.loss(ob, y).total.backward()
    _same_grads(loop, fused)
    _same_buffers(loop, fused)


@pytest.mark.parametrize("name", ["esr9_div", "esr9"])
@pytest.mark.parametrize("train", [False, True])
def test_fused_matches_loop(name, train):
    loop, fused = _pair(name, gamma=1.0) if name == "esr9_div" else _pair(name)
    loop.train(train)
    fused.train(train)
    x, y = _batch()
    oa, ob = loop(x), fused(x)
    _same_outputs(oa, ob)
    assert ob.features.shape == (3, 4, 128, 6, 6) and ob.branch_logits.shape == (3, 4, 8)
    la, lb = loop.loss(oa, y), fused.loss(ob, y)
    _close(la.total, lb.total)
    for term in la.diversity:
        _close(la.diversity[term], lb.diversity[term])
    la.total.backward()
    lb.total.backward()
    _same_grads(loop, fused)
    _same_buffers(loop, fused)     # train mode: updated once, identically; eval: untouched


def test_fused_is_exact_in_float64():
    loop, fused = _pair("esr9_div", gamma=1.0)
    loop.double().train()
    fused.double().train()
    x, y = _batch(dtype=torch.float64)
    oa, ob = loop(x), fused(x)
    _same_outputs(oa, ob, atol=1e-9)
    loop.loss(oa, y).total.backward()
    fused.loss(ob, y).total.backward()
    _same_grads(loop, fused, atol=1e-9)
    _same_buffers(loop, fused, atol=1e-12)


def test_running_stats_after_training_steps():
    """Three SGD steps in each mode from one initial state: the same parameters and BatchNorm
    buffers. In float64, because float32 training of this model is chaotic whatever the
    execution: after 3 steps two float32 loops (NCHW vs channels-last) already differ by
    ~1e-3 in the base's weights (fused vs loop: ~4e-4); in float64 they stay within 1e-15."""
    loop, fused = _pair("esr9_div", gamma=1.0)
    loop.double()
    fused.double()
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (loop, fused)]
    for step in range(3):
        x, y = _batch(seed=10 + step, dtype=torch.float64)
        for m, opt in zip((loop, fused), opts):
            m.train()
            opt.zero_grad()
            m.loss(m(x), y).total.backward()
            opt.step()
    _same_buffers(loop, fused, atol=1e-10)
    for a, b in zip(loop.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    gates = [b.convs.blocks[0].cbam.spatial_gate.bn for b in fused.branches]
    assert all(g.momentum == 0.01 and int(g.num_batches_tracked) == 3 for g in gates)
    assert not torch.equal(gates[0].running_mean, torch.zeros_like(gates[0].running_mean))
    for m in (loop, fused):
        m.eval()
    x, _ = _batch(seed=20, dtype=torch.float64)
    _same_outputs(loop(x), fused(x), atol=1e-9)


def test_running_stats_float32_several_batches():
    """Float32, fixed parameters: running statistics accumulated over several train-mode
    batches (momentum 0.1 for conv BNs, 0.01 for CBAM's spatial BN) match the loop's."""
    loop, fused = _pair("esr9_div")
    for m in (loop, fused):
        m.train()
    with torch.no_grad():
        for step in range(4):
            x, _ = _batch(seed=30 + step)
            _same_outputs(loop(x), fused(x))
    _same_buffers(loop, fused)
    assert int(fused.branches[2].convs.blocks[3].bn.num_batches_tracked) == 4


def test_all_attention_and_channels_last():
    loop, fused = _pair("esr9_att")
    loop = loop.to(memory_format=torch.channels_last).eval()
    fused = fused.to(memory_format=torch.channels_last).eval()
    x = _batch()[0].contiguous(memory_format=torch.channels_last)
    oa, ob = loop(x, return_all_attention=True), fused(x, return_all_attention=True)
    _same_outputs(oa, ob)
    assert oa.layer_attention.keys() == ob.layer_attention.keys() and len(ob.layer_attention) == 4 + 3 * 4
    for k, (ca, sa) in oa.layer_attention.items():
        _close(ca, ob.layer_attention[k][0])
        _close(sa, ob.layer_attention[k][1])
    # channels-last input into a contiguous model, in training mode, with gradients
    loop2, fused2 = _pair("esr9_div", gamma=1.0)
    x, y = _batch()
    xc = x.contiguous(memory_format=torch.channels_last)
    oa, ob = loop2(xc), fused2(xc)
    _same_outputs(oa, ob)
    loop2.loss(oa, y).total.backward()
    fused2.loss(ob, y).total.backward()
    _same_grads(loop2, fused2)


@pytest.mark.parametrize("init", ["random", "copy"])
def test_fused_after_add_branch(init):
    loop, fused = _pair("esr9_div", num_branches=2, gamma=1.0)
    torch.manual_seed(5)
    loop.add_branch(init)
    torch.manual_seed(5)
    fused.add_branch(init)
    assert fused.num_branches == 3 and fused.branch_execution == "fused"
    _same_training_step(loop, fused, _batch(size=64))


def test_state_dict_parameters_and_config_unchanged():
    loop, fused = _pair("esr9_div")
    assert list(loop.state_dict()) == list(fused.state_dict())
    assert count_parameters(fused) == count_parameters(loop)
    assert ESR().branch_execution == "loop"
    assert fused.config["branch_execution"] == "fused" and loop.config["branch_execution"] == "loop"
    assert {k: v for k, v in fused.config.items() if k != "branch_execution"} == \
        {k: v for k, v in loop.config.items() if k != "branch_execution"}
    clone = build_model_from_config(fused.config)
    assert isinstance(clone, ESR) and clone.branch_execution == "fused"
    clone.load_state_dict(loop.state_dict())
    clone.eval()
    loop.eval()
    x = _batch(size=64)[0]
    _same_outputs(loop(x), clone(x))
    # an old config without the key builds the default
    old = {k: v for k, v in loop.config.items() if k != "branch_execution"}
    assert build_model_from_config(old).branch_execution == "loop"
    assert build_model("esr9", num_branches=1, width=0.25, branch_execution="fused").branch_execution == "fused"
    fused.branch_execution = "loop"
    assert fused.config["branch_execution"] == "loop"
    with pytest.raises(ValueError, match="branch_execution"):
        fused.branch_execution = "vmap"
    with pytest.raises(ValueError, match="branch_execution"):
        build_model("esr9", branch_execution="grouped")


def test_hooks_fall_back_to_loop():
    """Forward hooks on branch modules (Grad-CAM's) still fire: the fused model runs the loop."""
    loop, fused = _pair("esr9_att")
    fused.eval()
    seen = []
    handle = fused.cam_targets()["branch_2"].module.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    assert branch_hooks_registered(fused.branches)
    out = fused(_batch(size=64)[0])
    assert seen == [(4, 128, 2, 2)] and out.branch_logits.shape == (3, 4, 8)
    handle.remove()
    assert not branch_hooks_registered(fused.branches)
    fused(_batch(size=64)[0])
    assert len(seen) == 1


def test_grad_cam_same_maps():
    pytest.importorskip("pytorch_grad_cam")
    from fer_lab.cam import grad_cam

    loop, fused = _pair("esr9_att")
    x = _batch(n=2, size=64)[0]
    for head in ("branch_2", "ensemble"):      # a branch's own layer (hooked: loop) and the base's
        torch.testing.assert_close(grad_cam(fused, x, head, targets=[1, 3]),
                                   grad_cam(loop, x, head, targets=[1, 3]), rtol=0, atol=1e-4)


def test_per_branch_batchnorm_fallback():
    """BNs whose settings differ between branches (one branch's BN frozen in eval mode, a
    cumulative ``momentum=None`` BN) run per branch and still match the loop."""
    loop, fused = _pair("esr9_div", gamma=1.0)
    for m in (loop, fused):
        m.train()
        m.branches[1].convs.blocks[0].bn.eval()
        for b in m.branches:
            b.convs.blocks[2].bn.momentum = None
    _same_training_step(loop, fused, _batch(size=64))


def test_fused_branches_forward_directly():
    torch.manual_seed(0)
    m = build_model("esr9_att", num_branches=2, width=0.25).eval()
    shared, _ = m.base(_batch(n=2, size=64)[0])
    logits, feats, ca, sa = fused_branches_forward(m.branches, shared, attention=True)
    for l, branch in enumerate(m.branches):
        lg, f, atts = branch(shared)
        _close(lg, logits[l])
        _close(f, feats[l])
        _close(atts[-1][0], ca[l])
        _close(atts[-1][1], sa[l])
    with pytest.raises(ValueError, match="attention"):
        fused_branches_forward(m.branches, shared, attention=False)
    plain = build_model("esr9", num_branches=2, width=0.25).eval()
    shared, _ = plain.base(_batch(n=2, size=64)[0])
    assert fused_branches_forward(plain.branches, shared, attention=False)[2:] == (None, None)
