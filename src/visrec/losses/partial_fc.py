"""PartialFC: the classification layer of face training, class centres sharded across processes.

Rank r owns a contiguous slice of the classes (sizes differ by at most one). Each step every rank
gathers all ranks' embeddings and labels, scores them against its own centres (all of its positives plus
a random ``sample_rate`` share of its negatives), and the softmax cross-entropy is computed across the
shards with a distributed max and sum of exponentials — with ``sample_rate=1`` exactly the full-softmax
loss of one big FC layer. With one process no ``torch.distributed`` call is made at all, so no process
group is needed. Negative sampling draws from the torch RNG of the weight's device, which the Trainer
checkpoints, so resumed runs sample the same centres.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather equal-sized tensors; backward returns each rank the gradient of its own rows summed over
    ranks and multiplied by the world size: DDP then averages the backbone gradients over ranks, and the
    average of world x (per-rank share) is the full-batch gradient one process would get (arcface_torch
    scales the same way)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, world: int, rank: int) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        ctx.world, ctx.rank, ctx.n = world, rank, tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)  # gloo has no reduce_scatter: sum everywhere, keep our slice
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n] * ctx.world, None, None


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over rows whose logits are split column-wise across ranks.

    ``labels`` hold the local column of each row's target, or -1 where another rank owns it.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, world: int) -> torch.Tensor:
        import torch.distributed as dist

        logits = logits.float()
        row_max = logits.max(dim=1, keepdim=True).values
        if world > 1:
            dist.all_reduce(row_max, dist.ReduceOp.MAX)
        exp = torch.exp(logits - row_max)
        denom = exp.sum(dim=1, keepdim=True)
        if world > 1:
            dist.all_reduce(denom)
        prob = exp / denom
        # gather + mask instead of boolean indexing: no host sync, so the GPU queue never drains
        valid = (labels >= 0)[:, None]
        col = labels.clamp(min=0)[:, None]
        target_prob = prob.gather(1, col) * valid
        if world > 1:
            dist.all_reduce(target_prob)
        ctx.save_for_backward(prob, labels)
        return -torch.log(target_prob.clamp_min(1e-30)).mean()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        prob, labels = ctx.saved_tensors
        valid = (labels >= 0)[:, None].to(prob.dtype)
        grad = prob.scatter_add(1, labels.clamp(min=0)[:, None], -valid)
        grad *= grad_out / prob.shape[0]
        return grad, None, None


class PartialFC(nn.Module):
    """Margin-softmax classifier with sharded, optionally sampled class centres.

    Args:
        margin_loss: maps (cos (B, C_sampled), local labels, -1 = not here) to scaled logits.
        embedding_size: D of the backbone output.
        num_classes: total number of identities over all ranks.
        sample_rate: share of this rank's centres scored per step (positives are always kept).
    Forward: ``(embeddings (b, D), labels (b,)) -> scalar loss`` (mean over the global batch).
    """

    def __init__(self, margin_loss: Callable, embedding_size: int, num_classes: int,
                 sample_rate: float = 1.0):
        super().__init__()
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.rank, self.world_size = _world()
        self.margin_loss = margin_loss
        self.embedding_size, self.num_classes, self.sample_rate = embedding_size, num_classes, sample_rate
        base, extra = divmod(num_classes, self.world_size)
        self.num_local = base + int(self.rank < extra)
        self.class_start = base * self.rank + min(self.rank, extra)
        self.num_sample = max(1, int(sample_rate * self.num_local))
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))

    @property
    def shard_range(self) -> tuple[int, int]:
        return self.class_start, self.class_start + self.num_local

    @property
    def sharding(self) -> dict[str, int]:
        """This rank's class shard as plain data (checkpointed with the weights, so a resume can tell a
        changed world size or class count): classes ``class_start .. class_start + num_local - 1`` of
        ``num_classes``, under ``world_size`` processes."""
        return {"class_start": self.class_start, "num_local": self.num_local, "num_classes": self.num_classes,
                "world_size": self.world_size}

    def _sample(self, local_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centres to score this step and the labels re-indexed into them."""
        if self.sample_rate >= 1 or not self.training:
            return self.weight, local_labels
        has = local_labels >= 0
        positives = torch.unique(local_labels[has])
        if positives.numel() >= self.num_sample:
            index = positives
        else:
            score = torch.rand(self.num_local, device=self.weight.device)
            score[positives] = 2.0  # always kept
            index = torch.topk(score, self.num_sample).indices.sort().values
        remapped = local_labels.clone()
        remapped[has] = torch.searchsorted(index, local_labels[has])
        return self.weight[index], remapped

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.view(-1).long()
        if self.world_size > 1:
            import torch.distributed as dist

            embeddings = _GatherWithGrad.apply(embeddings, self.world_size, self.rank)
            gathered = [torch.empty_like(labels) for _ in range(self.world_size)]
            dist.all_gather(gathered, labels)
            labels = torch.cat(gathered)
        local = labels - self.class_start
        local = torch.where((local >= 0) & (local < self.num_local), local, torch.full_like(local, -1))
        weight, local = self._sample(local)
        cos = F.linear(F.normalize(embeddings.float()), F.normalize(weight.float())).clamp(-1, 1)
        logits = self.margin_loss(cos, local)
        return _ShardedCrossEntropy.apply(logits, local, self.world_size)

    def extra_repr(self) -> str:
        return (f"classes {self.class_start}..{self.class_start + self.num_local} of {self.num_classes}, "
                f"embedding {self.embedding_size}, sample_rate {self.sample_rate}")
