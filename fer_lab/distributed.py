"""Data-parallel training with ``torch.distributed`` under ``torchrun`` (no launcher of our own).

``torchrun --nproc_per_node N -m fer_lab train ...`` starts N processes; each calls
:func:`fer_lab.train.train`, which sees torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``) and trains as one run:

- ``batch_size`` stays the **global** batch: every rank takes its contiguous share of each
  batch of the one shuffled order a single process would draw (same seeds on every rank),
  so the union of the ranks' batches is the single process's batch.
- BatchNorm statistics are computed over the global batch (:class:`GlobalBatchNorm2d`: sums and
  counts all-reduced with gradients; torch's SyncBatchNorm runs on GPUs only).
- The diversity term's similarity matrix ``S`` is a mean over samples, so by default it is
  computed over the **global** batch: the learners' pooled features are all-gathered (with
  gradients) before ``S`` (``runtime.distributed_similarity="global"``); ``"per_rank"`` keeps
  each rank's own ``S`` (the term then sees N times fewer samples per step).
- Each rank's cross-entropy is weighted by its share of the batch, gradients are summed over
  ranks and divided by N (one flat all-reduce after the backward pass), so a step equals the
  single process's step up to float round-off; the recorded train metrics are sums over ranks.
- ``light_batch``'s per-face augmentation is drawn for the whole batch on every rank (same
  random numbers as a single process) and sliced; per-face transforms inside the dataset
  (``esr_train``, ...) draw per rank: statistically the same, not the same numbers.
- Validation runs on every rank over the whole split (identical model selection without
  communication); rank 0 writes the run directory (atomically), the others read checkpoints.

A rank that dies makes the others fail at their next collective; the run then stops with a
message that says to start the same command with ``--resume``, which continues from the last
finished epoch.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Dist", "GlobalBatchNorm2d", "convert_batchnorm", "RankSlices", "SIMILARITY_MODES", "lost_peer"]

SIMILARITY_MODES = ("global", "per_rank")


@dataclass
class Dist:
    """This process's place in a distributed run (``world == 1``: a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    similarity: str = "global"
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str, similarity: str = "global") -> "Dist":
        """From torchrun's environment; joins (or creates) the process group: ``nccl`` on CUDA,
        ``gloo`` on CPU. Outside torchrun (no ``WORLD_SIZE`` > 1): a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(similarity=similarity)
        owns = False
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=10))
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), similarity, owns)

    @contextlib.contextmanager
    def stop_message(self, run_dir):
        """While training: when torchrun stops this rank because another failed (SIGTERM), say so,
        where the finished epochs are and how to continue, then end as the signal would."""
        import signal
        import sys
        import threading

        if not self.active or threading.current_thread() is not threading.main_thread():
            yield
            return

        def stopped(signum, frame):
            print(f"fer_lab: rank {self.rank} of {self.world} stopped by the launcher (signal {signum}): another "
                  f"rank failed or was killed, see torchrun's report for the root cause. Finished epochs are kept "
                  f"in {run_dir}; start the same torchrun command with --resume to continue.",
                  file=sys.stderr, flush=True)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

        previous = signal.signal(signal.SIGTERM, stopped)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ---- collectives ---------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def agree(self, ok: bool, message: str = "") -> None:
        """Every rank learns whether rank 0 succeeded (e.g. creating the run directory); the
        others raise with rank 0's message instead of waiting forever."""
        if not self.active:
            return
        box = [(ok, message)]
        dist.broadcast_object_list(box, src=0)
        if not box[0][0] and not self.main:
            raise RuntimeError(f"rank 0 failed: {box[0][1]}")

    def share(self, n: int) -> tuple[int, int]:
        """``(global batch size, this rank's offset in it)`` given this rank's ``n`` items."""
        t = torch.tensor([n], dtype=torch.float64)
        dist.all_reduce(t)
        total = int(t.item())
        base, extra = divmod(total, self.world)
        return total, self.rank * base + min(self.rank, extra)

    def sum_(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sums over ranks of float tensors (one flat all-reduce), without gradient."""
        if not tensors:
            return tensors
        flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
        dist.all_reduce(flat)
        out, i = [], 0
        for t in tensors:
            out.append(flat[i:i + t.numel()].reshape(t.shape).to(t.dtype))
            i += t.numel()
        return out

    def average_gradients(self, params) -> None:
        """``p.grad = sum over ranks / world`` for every parameter with a gradient (one flat all-reduce;
        a parameter without a gradient on every rank stays without)."""
        params = [p for p in params if p.grad is not None]
        for p, g in zip(params, self.sum_([p.grad for p in params])):
            p.grad.copy_(g / self.world)

    def gather_batch(self, features: torch.Tensor) -> torch.Tensor:
        """``(L, n_rank, ...)`` learner features -> ``(L, n_global, ...)``, ranks in order, with
        gradients flowing back to each rank's own rows (ranks may hold different ``n``)."""
        x = features.transpose(0, 1)                       # batch first
        n = torch.tensor([x.shape[0]], dtype=torch.int64)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        most = max(sizes)
        if x.shape[0] < most:                              # equal shapes for all_gather
            x = torch.cat([x, x.new_zeros((most - x.shape[0], *x.shape[1:]))])
        parts = _AllGather.apply(x).split(most)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).transpose(0, 1)

    @contextlib.contextmanager
    def training_batch(self):
        """While training: the diversity term sees the global batch (``similarity="global"``)."""
        from .diversity import batch_gather

        if self.active and self.similarity == "global":
            with batch_gather(self.gather_batch):
                yield
        else:
            yield

    def rescale(self, lo, n_local: int, n_global: int):
        """The loss this rank backpropagates: cross-entropy weighted by the rank's share of the
        batch (``n_local * world / n_global``), diversity terms as they are; gradients averaged
        over ranks then equal the single process's."""
        from dataclasses import replace

        w = n_local * self.world / n_global
        return replace(lo, total=lo.ce_total * w + (lo.total - lo.ce_total), ce_total=lo.ce_total * w)


