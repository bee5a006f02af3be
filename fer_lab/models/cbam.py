"""CBAM (Woo et al. 2018) as used by diversified ESR and MA-Net (SPEC section 2).

Channel gate then spatial gate; both attention maps are returned because they are
what the notebooks show and what ESR diversifies. Nothing else lives here.

In training, a CBAM is one autograd node (:class:`_Gating`): the work on the full
``(B, C, H, W)`` map (pooling it over H, W and over C, scaling it by the two attention
maps, and the matching backward products) is written out by hand, and only the small
gate networks are left to autograd. It computes what autograd computes from the plain
formulas (:meth:`CBAM.reference_forward`; tested with ``gradcheck`` and to 1e-6) in
about 8 passes over the map forward and 9 backward, with one gradient for the input
instead of three summed partial ones; with the spatial gate's conv on a channels-last
stack it brings ESR*-9's CPU training step close to plain ESR-9's (``bench/train_step.py``,
numbers in ``bench/RESULTS.md``). Under ``torch.compile`` CBAM runs the plain formulas:
dynamo breaks the graph at the node's inner autograd; on a CPU the compiled formulas are
slower than the eager node (``bench/RESULTS.md``). Double backward (``create_graph=True``)
through the node is not supported.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable


#: How a CBAM trains on each device type: ``"node"`` (the hand-written autograd node below) or
#: ``"plain"`` (the plain formulas, :meth:`CBAM.reference_forward`, differentiated by autograd).
#: Chosen per measurement: ``bench/train_step.py`` (CPU) and ``bench/gpu.py`` (CUDA), numbers in
#: ``bench/RESULTS.md``. Same results up to float round-off either way.
FAST_PATH = {"cpu": "node", "cuda": "node"}
CBAM_PATHS = ("auto", "node", "plain")
_PATH = contextvars.ContextVar("cbam_path", default="auto")


@contextlib.contextmanager
def cbam_path(path: str = "auto"):
    """Within the block, CBAMs train with ``path`` (``"node"``, ``"plain"``, or ``"auto"``:
    :data:`FAST_PATH` of the input's device type). The training engine sets it from
    ``runtime.cbam_path``; benchmarks compare the paths with it."""
    if path not in CBAM_PATHS:
        raise ValueError(f"cbam_path={path!r}: expected one of {CBAM_PATHS}")
    token = _PATH.set(path)
    try:
        yield
    finally:
        _PATH.reset(token)


def training_path(device_type: str) -> str:
    """The path a CBAM on ``device_type`` trains with now (see :func:`cbam_path`)."""
    path = _PATH.get()
    return FAST_PATH.get(device_type, "node") if path == "auto" else path


def _gating(x: torch.Tensor, module: "CBAM", record: bool):
    """CBAM's forward on the full map with hand-written pooling and scaling.

    Returns ``(out, ca, sa, state)``; with ``record`` the two small gate networks are
    recorded by autograd (on detached copies of their inputs) and ``state`` holds what
    :meth:`_Gating.backward` needs.
    """
    # adaptive max-pooling's kernel is ~10x faster than amax over a channels-last map
    mx, idx_hw = F.adaptive_max_pool2d(x, 1, return_indices=True)
    pooled = [x.mean(dim=(2, 3)).detach().requires_grad_(record), mx.flatten(1).detach().requires_grad_(record)]
    with torch.set_grad_enabled(record):
        ca_graph = module.channel_gate.gate(*pooled)
    ca = ca_graph.detach()
    out = x * ca.to(x.dtype)[:, :, None, None]
    # the argmax is only needed for a backward pass; amax alone is ~2.5x faster
    smax, idx_c = out.max(dim=1) if record else (out.amax(dim=1), None)
    stats = [smax.detach().requires_grad_(record), out.mean(dim=1).detach().requires_grad_(record)]
    with torch.set_grad_enabled(record):
        sa_graph = module.spatial_gate.gate(*stats)
    sa = sa_graph.detach()
    out.mul_(_over_channels(sa, out))      # x * ca scaled in place: no second product with x
    state = (idx_hw.flatten(1), idx_c, ca_graph, pooled, sa_graph, stats) if record else None
    return out, ca, sa, state


def _sum_hw(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sum_hw m[b, c, h, w] v[b, h, w]`` as ``(B, C)``.

    A batched vector-times-matrix product with the vector on the left: 3-4x faster than
    the same product with the vector on the right, for both memory formats.
    """
    B, C, H, W = m.shape
    return torch.matmul(v.reshape(B, 1, H * W), m.flatten(2).transpose(1, 2)).squeeze(1)


def _channels_last(m: torch.Tensor) -> bool:
    return m.dim() == 4 and m.shape[1] > 1 and m.is_contiguous(memory_format=torch.channels_last)


def _sum_c(m: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``sum_c m[b, c, h, w] u[b, c]`` as ``(B, H, W)``: a matrix-vector product on the map as it
    lies in memory (channels-last: ``(B, HW, C) @ u``; NCHW: ``u @ (B, C, HW)``), never a copy of it."""
    B, C, H, W = m.shape
    if _channels_last(m):
        return torch.matmul(m.permute(0, 2, 3, 1).reshape(B, H * W, C), u.unsqueeze(2)).view(B, H, W)
    return torch.matmul(u.unsqueeze(1), m.flatten(2)).view(B, H, W)


#: bytes in one SIMD register of this CPU: a binary op that broadcasts along the innermost dim
#: stays vectorised only when that dim fills a register
_VECTOR_BYTES = 64 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 32


def _over_channels(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``v`` ``(B, H, W)`` as the operand of an elementwise op with the map ``m`` ``(B, C, H, W)``:
    the broadcast view ``v[:, None]``, or, where that broadcast leaves the vectorised loop (a CPU
    map in channels-last whose C channels fill less than a SIMD register, e.g. bf16 with C = 16:
    3-4x slower), ``v`` written out at ``m``'s full size (one cheap pass)."""
    b = v.to(m.dtype)[:, None]
    if m.device.type == "cpu" and _channels_last(m) and m.shape[1] * m.element_size() < _VECTOR_BYTES:
        return b.expand(m.shape).contiguous(memory_format=torch.channels_last)
    return b


def _flat(m: torch.Tensor) -> torch.Tensor:
    """``m``'s elements as the 1-D view of its memory; ``m`` must be dense (any dim order)."""
    expect = 1
    for stride, size in sorted((st, n) for st, n in zip(m.stride(), m.shape) if n > 1):
        if stride != expect:
            raise RuntimeError(f"CBAM backward: expected a dense map, got strides {m.stride()} for shape {tuple(m.shape)}")
        expect *= size
    return m.as_strided((m.numel(),), (1,), m.storage_offset())


def _add_at_(m: torch.Tensor, b, c, h, w, values: torch.Tensor) -> None:
    """``m[b, c, h, w] += values`` in place for index tensors ``b, c, h, w`` (broadcast together),
    repeated positions summed: one ``index_add_`` on the flat memory of ``m``. A ``scatter_add_``
    along a dim copies the whole map in and out where that dim is strided, or the dtype bf16."""
    sb, sc, sh, sw = m.stride()
    offset = b * sb + c * sc + h * sh + w * sw
    _flat(m).index_add_(0, offset.flatten(), values.expand(offset.shape).flatten())


def _grad(output: torch.Tensor, inputs: list, grad_output: torch.Tensor) -> list:
    """``torch.autograd.grad`` over the inputs that require it (``None`` for the others)."""
    wanted = [t for t in inputs if t.requires_grad]
    # retain_graph: the recorded gates are small, and a retained outer graph may be differentiated again
    got = iter(torch.autograd.grad(output, wanted, grad_output.to(output.dtype), retain_graph=True) if wanted else ())
    return [next(got) if t.requires_grad else None for t in inputs]


class _Gating(Function):
    """CBAM as one autograd node: ``(x, module, *params) -> (x * ca * sa, ca, sa)``.

    The full-size work (pooling ``x`` over H, W and over C, scaling it by the two
    attention maps, and the matching backward products) is written out; the small gate
    networks (the channel MLP on ``(B, C)`` vectors; the 7x7 conv and BatchNorm on
    ``(B, 2, H, W)``) are differentiated by autograd inside the backward. One node gives
    ``x`` one gradient (no sum of three full-size partial gradients). ``params`` are the
    module's parameters, passed so that autograd knows this node produces their gradients.
    """

    @staticmethod
    def forward(ctx, x, module, *params):
        ctx.set_materialize_grads(False)    # unused outputs arrive as None, not as zero maps
        out, ca, sa, state = _gating(x, module, record=True)
        idx_hw, idx_c, *ctx.graphs = state
        ctx.save_for_backward(x, idx_hw, idx_c)
        ctx.params = params
        ctx.n_channel = len(list(module.channel_gate.parameters()))
        return out, ca, sa

    @staticmethod
    @once_differentiable
    def backward(ctx, g, g_ca, g_sa):
        x, idx_hw, idx_c = ctx.saved_tensors
        ca_graph, pooled, sa_graph, stats = ctx.graphs
        channel_params, spatial_params = ctx.params[:ctx.n_channel], ctx.params[ctx.n_channel:]
        B, C, H, W = x.shape
        ca, sa = ca_graph.detach().to(x.dtype), sa_graph.detach().to(x.dtype)
        d_ca = torch.zeros_like(ca) if g_ca is None else g_ca.to(x.dtype)
        d_sa, buf = g_sa, None
        if g is not None:
            # out = x * ca * sa: to ca, sum_hw g x sa; to sa, sum_c g x ca
            # the only fresh full-size tensor (laid out as x): reused for dx below (fresh pages cost faults)
            buf = torch.mul(g, x, out=torch.empty_like(x))
            d_ca = d_ca + _sum_hw(buf, sa)
            d_sa_out = _sum_c(buf, ca)
            d_sa = d_sa_out if d_sa is None else d_sa + d_sa_out
        d_smax = d_smean = None
        d_spatial = [None] * len(spatial_params)
        if d_sa is not None:
            d_smax, d_smean, *d_spatial = _grad(sa_graph, stats + list(spatial_params), d_sa)
            d_smax, d_smean = d_smax.to(x.dtype), d_smean.to(x.dtype) / C
            # smean = mean_c x ca, smax = max_c x ca: to ca, sum_hw x d_smean / C and x at the argmax
            d_ca = d_ca + _sum_hw(x, d_smean)
            d_ca.scatter_add_(1, idx_c.flatten(1), (x.gather(1, idx_c[:, None]).squeeze(1) * d_smax).flatten(1))
        d_avg, d_max, *d_channel = _grad(ca_graph, pooled + list(channel_params), d_ca)
        dx = None
        if ctx.needs_input_grad[0]:
            # dx = ca (g sa + d_smean / C) + d_avg / HW, plus the two max-pool scatters; g sa and
            # + d_smean as two binary ops: a ternary addcmul broadcasting along channels-last's C is
            # not vectorised (3x slower than the pair, bench/train_step.py --small-widths)
            dx = torch.zeros_like(x) if g is None else torch.mul(g, _over_channels(sa, x), out=buf)
            if d_smean is not None:
                dx.add_(_over_channels(d_smean, dx))
            torch.addcmul((d_avg.to(x.dtype) / (H * W))[:, :, None, None], dx, ca[:, :, None, None], out=dx)
            b = torch.arange(B, device=x.device)
            if d_smax is not None:
                at_max = ca.gather(1, idx_c.flatten(1)).view(B, H, W) * d_smax
                hw = torch.arange(H * W, device=x.device).view(H, W)
                _add_at_(dx, b[:, None, None], idx_c, hw // W, hw % W, at_max)
            _add_at_(dx, b[:, None], torch.arange(C, device=x.device), idx_hw // W, idx_hw % W, d_max.to(x.dtype))
        return (dx, None, *d_channel, *d_spatial)


class ChannelGate(nn.Module):
    """Shared MLP ``C -> C/r -> C`` on the average- and max-pooled vectors, summed, sigmoid.

    ``(B, C, H, W) -> (B, C)`` attention in ``(0, 1)``.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def gate(self, avg: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
        """Attention from the pooled vectors ``(B, C)``."""
        # The layers' own forward is called, not the modules: in training the gate is recorded
        # inside CBAM's autograd node and differentiated in its backward, where module hooks
        # (full backward hooks, FlopCounterMode's module tracker) cannot run.
        first, _, second = self.mlp
        out = second.forward(F.relu(first.forward(torch.cat([avg, mx]))))
        return torch.sigmoid(out[:avg.shape[0]] + out[avg.shape[0]:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x.mean(dim=(2, 3)), F.adaptive_max_pool2d(x, 1).flatten(1))


class SpatialGate(nn.Module):
    """Channel-max and channel-mean -> 7x7 conv (2 -> 1, no bias) -> BatchNorm -> sigmoid.

    ``(B, C, H, W) -> (B, H, W)`` attention in ``(0, 1)``. BatchNorm momentum 0.01
    (PyTorch convention) as in the reference CBAM.
    """

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=0.01)

    def gate(self, smax: torch.Tensor, smean: torch.Tensor) -> torch.Tensor:
        """Attention from the channel-max and channel-mean maps ``(B, H, W)``."""
        # stacked as a channels-last (B, 2, H, W): oneDNN's 2 -> 1 conv is ~5x faster that way
        # (forward + backward) than on the same map in NCHW
        stats = torch.stack([smax, smean], dim=-1).permute(0, 3, 1, 2)
        return torch.sigmoid(self.bn.forward(self.conv.forward(stats))).squeeze(1)   # no module hooks: see ChannelGate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x.max(dim=1).values, x.mean(dim=1))


class CBAM(nn.Module):
    """Convolutional Block Attention Module.

    ``forward(x)`` with ``x`` ``(B, C, H, W)`` returns ``(refined, channel_att, spatial_att)``:
    the refined map ``(B, C, H, W)``, channel attention ``(B, C)`` and spatial attention
    ``(B, H, W)``. Parameters: ``2*C*C/r + C/r + C + 98 + 2`` (680 for C = 64, r = 16).
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.channel_gate = ChannelGate(channels, reduction)
        self.spatial_gate = SpatialGate(kernel_size)

    def uniform_init(self) -> "CBAM":
        """Start with uniform gates: zero the channel MLP's output layer and the spatial gate's
        BatchNorm scale, so both maps are 0.5 everywhere for every input and CBAM begins as a
        constant scaling (the zero-init of residual branches, Goyal et al. 2017). Gradients
        still reach those parameters, so the gates learn from the first step; the random
        initialisation instead starts every block with a random spatial modulation
        (``sigmoid(N(0, 1))``, 0.27-0.73 for most positions). Returns ``self``."""
        with torch.no_grad():
            last = self.channel_gate.mlp[-1]
            last.weight.zero_()
            last.bias.zero_()
            self.spatial_gate.bn.weight.zero_()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            return self.reference_forward(x)    # dynamo would break the graph at the node's inner autograd
        if not torch.is_grad_enabled():
            return _gating(x, self, record=False)[:3]
        if training_path(x.device.type) == "plain":
            return self.reference_forward(x)
        return _Gating.apply(x, self, *self.parameters())

    def reference_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same computation written with plain tensor operations (autograd's gradients);
        what the fast path is tested against."""
        ca = self.channel_gate.gate(F.adaptive_avg_pool2d(x, 1).flatten(1), F.adaptive_max_pool2d(x, 1).flatten(1))
        xc = x * ca[:, :, None, None]
        sa = self.spatial_gate.gate(xc.max(dim=1).values, xc.mean(dim=1))
        return xc * sa[:, None], ca, sa
