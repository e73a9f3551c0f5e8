"""Evaluate several shards' epsilon predictions for one denoising step.

Full shards are independent `UNet2DModel`s: one batched call each (stacking their
parameters under `torch.func.vmap` fails inside diffusers' UNet). LoRA shards share a
base UNet: all of them are evaluated in one forward pass, the batch replicated once
per adapter and routed with peft's mixed-adapter batches (`adapter_names=[...]`).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from peft import PeftModel


class ShardEnsemble(torch.nn.Module):
    """Holds loaded shards; knows nothing of how they are mixed."""

    def __init__(self, full: dict[str, UNet2DModel], lora: PeftModel | None = None,
                 lora_ids: list[str] | None = None):
        super().__init__()
        self.full = torch.nn.ModuleDict(full)
        self.lora = lora
        self.lora_ids = list(lora_ids or [])
        overlap = set(self.full) & set(self.lora_ids)
        if overlap:
            raise ValueError(f"contributors both full and LoRA: {sorted(overlap)}")

    @property
    def contributor_ids(self) -> list[str]:
        return sorted([*self.full, *self.lora_ids])

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, ids: list[str]) -> torch.Tensor:
        """epsilon_i(x_t, t) for i in `ids`, stacked as (len(ids), B, C, H, W)."""
        out: dict[str, torch.Tensor] = {}
        lora_ids = [c for c in ids if c in self.lora_ids]
        if lora_ids:
            batch = x_t.shape[0]
            names = [c for c in lora_ids for _ in range(batch)]
            t_rep = t.repeat(len(lora_ids)) if t.ndim == 1 else t
            eps = self.lora(x_t.repeat(len(lora_ids), 1, 1, 1), t_rep, adapter_names=names).sample
            out.update(zip(lora_ids, eps.split(batch), strict=True))
        for cid in ids:
            if cid in self.full:
                out[cid] = self.full[cid](x_t, t).sample
            elif cid not in out:
                raise KeyError(cid)
        return torch.stack([out[c] for c in ids])