def lost_peer(err: BaseException) -> bool:
    """Whether a collective failed because another rank went away (killed, crashed): gloo reports
    closed or reset connections, NCCL a remote error or a timeout."""
    text = str(err).lower()
    return isinstance(err, getattr(dist, "DistError", ())) or any(
        k in text for k in ("connection closed", "connection reset", "broken pipe", "remote process",
                            "timed out", "nccl", "gloo"))


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; every rank's output feeds its own loss, so the gradient of a rank's
    input is the sum over ranks of the output gradients (an all-reduce again)."""

    @staticmethod
    def forward(ctx, x):
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _AllGather(torch.autograd.Function):
    """``(n, ...)`` per rank (equal shapes) -> ``(world * n, ...)`` in rank order; the gradient of a
    rank's rows is the sum over ranks of the gradients of those rows (all-reduce, then its slice:
    gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, differentiable."""
    return _AllReduceSum.apply(x)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (every rank's items):
    per-channel sums, sums of squares and counts are all-reduced with gradients, so outputs and
    gradients equal a single process's BatchNorm over the whole batch (up to round-off: mean and
    centred variance in two all-reduces). Eval mode: the running statistics,
    as BatchNorm2d. Outside a process group it is BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        xf = x if x.dtype == torch.float64 else x.float()
        C = x.shape[1]
        # two passes (mean, then the centred sum of squares), each one all-reduce: E[x^2] - E[x]^2
        # cancels catastrophically where a channel's mean is large against its spread, which
        # made gradients differ from one process's by 1e-3 (relative, float32)
        first = all_reduce_sum(torch.cat([xf.sum((0, 2, 3)), xf.new_tensor([x.numel() // C])]))
        n = first[-1]
        mean = first[:C] / n
        centred = xf - mean[None, :, None, None]
        var = all_reduce_sum(centred.pow(2).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / max(float(n) - 1, 1.0), alpha=m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Every ``nn.BatchNorm2d`` of ``module`` replaced by a :class:`GlobalBatchNorm2d` holding the
    same parameters and buffers (state_dict keys unchanged; in place where possible)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(next(iter(child.buffers()), torch.empty(0)).device)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_batchnorm(child)
    return module


class RankSlices(torch.utils.data.Sampler):
    """This rank's contiguous share of every batch of ``batch_sampler`` (the batches a single
    process would draw): ranks ``< len % world`` get one item more. A batch with fewer items than
    ranks (an epoch's last, when ``len(train) % batch_size < world``) is skipped by every rank:
    the only place where a data-parallel epoch differs from one process's."""

    def __init__(self, batch_sampler, rank: int, world: int):
        self.batch_sampler, self.rank, self.world = batch_sampler, rank, world

    def __iter__(self):
        for batch in self.batch_sampler:
            if len(batch) < self.world:
                continue
            base, extra = divmod(len(batch), self.world)
            start = self.rank * base + min(self.rank, extra)
            yield batch[start:start + base + (self.rank < extra)]

    def __len__(self) -> int:
        return len(self.batch_sampler)

    @staticmethod
    def shard(loader, rank: int, world: int):
        """A DataLoader over the same dataset and batch order, yielding this rank's shares."""
        from torch.utils.data import DataLoader

        # the same generator: a DataLoader without one draws its base seed from the global RNG,
        # which the batch augmentation draws from too
        return DataLoader(loader.dataset, batch_sampler=RankSlices(loader.batch_sampler, rank, world),
                          num_workers=loader.num_workers, pin_memory=loader.pin_memory, generator=loader.generator)
