"""A bounded cache of shards that evaluates any mix of (sample, shard) pairs in one
forward pass.

All shards of a store share one UNet architecture, so a batch whose rows need
different shards can run through one copy of that architecture whose every
convolution, linear layer and group norm holds the weights of up to `capacity`
shards stacked along a leading slot axis. Row b of the batch uses slot s_b:

    conv:  y_b = W[s_b] * x_b + c[s_b]     (one grouped convolution, groups = rows)
    norm:  y_b = gamma[s_b] GN(x_b) + beta[s_b]       (group and layer norms)
    linear y_b = W[s_b] x_b + c[s_b]       (a batched matmul)
    class  y_b = E[s_b][label_b]           (class-conditional shards: a gather)

Rows are ordered by shard; a shard with many rows (`solo_rows` or more) runs as a
plain call with its own weights (one call's overhead amortised over its rows), the
remaining rows run together in one stacked call. So a routed step costs about one
UNet pass over the routed rows whatever the number of distinct shards, where calling
each shard separately would cost one call's fixed overhead per shard (measured: a
UNet call on 2 CPU cores costs about 6.5 ms at batch 1 and 29 ms at batch 64).

Where the line lies depends on the model and the machine, so unless `solo_rows` is
given (or `CDM_SOLO_ROWS`), the bank times both kinds of call on its first pass and
picks each step's split by that measured cost (passcost.py); a model too large to
time cheaply keeps the `SOLO_ROWS` threshold.

LoRA shards are loaded either with their adapter merged into the base weights
(W + scale * B A), then evaluated like full shards, or unmerged (`adapters`): one
shared base and only the adapters stacked (adapters.py), which a store picks when
every live shard is an adapter on its base.

The cache is an LRU over slots; `hits`, `misses` and `evictions` count shard
look-ups (one per distinct shard per pass). A step that needs more distinct shards
than the cache holds runs in several passes (correct, only slower).
"""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from .adapters import adapt_modules
from .passcost import PassCosts, measured
from .settings import env_int

DEFAULT_CAPACITY = 1024
SOLO_ROWS = 32  # rows from which a shard runs solo, where the costs are not measured
MAX_ROWS = 256


class _Route:
    """The slot of every row of the batch now in flight (shared by all layers)."""

    def __init__(self):
        self.slots: torch.Tensor | None = None  # (rows,) long
        self.single: int | None = None  # every row uses this slot


class _Stacked(torch.nn.Module):
    """Mixin state: stacked parameters (capacity, *shape) and the shared route."""

    def _stack(self, source: torch.nn.Module, capacity: int, route: _Route) -> None:
        self.route = route
        for name in ("weight", "bias"):
            p = getattr(source, name, None)
            stacked = None if p is None else torch.zeros(capacity, *p.shape, dtype=p.dtype)
            self.register_buffer(f"{name}_stack", stacked, persistent=False)

    def _param(self, name: str) -> torch.Tensor | None:
        stack = getattr(self, f"{name}_stack")
        if stack is None:
            return None
        if self.route.single is not None:
            return stack[self.route.single]
        return stack[self.route.slots]


class StackedConv2d(_Stacked):
    def __init__(self, conv: torch.nn.Conv2d, capacity: int, route: _Route):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("StackedConv2d supports groups=1, zero padding")
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self._stack(conv, capacity, route)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._param("weight"), self._param("bias")
        if self.route.single is not None:
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        rows, cin, h, w = x.shape
        cout = weight.shape[1]
        y = F.conv2d(x.reshape(1, rows * cin, h, w), weight.reshape(rows * cout, *weight.shape[2:]),
                     None, self.stride, self.padding, self.dilation, groups=rows)
        y = y.reshape(rows, cout, *y.shape[2:])
        return y if bias is None else y + bias[:, :, None, None]


class StackedLinear(_Stacked):
    def __init__(self, linear: torch.nn.Linear, capacity: int, route: _Route):
        super().__init__()
        self._stack(linear, capacity, route)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._param("weight"), self._param("bias")
        if self.route.single is not None:
            return F.linear(x, weight, bias)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (rows, tokens, in)
        y = torch.bmm(flat, weight.transpose(1, 2))
        if bias is not None:
            y = y + bias[:, None, :]
        return y.reshape(*x.shape[:-1], weight.shape[1])


class StackedGroupNorm(_Stacked):
    def __init__(self, norm: torch.nn.GroupNorm, capacity: int, route: _Route):
        super().__init__()
        if not norm.affine:
            raise ValueError("StackedGroupNorm needs an affine GroupNorm")
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self._stack(norm, capacity, route)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._param("weight"), self._param("bias")
        if self.route.single is not None:
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        y = F.group_norm(x, self.num_groups, None, None, self.eps)
        extra = (1,) * (x.ndim - 2)
        return y * weight.reshape(*weight.shape, *extra) + bias.reshape(*bias.shape, *extra)


