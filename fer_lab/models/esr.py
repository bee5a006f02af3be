"""ESR: Ensembles with Shared Representations (Siqueira et al. 2020), with optional CBAM.

A shared convolutional base feeds ``L`` convolutional branches held in an
``nn.ModuleList`` (so ``eval()``, ``state_dict()`` and ``.to()`` see every branch -
the public code's plain list did not). ``attention=True`` adds CBAM after every conv
block (ESR*, SPEC section 3); the last CBAM of each branch supplies the maps the
diversity term compares. ``width`` scales every channel count so the same code runs
small on a CPU; the paper's model is ``width=1, input_size=96``.

How the branches run is a switch, not a structure: ``branch_execution="loop"`` calls
each :class:`Branch` in turn, ``"fused"`` runs all of them as grouped convolutions over
the same parameters and buffers (:mod:`fer_lab.models.fused`); outputs, gradients and
BatchNorm statistics agree to float rounding.

This file holds the architecture and its loss; the growth protocol (adding a branch
per stage, learning rates) is the training engine's business.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..diversity import DiversityConfig
from .base import CamTarget, FERModel
from .cbam import CBAM
from .common import LossOutput, diversity_loss, ensemble_from_logits, multi_head_ce
from .fused import branch_hooks_registered, fused_branches_forward
from .registry import register_model

#: Ways to run the branches (see :attr:`ESR.branch_execution`).
BRANCH_EXECUTIONS = ("loop", "fused")
#: Where CBAM sits in a pooling conv block (see :class:`ConvBlock`).
CBAM_POSITIONS = ("after_pool", "before_pool")
CBAM_INITS = ("random", "uniform")
#: The ensemble's decision (:attr:`ESR.main_head`): the plurality ``vote`` of the branches
#: (SPEC section 3, the official ``evaluate()``) or the ``mean`` of their softmax.
DECISIONS = {"vote": "vote", "mean": "ensemble"}

# (in, out, kernel, padding, maxpool-after) for the base and each branch (SPEC section 3).
BASE_LAYOUT = ((None, 64, 5, 0, False), (64, 128, 3, 0, True), (128, 128, 3, 0, False), (128, 128, 3, 0, True))
BRANCH_LAYOUT = ((128, 128, 3, 0, False), (128, 256, 3, 0, True), (256, 256, 3, 0, False), (256, 512, 3, 1, False))
#: How the convolutions are padded (:func:`layouts`): ``paper`` (SPEC section 3: unpadded but
#: the branch's last conv) or ``same`` (every conv keeps its input size: ``k // 2``).
CONV_PADDINGS = ("auto", "paper", "same")
#: ``conv_padding="auto"`` keeps the paper's layout while it leaves a last map of at least this
#: side (96 px and up: 6x6, the map the paper diversifies) and pads every conv below that.
AUTO_MIN_LAST_MAP = 6


def layouts(conv_padding: str = "paper"):
    """``(base layout, branch layout)`` for a resolved ``conv_padding`` (``paper`` or ``same``)."""
    if conv_padding == "paper":
        return BASE_LAYOUT, BRANCH_LAYOUT
    if conv_padding == "same":
        pad = lambda layout: tuple((i, o, k, k // 2, pool) for i, o, k, _, pool in layout)  # noqa: E731
        return pad(BASE_LAYOUT), pad(BRANCH_LAYOUT)
    raise ValueError(f"conv_padding={conv_padding!r}: expected one of {CONV_PADDINGS}")


def scaled(channels: int, width: float) -> int:
    """Channel count under the ``width`` multiplier (at least 16, so CBAM's C/16 MLP exists)."""
    return max(16, int(round(channels * width)))


def output_size(input_size: int, conv_padding: str = "paper") -> tuple[int, int]:
    """Spatial side of the base output and of the branch's last map for a square input.

    ``output_size(96) == (20, 6)``; ``output_size(48, "same") == (12, 6)``. Sizes below 1
    mean the input is too small for that layout.
    """
    s = input_size
    base = None
    for layout in layouts(conv_padding):
        for _, _, k, p, pool in layout:
            s = s + 2 * p - k + 1
            if pool:
                s //= 2
        base = s if base is None else base
    return base, s


def resolve_conv_padding(input_size: int, conv_padding: str = "auto") -> str:
    """``paper`` or ``same`` for an input side: ``auto`` derives it from the size (the paper's
    layout while its last map is at least :data:`AUTO_MIN_LAST_MAP` px, 96 px and up; every conv
    padded below, so 48 px FER+ faces run natively with a 6x6 last map)."""
    if conv_padding != "auto":
        layouts(conv_padding)           # validates the name
        return conv_padding
    return "paper" if output_size(input_size, "paper")[1] >= AUTO_MIN_LAST_MAP else "same"


#: Smallest input side for which every layer of the paper's layout has a non-empty output.
MIN_INPUT_SIZE = next(s for s in range(8, 256) if min(output_size(s)) >= 1)
#: Smallest input side for the padded layout (three 2x poolings leave at least 1 px).
MIN_INPUT_SIZE_SAME = next(s for s in range(4, 256) if min(output_size(s, "same")) >= 1)


class ConvBlock(nn.Module):
    """conv (with bias) -> BatchNorm -> ReLU, then max-pool 2 (where the layout pools) and
    CBAM (with attention), in the order ``cbam_position`` says.

    - ``"after_pool"`` (the diversity paper's code, default of the ESR* variants):
      ``cbam(pool(relu(bn(conv(x)))))``: CBAM sees the pooled map;
    - ``"before_pool"``: ``pool(cbam(relu(bn(conv(x)))))``: CBAM at the block's full resolution.

    Blocks without pooling are the same either way. ``forward(x)`` returns ``(y,
    attention)`` where ``attention`` is ``(channel (B, C), spatial (B, H, W))`` from the
    CBAM, or ``None`` without attention. ``out`` (an identity, Grad-CAM's hook point)
    sits right after the CBAM's place.
    """

    def __init__(self, cin: int, cout: int, kernel: int, padding: int, pool: bool, attention: bool,
                 cbam_position: str = "after_pool", cbam_reduction: int = 16):
        super().__init__()
        if cbam_position not in CBAM_POSITIONS:
            raise ValueError(f"cbam_position={cbam_position!r}: expected one of {CBAM_POSITIONS}")
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding)
        self.bn = nn.BatchNorm2d(cout)
        self.cbam = CBAM(cout, cbam_reduction) if attention else None
        self.out = nn.Identity()
        self.pool = nn.MaxPool2d(2, 2) if pool else None
        self.pool_first = cbam_position == "after_pool"

    def forward(self, x: torch.Tensor):
        x = F.relu(self.bn(self.conv(x)), inplace=True)
        if self.pool is not None and self.pool_first:
            x = self.pool(x)
        att = None
        if self.cbam is not None:
            x, ca, sa = self.cbam(x)
            att = (ca, sa)
        x = self.out(x)
        if self.pool is not None and not self.pool_first:
            x = self.pool(x)
        return x, att


