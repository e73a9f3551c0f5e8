"""LoRA shards evaluated unmerged: one shared base, every shard's adapters stacked.

A store whose live shards are all LoRA adapters on one base (kind `lora`, and every
store on a pretrained pipeline) differs from shard to shard only in the adapted
layers' low-rank updates. `ShardBank(..., adapters=...)` then keeps one copy of the
base and, in each adapted layer, the adapters of up to `capacity` shards stacked
along a slot axis; row b of a batch uses slot s_b:

    y_b = W x_b + c  +  scale[s_b] B[s_b] (A[s_b] x_b)

(W, c the base's; A (r, in) or a convolution to r channels with the base's kernel,
B (out, r), scale = alpha / r, as peft defines them). The base runs as one plain
batched call whatever the rows' shards; each adapted layer adds two small per-row
products. A pass of one shard's rows only (the bank's solo calls) merges that shard's
W + scale B A per layer on the fly and makes one plain call, as a merged copy would. A resident shard costs its adapter's size (the tiny pipeline's: 0.1 MB;
Stable Diffusion 1.5 at rank 8: about 13 MB) instead of a merged copy of the UNet
(3.4 GB in float32 for Stable Diffusion 1.5): the cache holds hundreds of them, as
multi-adapter servers do. Merged and unmerged agree up to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as safetensors_load

PEFT_PREFIX = "base_model.model."


class _Adapted(torch.nn.Module):
    """Stacked A, B and scale of one adapted layer; the base layer shared."""

    def _stack(self, base, a_shape, b_shape, capacity: int, route) -> None:
        self.base, self.route = base, route
        self.register_buffer("a_stack", torch.zeros(capacity, *a_shape), persistent=False)
        self.register_buffer("b_stack", torch.zeros(capacity, *b_shape), persistent=False)
        self.register_buffer("scale", torch.zeros(capacity), persistent=False)

    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        self.a_stack[slot].copy_(a.reshape(self.a_stack.shape[1:]))
        self.b_stack[slot].copy_(b.reshape(self.b_stack.shape[1:]))
        self.scale[slot] = scale


class AdaptedLinear(_Adapted):
    def __init__(self, linear: torch.nn.Linear, rank: int, capacity: int, route):
        super().__init__()
        self._stack(linear, (rank, linear.in_features), (linear.out_features, rank), capacity, route)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route.single is not None:  # one shard's rows: its merged weight, one call
            s = self.route.single
            weight = self.base.weight + self.scale[s] * (self.b_stack[s] @ self.a_stack[s])
            return F.linear(x, weight, self.base.bias)
        y = self.base(x)
        slots = self.route.slots
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (rows, tokens, in)
        h = torch.bmm(flat, self.a_stack[slots].transpose(1, 2))
        d = torch.bmm(h, (self.b_stack[slots] * self.scale[slots, None, None]).transpose(1, 2))
        return y + d.reshape(y.shape)


class AdaptedConv2d(_Adapted):
    def __init__(self, conv: torch.nn.Conv2d, rank: int, capacity: int, route):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("AdaptedConv2d supports groups=1, zero padding")
        self._stack(conv, (rank, conv.in_channels, *conv.kernel_size), (conv.out_channels, rank),
                    capacity, route)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.base
        if self.route.single is not None:  # one shard's rows: its merged weight, one call
            s = self.route.single
            delta = (self.b_stack[s] @ self.a_stack[s].flatten(1)).view_as(conv.weight)
            return F.conv2d(x, conv.weight + self.scale[s] * delta, conv.bias, conv.stride,
                            conv.padding, conv.dilation)
        y = conv(x)
        slots = self.route.slots
        rows, cin, height, width = x.shape
        a = self.a_stack[slots]  # (rows, r, in, kh, kw)
        h = F.conv2d(x.reshape(1, rows * cin, height, width), a.reshape(-1, *a.shape[2:]), None,
                     conv.stride, conv.padding, conv.dilation, groups=rows)
        h = h.reshape(rows, a.shape[1], *h.shape[2:])
        b = self.b_stack[slots] * self.scale[slots, None, None]
        return y + torch.einsum("bor,brhw->bohw", b, h)


def adapt_modules(net: torch.nn.Module, targets: set[str], rank: int, capacity: int,
                  route) -> dict[str, _Adapted]:
    """Wrap every layer of `net` named in `targets` by its adapted twin, in place; the
    rest stays `net`'s own (shared by every shard).

    Raises:
        ValueError: a target that is not a Linear or Conv2d of `net`.
    """
    adapted = {}
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if full not in targets:
                continue
            kinds = {torch.nn.Linear: AdaptedLinear, torch.nn.Conv2d: AdaptedConv2d}
            if type(child) not in kinds:
                raise ValueError(f"an adapter targets {full}, a {type(child).__name__}")
            adapted[full] = kinds[type(child)](child, rank, capacity, route)
            setattr(module, child_name, adapted[full])
    missing = sorted(targets - set(adapted))
    if missing:
        raise ValueError(f"adapters target layers the base does not have: {missing[:3]}")
    return adapted


def read_adapter(folder: Path, files: dict[str, bytes] | None = None) -> dict:
    """A peft LoRA folder as {"rank", "scale", "layers": {name: (A, B)}}; `files` (name
    -> bytes, already read and checked) or the folder's files."""
    def raw(name: str) -> bytes:
        return files[name] if files and name in files else (folder / name).read_bytes()

    config = json.loads(raw("adapter_config.json"))
    if config.get("use_rslora") or config.get("use_dora"):
        raise ValueError(f"{folder}: rsLoRA/DoRA adapters are not supported unmerged")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{folder}: per-layer ranks are not supported unmerged")
    state = safetensors_load(raw("adapter_model.safetensors"))
    layers: dict[str, list] = {}
    for key, tensor in state.items():
        name, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        layers.setdefault(name, [None, None])[0 if part.startswith("A") else 1] = tensor
    return {"rank": rank, "scale": alpha / rank, "layers": {k: tuple(v) for k, v in layers.items()}}
