"""The routing maths: the posterior over a subset S of shards, and which shards each
sample is evaluated on at a denoising step.

Any router gives scores s_i(x_t, t) equal to log p_t^i(x_t) up to a constant shared by
every i (router.py); with priors lambda_i the posterior restricted to S is

    (2) w_i^S = softmax_{i in S}( s_i + log lambda_i )
              = lambda_i p_t^i(x_t) / sum_{j in S} lambda_j p_t^j(x_t)      (docs/maths.md)

so masking the scores to S is the exact posterior of S (`posterior_weights`).

Sparse routing: given the masked weights w^S (B, K) of a step (rows sum to 1 over S),
a routing picks for every sample b a set R_b within S and renormalises over it:

    dense   R_b = S                                                  (the reference)
    topk    R_b = the top_k shards by w_b, or the smallest set (in decreasing weight)
            holding at least `mass` of it, or, with both, that set cut to top_k;
            with `draw_above`, at the steps whose timestep t exceeds it, R_b = {I_b}
            instead: one shard drawn with P(I_b = i) = w_{b,i} and weight 1, so
            E[eps_{I_b}] = sum_i w_{b,i} eps_i (an unbiased estimate of eq. 3 at one
            shard's cost; at high noise the shards' predictions nearly agree)

    (4) w~_{b,i} = w_{b,i} / sum_{j in R_b} w_{b,j}   for i in R_b, else 0

and eps_S(x_b) ~= sum_{i in R_b} w~_{b,i} eps_i(x_b). With mass = 1 (or top_k = |S|)
every sample keeps its whole S: dense within float tolerance. Attribution is always
the full w^S (what a sample is attributed to), never the truncated w~.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .settings import DEFAULT_MASS, DEFAULT_TOP_K
from .settings import ROUTINGS as KINDS


def posterior_weights(log_ratios: torch.Tensor, log_prior: torch.Tensor,
                      allowed: torch.Tensor) -> torch.Tensor:
    """Eq. (2): softmax over i in S of (s_i + log lambda_i), for any router's scores s_i
    that equal log p_t^i(x_t) up to a constant shared by all i.

    Args:
        log_ratios: (B, n) router scores.
        log_prior: (n,) log lambda_i, or (B, n) per sample (lambda_i(y_b), labelled stores).
        allowed: (n,) or (B, n) bool, the subset S; at least one True per row.

    Returns:
        (B, n) weights, zero outside S, each row summing to 1.

    Raises:
        ValueError: an empty S in some row.
    """
    if not bool(allowed.any(dim=-1).all()):
        raise ValueError("the allowed subset S is empty")
    z = (log_ratios + log_prior).masked_fill(~allowed, float("-inf"))
    return torch.softmax(z, dim=-1)


@dataclass(frozen=True)
class Routing:
    """How many shards a sample is evaluated on: `dense`, or `topk` with `top_k`
    and/or `mass`."""

    kind: str = "dense"
    top_k: int | None = None
    mass: float | None = None
    default_k: bool = False  # top_k is the default's: cut to |S|, not an error
    draw_above: int | None = None  # timesteps above it: one shard drawn from w_b

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"routing={self.kind!r}; allowed: {list(KINDS)}")
        if self.draw_above is not None and (isinstance(self.draw_above, bool) or not isinstance(
                self.draw_above, int) or self.draw_above < 0):
            raise ValueError(f"draw_above={self.draw_above!r}; allowed: a timestep >= 0")
        if self.kind == "dense":
            if self.top_k is not None or self.mass is not None or self.draw_above is not None:
                raise ValueError("routing 'dense' takes no top_k, mass or draw_above; "
                                 "use routing 'topk'")
            return
        if self.top_k is None and self.mass is None:
            raise ValueError("routing 'topk' needs top_k (an integer >= 1) and/or mass in (0, 1]")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r}; allowed: an integer >= 1")
        if self.mass is not None and not (isinstance(self.mass, (int, float)) and 0 < self.mass <= 1):
            raise ValueError(f"mass={self.mass!r}; allowed: a number in (0, 1]")

    @classmethod
    def parse(cls, kind: str | None = None, top_k: int | None = None,
              mass: float | None = None, mode: str = "composed",
              draw_above: int | None = None) -> Routing:
        """From user input (CLI, API). No kind: `topk` if top_k, mass or draw_above is
        given, else the default routing (dense for mode `naive`, whose weights are
        uniform). `topk` with neither top_k nor mass is the default's top_k and mass
        (with `draw_above` if given, else the default's); giving top_k or mass sets
        exactly what is given (the others are then unset, not defaulted).

        Raises:
            ValueError: bad values, or sparse routing with mode `naive`.
        """
        if kind is None:
            kind = "topk" if (top_k is not None or mass is not None or draw_above is not None) else (
                "dense" if mode == "naive" else DEFAULT_ROUTING.kind)
        if kind == "topk" and top_k is None and mass is None:
            if draw_above is None:
                return DEFAULT_ROUTING.check_mode(mode)
            return replace(DEFAULT_ROUTING, draw_above=draw_above).check_mode(mode)
        if isinstance(mass, int) and not isinstance(mass, bool):
            mass = float(mass)
        return cls(kind, top_k, mass, draw_above=draw_above).check_mode(mode)

    def check_mode(self, mode: str) -> Routing:
        """Return self; raise ValueError if this sparse routing meets mode `naive`."""
        if mode == "naive" and self.kind != "dense":
            raise ValueError(f"routing={self.kind!r} needs mode 'composed' (naive weights are uniform)")
        return self

    def check_subset(self, size: int) -> None:
        """Raise ValueError if a requested `top_k` exceeds a subset of `size` shards."""
        if self.top_k is not None and not self.default_k and self.top_k > size:
            raise ValueError(f"top_k={self.top_k} is larger than the {size} contributor(s) "
                             f"requested; allowed: 1..{size}")

    def max_shards(self, size: int) -> int:
        """The most shards a sample is evaluated on at a step, for a subset of `size`
        contributors: top_k (at most `size`) when it is set, else all of them (dense,
        or a mass alone, which can need every shard)."""
        return size if self.top_k is None else min(self.top_k, size)

    def to_dict(self) -> dict:
        return {"routing": self.kind, "top_k": self.top_k, "mass": self.mass,
                "draw_above": self.draw_above}

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in (("top_k", self.top_k), ("mass", self.mass),
                                         ("draw_above", self.draw_above)) if v is not None]
        return self.kind + (f" ({', '.join(parts)})" if parts else "")


# Chosen from benchmarks/routing_sweep.py (docs/evidence.md, "Choosing the default routing").
DEFAULT_ROUTING = Routing("topk", top_k=DEFAULT_TOP_K, mass=DEFAULT_MASS, default_k=True)


def route(w: torch.Tensor, routing: Routing, t: torch.Tensor | None = None,
          u: torch.Tensor | None = None) -> torch.Tensor:
    """Equation (4): the renormalised weights w~ (B, K), zero outside each R_b.

    Args:
        w: (B, K) weights, zero outside S, rows summing to 1.
        t: (B,) each row's timestep, and u: (B,) uniforms in [0, 1) (from each
            request's own generator), both needed when `routing.draw_above` is set.
    """
    if routing.kind == "dense":
        return w
    routed = _top(w, routing)
    if routing.draw_above is None:
        return routed
    if t is None or u is None:
        raise ValueError("routing with draw_above needs each row's timestep and a uniform")
    drawn = draw(w, u)
    early = (t > routing.draw_above)[:, None]
    return torch.where(early, drawn, routed)


def draw(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One-hot (B, K): shard i of row b with probability w_{b,i}, by inverse CDF at u_b.
    The first i whose cumulative weight exceeds u_b times the row's total, so a shard
    of weight 0 is never drawn."""
    cum = torch.cumsum(w, dim=1)
    target = (u.to(w.dtype) * cum[:, -1])[:, None]
    index = (cum <= target).sum(1).clamp(max=w.shape[1] - 1)
    return torch.zeros_like(w).scatter(1, index[:, None], 1.0)


def _top(w: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Top-k and/or mass routing of eq. (4)."""
    order = torch.argsort(w, dim=1, descending=True)
    sorted_w = torch.gather(w, 1, order)
    rank = torch.arange(w.shape[1], device=w.device).expand_as(w)
    keep = sorted_w > 0
    if routing.mass is not None and routing.mass < 1:
        # keep shard r if the mass of the shards ranked above it is still below `mass`
        before = torch.cumsum(sorted_w, dim=1) - sorted_w
        keep &= before < routing.mass
    if routing.top_k is not None:
        keep &= rank < routing.top_k
    keep[:, 0] = True  # the largest weight is always kept
    routed = torch.zeros_like(w).scatter(1, order, sorted_w * keep)
    return routed / routed.sum(dim=1, keepdim=True)