class _Stack(nn.Module):
    """A sequence of ConvBlocks that also collects each block's attention maps."""

    def __init__(self, layout, in_channels: int, width: float, attention: bool, cbam_position: str = "after_pool",
                 cbam_reduction: int = 16):
        super().__init__()
        blocks = []
        for cin, cout, k, p, pool in layout:
            cin = in_channels if cin is None else scaled(cin, width)
            blocks.append(ConvBlock(cin, scaled(cout, width), k, p, pool, attention, cbam_position, cbam_reduction))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor):
        atts = []
        for block in self.blocks:
            x, att = block(x)
            atts.append(att)
        return x, atts


class Base(_Stack):
    """Shared base: ``(B, in_channels, S, S) -> (B, 128w, s, s)`` (``128 x 20 x 20`` at 96 px)."""

    def __init__(self, in_channels: int = 3, width: float = 1.0, attention: bool = False,
                 cbam_position: str = "after_pool", conv_padding: str = "paper", cbam_reduction: int = 16):
        super().__init__(layouts(conv_padding)[0], in_channels, width, attention, cbam_position, cbam_reduction)


class Branch(nn.Module):
    """One convolutional branch: four ConvBlocks, global average pooling, ``fc -> classes``.

    ``forward(shared)`` returns ``(logits (B, K), last map (B, 512w, h, w), attentions)``.
    """

    def __init__(self, num_classes: int = 8, width: float = 1.0, attention: bool = False,
                 cbam_position: str = "after_pool", conv_padding: str = "paper", cbam_reduction: int = 16):
        super().__init__()
        self.convs = _Stack(layouts(conv_padding)[1], 0, width, attention, cbam_position, cbam_reduction)
        self.fc = nn.Linear(scaled(512, width), num_classes)

    def forward(self, shared: torch.Tensor):
        x, atts = self.convs(shared)
        return self.fc(x.mean(dim=(2, 3))), x, atts


