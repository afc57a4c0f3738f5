"""Token merging in self-attention (ToMe, as Bolya & Hoffman adapted it to Stable Diffusion): fewer tokens for the
quadratic part of the U-Net's most expensive attention, copied back to full length after it.

For one U-Net call, :class:`TokenMerge` splits the token grid into 2x2 cells and picks one token per cell as a
destination (at a seeded random position, so the grid leaves no fixed pattern and the same call gives the same
choice whatever else shares the batch); the others are sources. Each source is matched to its most similar
destination (cosine similarity of the normalised hidden states); the ``ratio x N`` best-matched sources are averaged
into their destination. Self-attention then runs on the remaining tokens, and every merged source gets its
destination's output back. Cross-attention and the feed-forward run on all tokens (what ToMe for SD does by
default: they cost O(N), where self-attention costs O(N^2)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["TokenMerge"]

Fn = Callable[[torch.Tensor], torch.Tensor]


class TokenMerge:
    """The merging of one U-Net call: ``ratio`` of the tokens, destinations drawn from a generator seeded with
    ``seed`` (one draw per grid size, shared by every block of the call)."""

    def __init__(self, ratio: float, seed: int) -> None:
        self.ratio = ratio
        self.seed = seed
        self._partitions: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def _partition(self, hw: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(source indices, destination indices) into the flattened h x w grid; tokens of an odd last row or column
        lie in no whole cell and are always sources."""
        key = (*hw, str(device))
        if key not in self._partitions:
            h, w = hw
            ch, cw = h // 2, w // 2
            gen = torch.Generator("cpu").manual_seed(self.seed)
            pick = torch.randint(0, 4, (ch, cw), generator=gen)
            rows = torch.arange(ch)[:, None] * 2 + pick // 2
            cols = torch.arange(cw)[None, :] * 2 + pick % 2
            dst = (rows * w + cols).flatten()
            is_dst = torch.zeros(h * w, dtype=torch.bool)
            is_dst[dst] = True
            src = torch.nonzero(~is_dst).flatten()
            self._partitions[key] = (src.to(device), dst.to(device))
        return self._partitions[key]

    def plan(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[Fn, Fn]:
        """(merge, unmerge) for hidden states ``x`` [B, N, C] on an ``hw`` grid; identity functions when the grid is
        too small to merge anything."""
        b, n, c = x.shape
        src_idx, dst_idx = self._partition(hw, x.device)
        r = min(int(n * self.ratio), src_idx.numel())
        if r <= 0:
            return _identity, _identity
        metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = metric[:, src_idx] @ metric[:, dst_idx].transpose(1, 2)  # [B, Ns, Nd]
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        merged, kept = order[:, :r], order[:, r:]  # positions among the sources
        into = best_dst.gather(1, merged)  # each merged source's destination (position among the destinations)
        n_kept = kept.shape[1]

        def merge(t: torch.Tensor) -> torch.Tensor:
            d = t.shape[-1]
            src, dst = t[:, src_idx], t[:, dst_idx]
            moving = src.gather(1, merged[..., None].expand(-1, -1, d))
            dst = dst.scatter_reduce(1, into[..., None].expand(-1, -1, d), moving, reduce="mean", include_self=True)
            return torch.cat([src.gather(1, kept[..., None].expand(-1, -1, d)), dst], dim=1)

        def unmerge(t: torch.Tensor) -> torch.Tensor:
            d = t.shape[-1]
            kept_out, dst_out = t[:, :n_kept], t[:, n_kept:]
            out = t.new_empty(t.shape[0], n, d)
            out[:, dst_idx] = dst_out
            positions = src_idx[kept]  # [B, n_kept] grid positions of the kept sources
            out.scatter_(1, positions[..., None].expand(-1, -1, d), kept_out)
            out.scatter_(1, src_idx[merged][..., None].expand(-1, -1, d),
                         dst_out.gather(1, into[..., None].expand(-1, -1, d)))
            return out

        return merge, unmerge


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t