class StackedLayerNorm(_Stacked):
    def __init__(self, norm: torch.nn.LayerNorm, capacity: int, route: _Route):
        super().__init__()
        if not norm.elementwise_affine:
            raise ValueError("StackedLayerNorm needs an affine LayerNorm")
        self.shape, self.eps = norm.normalized_shape, norm.eps
        self._stack(norm, capacity, route)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._param("weight"), self._param("bias")
        if self.route.single is not None:
            return F.layer_norm(x, self.shape, weight, bias, self.eps)
        y = F.layer_norm(x, self.shape, None, None, self.eps)
        extra = (1,) * (x.ndim - 2)  # (rows, ..., features)
        y = y * weight.reshape(weight.shape[0], *extra, -1)
        return y if bias is None else y + bias.reshape(bias.shape[0], *extra, -1)


class StackedEmbedding(_Stacked):
    def __init__(self, embedding: torch.nn.Embedding, capacity: int, route: _Route):
        super().__init__()
        self._stack(embedding, capacity, route)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.route.single is not None:
            return F.embedding(labels, self.weight_stack[self.route.single])
        return self.weight_stack[self.route.slots, labels]


_STACKED = {torch.nn.Conv2d: StackedConv2d, torch.nn.Linear: StackedLinear,
            torch.nn.GroupNorm: StackedGroupNorm, torch.nn.Embedding: StackedEmbedding,
            torch.nn.LayerNorm: StackedLayerNorm}


def _stack_modules(net: torch.nn.Module, capacity: int, route: _Route) -> dict[str, _Stacked]:
    """Replace every parametric layer of `net` by its stacked twin, in place."""
    stacked = {}
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            kind = _STACKED.get(type(child))
            if kind is not None:
                twin = kind(child, capacity, route)
                setattr(module, child_name, twin)
                stacked[f"{name}.{child_name}" if name else child_name] = twin
            elif any(True for _ in child.parameters(recurse=False)):
                raise ValueError(f"ShardBank cannot stack layer {child_name} of type {type(child).__name__}")
    return stacked