@dataclass
class ESROutput:
    """What :class:`ESR` returns. ``L`` branches run, batch ``B``, ``K`` classes; the
    ensemble is over the first ``k = num_active`` of them (``k = L`` unless a protocol
    trains the first branches of a larger ensemble, :attr:`ESR.active_branches`).

    - ``branch_logits`` ``(L, B, K)``
    - ``probs`` ``(B, K)``: mean of the first ``k`` branches' softmax
    - ``logits`` ``(B, K)``: ``log(probs)``, the ensemble's log-probabilities (usable as logits)
    - ``vote_counts`` ``(B, K)`` and ``votes`` ``(B,)``: plurality vote of the first ``k``
      branches' argmax, ties to the lowest class index
    - ``features`` ``(L, B, C, h, w)``: each branch's last map (after its last CBAM)
    - ``spatial_attention`` ``(L, B, h, w)`` / ``channel_attention`` ``(L, B, C)``: each
      branch's last CBAM maps (``None`` without attention)
    - ``layer_attention``: with ``return_all_attention=True``, ``{"base.j" | "branch<l>.j":
      (channel (B, C), spatial (B, H, W))}`` for every CBAM
    - ``num_active``: ``k``
    """

    branch_logits: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    vote_counts: torch.Tensor
    votes: torch.Tensor
    features: torch.Tensor
    spatial_attention: torch.Tensor | None = None
    channel_attention: torch.Tensor | None = None
    layer_attention: dict = field(default_factory=dict)
    num_active: int | None = None


