"""Fused execution of ESR's branches: all ``L`` branches as one set of grouped convolutions.

:class:`~fer_lab.models.esr.ESR` keeps its branches as an ``nn.ModuleList`` of
:class:`~fer_lab.models.esr.Branch` modules (state_dict, checkpoints, ``add_branch`` and
parameter counts are those of the loop). This file is an *execution strategy* over
those same parameters and buffers: at each call it concatenates the ``L`` branches'
weights and runs every layer once for all branches,

- first branch conv: one dense conv with ``L*C_out`` output channels on the shared map;
- later convs: ``groups=L`` (branch ``l`` owns channel group ``l``);
- BatchNorm: ``F.batch_norm`` over ``L*C`` channels with the concatenated running
  statistics, copied back to each branch's buffers in training mode (so the running
  mean/var and ``num_batches_tracked`` end up exactly as the loop leaves them, with each
  BN's own momentum: 0.1 for the conv BNs, 0.01 for CBAM's spatial BN);
- CBAM: the channel MLP as batched matmuls (``(L, 2B, C)``), channel max/mean over each
  branch's own channel group, the 7x7 spatial conv as a grouped conv (``2L -> L``);
- max-pool (before or after the CBAM, as the blocks say) and global average pooling per channel, the ``fc`` heads as a batched matmul.

Gradients flow to the per-branch parameters through the concatenations. (Grouped
convolutions rather than ``torch.func.stack_module_state`` + ``vmap``: under ``vmap``
training-mode BatchNorm cannot update the per-branch running statistics in place.) The outputs
equal the loop's up to float rounding (``tests/test_fused.py`` checks 1e-5).

Not here: the choice between loop and fused (``ESR.branch_execution``), the base, the
ensemble and the loss. Module hooks on branch submodules (Grad-CAM's forward hooks on
``block.out``) do not fire in this path, so ESR falls back to the loop when any are
registered; BatchNorm layers that are not plain ``nn.BatchNorm2d``, or whose settings
differ between branches (train/eval mode, eps, momentum, cumulative ``momentum=None``),
run per branch on their channel group, which is exact but not fused.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["fused_branches_forward", "branch_hooks_registered"]


def branch_hooks_registered(modules: nn.Module) -> bool:
    """Whether any module under ``modules`` (or a global module hook) would expect to be called.

    The fused path never calls the branch submodules, so their forward/backward hooks
    (e.g. Grad-CAM's on ``block.out``) would silently not fire; callers use the loop then.
    """
    from torch.nn.modules import module as _m

    globals_ = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks")
    if any(getattr(_m, g, None) for g in globals_):
        return True
    attrs = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(m, a, None) for m in modules.modules() for a in attrs)


# ---- layers over all branches --------------------------------------------------------------
def _conv(x: torch.Tensor, convs: Sequence[nn.Conv2d], shared_input: bool) -> torch.Tensor:
    """``L`` convs as one: ``(B, Cin, H, W)`` (shared) or ``(B, L*Cin, H, W)`` -> ``(B, L*Cout, H', W')``."""
    c = convs[0]
    if c.groups != 1 or c.padding_mode != "zeros":
        raise ValueError("fused branch execution supports ungrouped, zero-padded convolutions only")
    weight = torch.cat([m.weight for m in convs])
    bias = torch.cat([m.bias for m in convs]) if c.bias is not None else None
    return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, 1 if shared_input else len(convs))


def _bn_fusable(bns: Sequence[nn.Module]) -> bool:
    first = bns[0]
    if first.momentum is None:          # cumulative average: factor depends on each branch's counter
        return False
    for bn in bns:
        if type(bn) is not nn.BatchNorm2d:
            return False
        if (bn.training != first.training or bn.eps != first.eps or bn.momentum != first.momentum
                or bn.track_running_stats != first.track_running_stats or bn.affine != first.affine
                or (bn.running_mean is None) != (first.running_mean is None)):
            return False
    return True


def _batch_norm(x: torch.Tensor, bns: Sequence[nn.BatchNorm2d]) -> torch.Tensor:
    """``L`` BatchNorms over ``(B, L*C, H, W)``, updating each one's buffers as its own forward would."""
    if not _bn_fusable(bns):
        return torch.cat([bn(part) for bn, part in zip(bns, x.chunk(len(bns), dim=1))], dim=1)
    first = bns[0]
    if first.training and first.track_running_stats and first.num_batches_tracked is not None:
        for bn in bns:
            bn.num_batches_tracked.add_(1)
    use_stats = (not first.training or first.track_running_stats) and first.running_mean is not None
    bn_training = first.training or not use_stats
    mean = torch.cat([bn.running_mean for bn in bns]) if use_stats else None
    var = torch.cat([bn.running_var for bn in bns]) if use_stats else None
    weight = torch.cat([bn.weight for bn in bns]) if first.affine else None
    bias = torch.cat([bn.bias for bn in bns]) if first.affine else None
    y = F.batch_norm(x, mean, var, weight, bias, bn_training, first.momentum, first.eps)
    if use_stats and bn_training:       # F.batch_norm updated the concatenated copies in place
        with torch.no_grad():
            sizes = [bn.num_features for bn in bns]
            for bn, m, v in zip(bns, mean.split(sizes), var.split(sizes)):
                bn.running_mean.copy_(m)
                bn.running_var.copy_(v)
    return y


def _linear_stack(linears: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked ``(L, in, out)`` weights (transposed for ``bmm``) and ``(L, 1, out)`` biases."""
    w = torch.stack([m.weight for m in linears]).transpose(1, 2)
    b = torch.stack([m.bias for m in linears]).unsqueeze(1)
    return w, b


def _cbam(x: torch.Tensor, cbams: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L`` CBAMs on ``(B, L*C, H, W)`` -> refined ``(B, L*C, H, W)``, channel attention
    ``(L, B, C)``, spatial attention ``(L, B, H, W)``."""
    B, LC, H, W = x.shape
    L = len(cbams)
    C = LC // L
    # channel gate: MLP(avg) + MLP(max), both pooled vectors of all branches in one bmm per layer
    avg = F.adaptive_avg_pool2d(x, 1).view(B, L, C)
    mx = F.adaptive_max_pool2d(x, 1).view(B, L, C)
    v = torch.cat([avg, mx]).transpose(0, 1)                                   # (L, 2B, C)
    mlps = [c.channel_gate.mlp for c in cbams]
    w1, b1 = _linear_stack([m[0] for m in mlps])
    w2, b2 = _linear_stack([m[2] for m in mlps])
    h = F.relu(torch.baddbmm(b1, v, w1))                                        # (L, 2B, C/r)
    o = torch.baddbmm(b2, h, w2)                                                # (L, 2B, C)
    ca = torch.sigmoid(o[:, :B] + o[:, B:])                                     # (L, B, C)
    x5 = x.unflatten(1, (L, C)) * ca.transpose(0, 1)[..., None, None]          # (B, L, C, H, W)
    # spatial gate: channel max and mean within each branch's group -> grouped 7x7 conv (2L -> L)
    pooled = torch.stack([x5.max(dim=2).values, x5.mean(dim=2)], dim=2).flatten(1, 2)   # (B, 2L, H, W)
    gates = [c.spatial_gate for c in cbams]
    z = _conv(pooled, [g.conv for g in gates], shared_input=False)             # (B, L, H, W)
    sa = torch.sigmoid(_batch_norm(z, [g.bn for g in gates]))                  # (B, L, H, W)
    out = (x5 * sa[:, :, None]).flatten(1, 2)                                   # (B, L*C, H, W)
    return out, ca, sa.transpose(0, 1)


def fused_branches_forward(branches: Sequence[nn.Module], shared: torch.Tensor, attention: bool,
                           all_attention: list | None = None):
    """Run every ESR branch on ``shared`` at once (grouped convolutions over the branches).

    Args:
        branches: the ``L`` :class:`~fer_lab.models.esr.Branch` modules (same layout).
        shared: the base's output ``(B, C0, H, W)`` (any memory format).
        attention: whether the branches have CBAM (must match the modules).
        all_attention: if a list, it receives one ``(channel (L, B, C_j), spatial (L, B, H_j,
            W_j))`` pair per conv block (``None`` entries without attention).

    Returns ``(branch_logits (L, B, K), features (L, B, C, h, w), channel attention
    (L, B, C) or None, spatial attention (L, B, h, w) or None)``: the same values as calling
    each branch (``features``/attention are views of ``(B, L, ...)`` tensors).
    """
    branches = list(branches)
    L = len(branches)
    if L == 0:
        raise ValueError("fused_branches_forward needs at least one branch")
    blocks = list(zip(*[b.convs.blocks for b in branches]))          # per depth: the L branches' blocks
    if any((blk.cbam is not None) != bool(attention) for blk in blocks[0]):
        raise ValueError(f"attention={attention} does not match the branches' CBAM modules")
    x = shared
    ca = sa = None
    for depth, group in enumerate(blocks):
        x = _conv(x, [blk.conv for blk in group], shared_input=depth == 0)
        x = F.relu(_batch_norm(x, [blk.bn for blk in group]), inplace=True)
        pool = group[0].pool
        pool_first = getattr(group[0], "pool_first", False)     # CBAM after the pooling (the paper's code)
        if pool is not None and pool_first:
            x = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        ca = sa = None
        if attention:
            x, ca, sa = _cbam(x, [blk.cbam for blk in group])
        if all_attention is not None:
            all_attention.append((ca, sa) if attention else None)
        if pool is not None and not pool_first:
            x = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
    B, LC, h, w = x.shape
    features = x.unflatten(1, (L, LC // L)).transpose(0, 1)             # (L, B, C, h, w)
    pooled = x.mean(dim=(2, 3)).view(B, L, LC // L).transpose(0, 1)     # (L, B, C)
    fc_w, fc_b = _linear_stack([b.fc for b in branches])
    logits = torch.baddbmm(fc_b, pooled, fc_w)                          # (L, B, K)
    return logits, features, ca, sa