class ShardBank(torch.nn.Module):
    """Loaded shards in `capacity` slots, evaluated by (sample, shard) pairs.

    Args:
        template: a UNet of the store's architecture (its weights are not used), or with
            `adapters`, the base every adapter adapts (its weights are used).
        loader: contributor id -> that shard's UNet state dict (full weights), or with
            `adapters`, its adapter (adapters.py `read_adapter`).
        contributor_ids: the shards this bank may load (the live ones).
        capacity: how many shards stay resident (at least 1).
        adapters: {"targets": adapted layer names, "rank": r}: LoRA shards unmerged.
    """

    def __init__(self, template: UNet2DModel, loader: Callable[[str], dict[str, torch.Tensor]],
                 contributor_ids: list[str], capacity: int = DEFAULT_CAPACITY,
                 solo_rows: int | None = None, max_rows: int = MAX_ROWS,
                 adapters: dict | None = None):
        super().__init__()
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"shard cache capacity={capacity!r}; it must hold at least 1 shard")
        self.capacity = min(capacity, max(1, len(contributor_ids)))
        self.contributor_ids = sorted(contributor_ids)
        self._known = set(self.contributor_ids)
        self.loader = loader
        if solo_rows is None:
            solo_rows = env_int("CDM_SOLO_ROWS")
        # solo_rows None: the split is chosen by `costs`, timed on the first pass
        self.solo_rows, self.max_rows = solo_rows, max_rows
        self.costs: PassCosts | None = None
        self.route = _Route()
        self.net = copy.deepcopy(template).eval().requires_grad_(False)
        self.adapters = adapters
        if adapters is None:
            self.layers = _stack_modules(self.net, self.capacity, self.route)
        else:
            self.layers = adapt_modules(self.net, set(adapters["targets"]), adapters["rank"],
                                        self.capacity, self.route)
        self.slots: OrderedDict[str, int] = OrderedDict()  # contributor -> slot, LRU first
        self.hits = self.misses = self.evictions = 0
        # one pass at a time: the route and the slots are shared by every thread
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.net.buffers()).device

    def stats(self) -> dict:
        looks = self.hits + self.misses
        return {"capacity": self.capacity, "resident": len(self.slots), "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions,
                "hit_rate": self.hits / looks if looks else None,
                "pass_costs": None if self.costs is None else vars(self.costs)}

    def _ensure(self, ids: list[str]) -> dict[str, int]:
        """Make every shard of `ids` (at most `capacity`) resident; return their slots.
        A load that fails leaves its slot free, never shared."""
        needed = set(ids)
        for cid in ids:
            if cid in self.slots:
                self.hits += 1
                self.slots.move_to_end(cid)
                continue
            self.misses += 1
            free = sorted(set(range(self.capacity)) - set(self.slots.values()))
            if free:
                slot = free[0]
            else:
                victim = next(c for c in self.slots if c not in needed)
                slot = self.slots.pop(victim)
                self.evictions += 1
            self._write(slot, self.loader(cid))
            self.slots[cid] = slot
        return {cid: self.slots[cid] for cid in ids}

    @torch.no_grad()
    def _write(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        if self.adapters is not None:
            if state["rank"] != self.adapters["rank"] or set(state["layers"]) != set(self.layers):
                raise ValueError("an adapter of another rank or other layers than the bank's")
            for name, layer in self.layers.items():
                layer.write(slot, *state["layers"][name], state["scale"])
            return
        for name, layer in self.layers.items():
            for part in ("weight", "bias"):
                stack = getattr(layer, f"{part}_stack")
                if stack is not None:
                    stack[slot].copy_(state[f"{name}.{part}"])

    @torch.no_grad()
    def evaluate(self, x_t: torch.Tensor, t: torch.Tensor, shard_ids: list[str],
                 labels: torch.Tensor | None = None, text=None) -> torch.Tensor:
        """eps_{shard_ids[r]}(x_t[r], t[r] (, labels[r] or text[r])) for every row r, as
        (rows, C, H, W); `labels` for class-conditional shards, `text` (a
        text.TextBatch) for text-conditional ones.

        Raises:
            KeyError: a shard id this bank does not hold.
        """
        unknown = sorted(set(shard_ids) - self._known)
        if unknown:
            raise KeyError(f"shards not in this bank: {unknown}")
        with self._lock:
            return self._evaluate(x_t, t, shard_ids, labels, text)

    def _evaluate(self, x_t, t, shard_ids, labels=None, text=None) -> torch.Tensor:
        if self.solo_rows is None and self.costs is None:
            self._measure(x_t, t, shard_ids[0], labels, text)
        out = torch.empty_like(x_t)
        groups: dict[str, list[int]] = {}
        for r, cid in enumerate(shard_ids):
            groups.setdefault(cid, []).append(r)
        if self.costs is not None:
            alone = self.costs.solo({c: len(rows) for c, rows in groups.items()})
        else:
            alone = {c for c, rows in groups.items() if len(rows) >= self.solo_rows}
        solo = [c for c in groups if c in alone]
        rest = [c for c in groups if c not in alone]
        for cid in solo:
            rows = torch.tensor(groups[cid], device=x_t.device)
            slot = self._ensure([cid])[cid]
            out[rows] = self._forward(x_t[rows], t[rows], _at(labels, rows), _at(text, rows),
                                      single=slot)
        for chunk in self._passes(rest, groups):
            slots = self._ensure(chunk)
            rows = [r for c in chunk for r in groups[c]]
            row_slots = [slots[c] for c in chunk for _ in groups[c]]
            idx = torch.tensor(rows, device=x_t.device)
            out[idx] = self._forward(x_t[idx], t[idx], _at(labels, idx), _at(text, idx),
                                     slots=torch.tensor(row_slots, device=x_t.device))
        return out

    def _passes(self, ids: list[str], groups: dict[str, list[int]]) -> list[list[str]]:
        """Split shards into passes of at most `capacity` shards and `max_rows` rows."""
        passes, current, rows = [], [], 0
        for cid in ids:
            n = len(groups[cid])
            if current and (len(current) == self.capacity or rows + n > self.max_rows):
                passes.append(current)
                current, rows = [], 0
            current.append(cid)
            rows += n
        return passes + ([current] if current else [])

    def _measure(self, x_t, t, shard_id: str, labels=None, text=None) -> None:
        """Time plain calls and stacked passes of row 0 repeated (passcost.py); a model
        too slow to time keeps the SOLO_ROWS threshold."""
        slot = self._ensure([shard_id])[shard_id]

        def run(rows: int, stacked: bool) -> None:
            idx = torch.zeros(rows, dtype=torch.long, device=x_t.device)
            where = ({"slots": torch.full((rows,), slot, device=x_t.device)} if stacked
                     else {"single": slot})
            self._forward(x_t[idx], t[idx], _at(labels, idx), _at(text, idx), **where)

        what = "labels" if labels is not None else "text" if text is not None else "none"
        key = json.dumps([dict(self.net.config), self.adapters, list(x_t.shape[1:]), what],
                         sort_keys=True, default=str)
        self.costs = measured(key, run, x_t.device)
        if self.costs is None:
            self.solo_rows = SOLO_ROWS

    def _forward(self, x, t, labels=None, text=None, slots=None, single=None) -> torch.Tensor:
        self.route.slots, self.route.single = slots, single
        try:
            if text is not None:
                return self.net(x, t, **text.unet_kwargs()).sample
            return self.net(x, t, class_labels=labels).sample
        finally:
            self.route.slots = self.route.single = None


def _at(labels, rows: torch.Tensor):
    """Rows of per-row conditions (labels, or a text.TextBatch), None passed through."""
    return None if labels is None else labels[rows]