class ESR(FERModel):
    """Ensemble with shared representations.

    Args:
        num_branches: branches built now (the growth protocol adds more with :meth:`add_branch`).
        num_classes: classes per branch head (8 for AffectNet order).
        attention: CBAM after every conv block (ESR*).
        cbam_position: ``"after_pool"`` (the diversity paper's code: CBAM on the pooled map of
            a pooling block; default) or ``"before_pool"`` (CBAM at the block's full
            resolution, fer_lab before 2026-12); see :class:`ConvBlock`. Same parameters.
        cbam_reduction: the CBAM channel MLP's reduction ratio ``r`` (hidden size ``max(1, C // r)``;
            16 as in the paper and CBAM). At width 0.25 the base's 16-channel CBAMs have a
            1-unit hidden layer; a smaller ``r`` widens it (4 keeps the paper's full-width hidden
            sizes at width 0.25).
        cbam_init: ``"random"`` (PyTorch's initialisation of the gate layers, the paper's code)
            or ``"uniform"`` (:meth:`CBAM.uniform_init`: every gate starts at 0.5 everywhere and
            learns from there; applied to branches added later too).
        diversity: which diversity terms the loss adds (:class:`~fer_lab.diversity.DiversityConfig`).
        diversity_source: ``"attention"`` compares the last CBAM's spatial/channel attention
            (the paper, needs ``attention=True``); ``"features"`` compares the channel- and
            spatially-pooled last feature maps (works without CBAM).
        channel_term_input: what the ``channel`` term compares with ``diversity_source=
            "attention"``: ``"channel"`` (the channel attention, as the paper describes; default)
            or ``"spatial"``: what the authors' ``esr_ferplus.py`` / ``esr_rafdb.py`` compute
            (their channel formula applied to the spatial maps: each column of a branch's
            ``h x w`` map is one sample of ``h`` values, so ``S`` averages over ``B * w``
            samples); a quirk offered only to reproduce them.
        decision: the ensemble's decision and :attr:`main_head`: ``"vote"`` (plurality vote of
            the branches, SPEC section 3 and the official ``evaluate()``; default) or ``"mean"``
            (mean softmax, head ``ensemble``).
        active_branches: branches in the loss and the ensemble decision: the first ``k`` of
            the ``num_branches`` built (``None``: all). The fine-tuning protocol trains a
            9-branch model one branch at a time this way (:mod:`fer_lab.protocols`).
        diversity_scope: which branches the diversity term compares while ``active_branches <
            num_branches``: ``"all"`` built branches (the authors' fine-tuning scripts: all L
            from stage 1; inactive branches still run) or ``"active"`` (the first ``k`` only;
            inactive branches are not run at all).
        branch_bn_train_at_test: keep the branches' BatchNorm in training mode when the model
            is put in eval mode (batch statistics at test time and running statistics updated
            by evaluation batches): what the public code does by accident (branches in a Python
            list that ``eval()`` misses). A quirk for reproductions only; default ``False``.
        width: channel multiplier (1.0 = paper).
        input_size: square input side in pixels (96 = paper; at least :data:`MIN_INPUT_SIZE` with the
            paper's layout, :data:`MIN_INPUT_SIZE_SAME` padded).
        conv_padding: ``"auto"`` (default: derived from ``input_size`` by
            :func:`resolve_conv_padding`: the paper's unpadded layout from 96 px up, every conv
            padded below, so 48 px FER+ faces run natively and end in a 6x6 map), ``"paper"`` or
            ``"same"``. Stored resolved in :attr:`config`. Same parameters either way.
        in_channels: 3 for RGB, 1 for grayscale.
        branch_execution: ``"loop"`` (call each branch in turn) or ``"fused"`` (all branches
            at once as grouped convolutions, :func:`~fer_lab.models.fused.fused_branches_forward`).
            Same parameters, state_dict and results (to float rounding) either way; switch at
            any time with ``model.branch_execution = "fused"`` (kept in :attr:`config`).
            ``return_all_attention=True`` works in both. The fused path falls back to the loop
            while hooks are registered on branch modules (Grad-CAM's). ``loop`` is the default:
            ``bench/RESULTS.md`` has the measurements.

    ``forward(x)`` with ``x`` ``(B, in_channels, S, S)`` in ``[0, 1]`` returns :class:`ESROutput`.
    """

    family = "esr"
    #: Constructor values of options that did not exist yet when an older run's config was
    #: written (``build_model_from_config`` fills them in, so old checkpoints rebuild as trained).
    legacy_config = {"cbam_position": "before_pool", "decision": "mean", "conv_padding": "paper"}

    def __init__(self, num_branches: int = 9, num_classes: int = 8, attention: bool = False,
                 diversity: DiversityConfig | dict | None = None, diversity_source: str | None = None,
                 width: float = 1.0, input_size: int = 96, in_channels: int = 3, name: str = "esr",
                 branch_execution: str = "loop", cbam_position: str = "after_pool",
                 channel_term_input: str = "channel", decision: str = "vote",
                 active_branches: int | None = None, diversity_scope: str = "all",
                 branch_bn_train_at_test: bool = False, conv_padding: str = "auto", cbam_reduction: int = 16,
                 cbam_init: str = "random"):
        super().__init__()
        if int(num_branches) < 1:
            raise ValueError(f"num_branches={num_branches!r}: expected an int >= 1")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes={num_classes!r}: expected an int >= 2")
        if not (0 < float(width) <= 4):
            raise ValueError(f"width={width!r}: expected a channel multiplier in (0, 4]")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels={in_channels!r}: expected 1 (grayscale) or 3 (RGB)")
        if conv_padding not in CONV_PADDINGS:
            raise ValueError(f"conv_padding={conv_padding!r}: expected one of {CONV_PADDINGS}")
        conv_padding = resolve_conv_padding(int(input_size), conv_padding)
        if min(output_size(int(input_size), conv_padding)) < 1:
            smallest = MIN_INPUT_SIZE if conv_padding == "paper" else MIN_INPUT_SIZE_SAME
            raise ValueError(f"input_size={input_size!r}: ESR with conv_padding={conv_padding!r} needs at least "
                             f"{smallest} px (the branch's last map would be empty); the paper uses 96, "
                             f"conv_padding='auto' pads the convs below 96")
        if cbam_position not in CBAM_POSITIONS:
            raise ValueError(f"cbam_position={cbam_position!r}: expected one of {CBAM_POSITIONS}")
        if isinstance(cbam_reduction, bool) or not isinstance(cbam_reduction, int) or cbam_reduction < 1:
            raise ValueError(f"cbam_reduction={cbam_reduction!r}: expected an int >= 1 (the paper's CBAM uses 16)")
        if cbam_init not in CBAM_INITS:
            raise ValueError(f"cbam_init={cbam_init!r}: expected one of {CBAM_INITS}")
        if channel_term_input not in ("channel", "spatial"):
            raise ValueError(f"channel_term_input={channel_term_input!r}: expected 'channel' (the paper) or "
                             "'spatial' (the authors' FER+/RAF-DB scripts)")
        if decision not in DECISIONS:
            raise ValueError(f"decision={decision!r}: expected one of {tuple(DECISIONS)}")
        if diversity_scope not in ("all", "active"):
            raise ValueError(f"diversity_scope={diversity_scope!r}: expected 'all' or 'active'")
        self.diversity = diversity if isinstance(diversity, DiversityConfig) else DiversityConfig.from_dict(diversity)
        if diversity_source is None:
            diversity_source = "attention" if attention else "features"
        if diversity_source not in ("attention", "features"):
            raise ValueError(f"diversity_source={diversity_source!r}: expected 'attention' or 'features'")
        if diversity_source == "attention" and not attention and self.diversity.enabled:
            raise ValueError("diversity_source='attention' needs attention=True (CBAM); "
                             "use diversity_source='features' to diversify a model without CBAM")
        if "branch" in self.diversity.terms:
            raise ValueError("ESR has no 'branch' diversity term (that is MA-Net's local/global term); "
                             "use 'spatial' and/or 'channel'")
        self.name = name
        self.num_classes = int(num_classes)
        self.attention = bool(attention)
        self.cbam_position = cbam_position
        self.cbam_reduction = cbam_reduction
        self.cbam_init = cbam_init
        self.diversity_source = diversity_source
        self.channel_term_input = channel_term_input
        self.decision = decision
        self.diversity_scope = diversity_scope
        self.branch_bn_train_at_test = bool(branch_bn_train_at_test)
        self.width = float(width)
        self.input_size = int(input_size)
        self.in_channels = int(in_channels)
        self.branch_execution = branch_execution
        self.conv_padding = conv_padding
        self.base = self._init_cbams(Base(in_channels, self.width, self.attention, cbam_position, conv_padding,
                                          cbam_reduction))
        self.branches = nn.ModuleList(self._new_branch() for _ in range(int(num_branches)))
        self.active_branches = active_branches

    # ---- structure ----------------------------------------------------------------------
    def _new_branch(self) -> Branch:
        return self._init_cbams(Branch(self.num_classes, self.width, self.attention, self.cbam_position,
                                       self.conv_padding, self.cbam_reduction))

    def _init_cbams(self, module: nn.Module) -> nn.Module:
        if self.cbam_init == "uniform":
            for m in module.modules():
                if isinstance(m, CBAM):
                    m.uniform_init()
        return module

    @property
    def num_branches(self) -> int:
        """Branches built."""
        return len(self.branches)

    @property
    def active_branches(self) -> int | None:
        """Branches in the loss and the decision (the first ``k``); ``None``: all (settable)."""
        return self._active

    @active_branches.setter
    def active_branches(self, k: int | None) -> None:
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_branches):
            raise ValueError(f"active_branches={k!r}: expected None (all) or an int in [1, {self.num_branches}]")
        self._active = None if k is None or k == self.num_branches else k

    @property
    def num_active(self) -> int:
        """``k``: how many of the first branches form the ensemble."""
        return self.num_branches if self._active is None else self._active

    @property
    def main_head(self) -> str:
        """The head model selection and reports use: ``vote`` or ``ensemble`` (``decision``)."""
        return DECISIONS[self.decision]

    def train(self, mode: bool = True):
        """``nn.Module.train``; with ``branch_bn_train_at_test`` the branches' BatchNorm stays in
        training mode in ``eval()`` (the public code's behaviour, see the class docstring)."""
        super().train(mode)
        if not mode and self.branch_bn_train_at_test:
            for m in self.branches.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train(True)
        return self

    def add_branch(self, init: str = "random") -> Branch:
        """Append a branch (on the model's device, in the model's train/eval mode) and return it.

        ``init="random"``: fresh initialisation; ``"copy"``: a copy of the last branch.
        """
        if init == "copy":
            new = copy.deepcopy(self.branches[-1])
        elif init == "random":
            new = self._new_branch()
        else:
            raise ValueError(f"init={init!r}: expected 'random' or 'copy'")
        p = next(self.parameters())
        new = new.to(device=p.device, dtype=p.dtype).train(self.training)   # same mode as the model
        self.branches.append(new)
        return new

    @property
    def branch_execution(self) -> str:
        """``"loop"`` or ``"fused"``: how :meth:`forward` runs the branches (settable)."""
        return self._branch_execution

    @branch_execution.setter
    def branch_execution(self, value: str) -> None:
        if value not in BRANCH_EXECUTIONS:
            raise ValueError(f"branch_execution={value!r}: expected one of {BRANCH_EXECUTIONS}")
        self._branch_execution = value

    @property
    def config(self) -> dict:
        """JSON-able constructor arguments (current branch count); ``build_model_from_config`` inverts it."""
        return {
            "name": self.name, "family": self.family, "num_branches": self.num_branches,
            "num_classes": self.num_classes, "attention": self.attention,
            "diversity": self.diversity.to_dict(), "diversity_source": self.diversity_source,
            "width": self.width, "input_size": self.input_size, "in_channels": self.in_channels,
            "branch_execution": self.branch_execution, "cbam_position": self.cbam_position, "cbam_reduction": self.cbam_reduction,
            "cbam_init": self.cbam_init,
            "channel_term_input": self.channel_term_input, "decision": self.decision,
            "active_branches": self.active_branches, "diversity_scope": self.diversity_scope,
            "branch_bn_train_at_test": self.branch_bn_train_at_test, "conv_padding": self.conv_padding,
        }

    # ---- forward ------------------------------------------------------------------------
    def _running(self) -> list[Branch]:
        """The branches the forward pass runs: all, unless the diversity term covers only the
        active ones (then the inactive branches are not needed at all)."""
        k = self.num_active
        if k < self.num_branches and (self.diversity_scope == "active" or not self.diversity.enabled):
            return list(self.branches[:k])
        return list(self.branches)

    def forward(self, x: torch.Tensor, return_all_attention: bool = False) -> ESROutput:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ESR expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        shared, base_atts = self.base(x)
        branches = self._running()
        if self.branch_execution == "fused" and not branch_hooks_registered(self.branches):
            branch_logits, features, ca, sa, atts = self._fused_branches(branches, shared, return_all_attention)
        else:
            branch_logits, features, ca, sa, atts = self._loop_branches(branches, shared)
        k = self.num_active
        probs, log_probs, counts, votes = ensemble_from_logits(branch_logits[:k])
        out = ESROutput(branch_logits=branch_logits, probs=probs, logits=log_probs, vote_counts=counts,
                        votes=votes, features=features, num_active=k)
        if self.attention:
            out.channel_attention = ca
            out.spatial_attention = sa
            if return_all_attention:
                out.layer_attention = {f"base.{j}": a for j, a in enumerate(base_atts)}
                for l, branch_atts in enumerate(atts):
                    out.layer_attention.update({f"branch{l}.{j}": a for j, a in enumerate(branch_atts)})
        return out

    def _loop_branches(self, branches, shared: torch.Tensor):
        """Each branch in turn: ``(logits (L, B, K), features (L, B, C, h, w), last channel
        attention (L, B, C) | None, last spatial attention (L, B, h, w) | None, per-branch lists
        of every block's attention)``."""
        logits, feats, atts = [], [], []
        for branch in branches:
            lg, f, a = branch(shared)
            logits.append(lg)
            feats.append(f)
            atts.append(a)
        ca = sa = None
        if self.attention:
            ca = torch.stack([a[-1][0] for a in atts])
            sa = torch.stack([a[-1][1] for a in atts])
        return torch.stack(logits), torch.stack(feats), ca, sa, atts

    def _fused_branches(self, branches, shared: torch.Tensor, all_attention: bool):
        """All branches as grouped convolutions; same return as :meth:`_loop_branches`
        (the per-block attention lists only when ``all_attention``)."""
        per_block = [] if all_attention and self.attention else None
        logits, feats, ca, sa = fused_branches_forward(branches, shared, self.attention, per_block)
        atts = []
        if per_block is not None:
            atts = [[(c[l], s[l]) for c, s in per_block] for l in range(len(branches))]
        return logits, feats, ca, sa, atts

    # ---- objective ----------------------------------------------------------------------
    def learners(self, out: ESROutput) -> dict[str, torch.Tensor]:
        """Per-term learner features ``(L, B, ...)`` the diversity term compares (every branch
        the forward pass ran, see ``diversity_scope``)."""
        if self.diversity_source == "attention":
            sa = out.spatial_attention
            if self.channel_term_input == "spatial":
                # the authors' scripts pass the (L, B, H, W) spatial maps to their channel formula,
                # which sums squared differences over dim 1 of each learner's (B, H, W) map (the
                # rows) and averages the kernel over the batch and the columns: B*W samples of H
                L, B, H, W = sa.shape
                return {"spatial": sa, "channel": sa.transpose(2, 3).reshape(L, B * W, H)}
            return {"spatial": sa, "channel": out.channel_attention}
        return {"spatial": out.features.mean(dim=2), "channel": out.features.mean(dim=(3, 4))}

    def loss(self, out: ESROutput, target: torch.Tensor) -> LossOutput:
        """Sum over the active branches of cross-entropy, minus ``weight * (D_sp + D_ch)`` (the
        configured terms, over the branches ``diversity_scope`` names).

        ``target`` is ``(B,)`` class indices or ``(B, K)`` class probabilities (soft labels).
        Diversity is added only with more than one branch. Both terms are always
        reported in ``LossOutput.diversity`` (monitored without gradient when not in the loss).
        """
        k = out.num_active or out.branch_logits.shape[0]
        ce = multi_head_ce(out.branch_logits[:k], target)
        return diversity_loss(self.learners(out), self.diversity, ("spatial", "channel"),
                              ce.sum(), {f"branch_{l + 1}": c for l, c in enumerate(ce)})

    def cam_targets(self) -> dict[str, CamTarget]:
        """Layers whose output Grad-CAM reads, per learner: ``base`` (shared, for the ensemble)
        and ``branch_<l>`` (each branch's last block, after its CBAM)."""
        layers = {"base": CamTarget(self.base.blocks[-1].out)}
        layers.update({f"branch_{l + 1}": CamTarget(b.convs.blocks[-1].out) for l, b in enumerate(self.branches)})
        return layers

    def attention_layers(self) -> list[str]:
        """``"last"`` (each branch's last CBAM: what ESR diversifies), ``"block<j>"`` (every
        branch's j-th block, 0-based) and ``"base.<j>"`` (the shared base's j-th block); none
        without attention."""
        if not self.attention:
            return []
        return (["last"] + [f"block{j}" for j in range(len(self.branches[0].convs.blocks))]
                + [f"base.{j}" for j in range(len(self.base.blocks))])

    def channel_attention_maps(self, out: ESROutput) -> dict[str, torch.Tensor]:
        """``{"branch_<l>": (B, C)}``: each branch's last CBAM channel attention (none without CBAM)."""
        return {} if out.channel_attention is None else {f"branch_{l + 1}": c for l, c in enumerate(out.channel_attention)}

    def attention_maps(self, out: ESROutput, layer: str = "last") -> dict[str, torch.Tensor]:
        """``{"branch_<l>": (B, h, w)}`` spatial attention of ``layer`` for every branch the forward
        pass ran (``{"base.<j>": ...}`` for a base block). Layers other than ``"last"`` need the
        output of ``model(x, return_all_attention=True)``."""
        if layer not in self.attention_layers():
            raise self._unknown_layer(layer)
        if layer == "last":
            return {f"branch_{l + 1}": m for l, m in enumerate(out.spatial_attention)}
        if not out.layer_attention:
            raise ValueError(f"attention layer {layer!r} needs the output of model(x, return_all_attention=True)")
        if layer.startswith("base."):
            return {layer: out.layer_attention[layer][1]}
        j = int(layer[len("block"):])
        return {f"branch_{l + 1}": out.layer_attention[f"branch{l}.{j}"][1] for l in range(out.spatial_attention.shape[0])}

    def heads(self, out: ESROutput) -> dict[str, torch.Tensor]:
        """Per-head ``(B, K)`` scores whose argmax is the head's decision: ``vote`` (log of each
        class's share of the active branches' votes; argmax = the plurality vote, ties to the
        lowest class), ``ensemble`` (log mean softmax) and ``branch_<l>`` logits of the active
        branches."""
        k = out.num_active or out.branch_logits.shape[0]
        shares = out.vote_counts.float() / k
        heads = {"vote": shares.clamp_min(1e-12).log(), "ensemble": out.logits}
        heads.update({f"branch_{l + 1}": lg for l, lg in enumerate(out.branch_logits[:k])})
        return heads


# ---- registered variants: rows of Table 1 ----------------------------------------------------
#: what travels with every ESR variant besides its constructor arguments
_ESR_DATA = {"train_transform": "esr_train", "protocol": "esr_growth", "label_space": "affectnet8"}
for _n in (9, 15):
    _common = dict(num_branches=_n, num_classes=8, input_size=96, in_channels=3, width=1.0,
                   cbam_position="after_pool", decision="vote")
    register_model(f"esr{_n}", ESR, f"ESR-{_n}: shared base + {_n} branches, no attention, no diversity",
                   _ESR_DATA, attention=False, diversity={}, **_common)
    register_model(f"esr{_n}_att", ESR, f"ESR-{_n} + CBAM after every conv block",
                   _ESR_DATA, attention=True, diversity={}, **_common)
    register_model(f"esr{_n}_att_sp", ESR, f"ESR-{_n} + CBAM + spatial attention diversity",
                   _ESR_DATA, attention=True, diversity={"terms": ["spatial"], "gamma": 10.0}, **_common)
    register_model(f"esr{_n}_div", ESR, f"ESR*-{_n}: CBAM + spatial + channel attention diversity",
                   _ESR_DATA, attention=True, diversity={"terms": ["spatial", "channel"], "gamma": 10.0},
                   **_common)
