"""What every valuation method returns: values per player with standard errors, how
many utility evaluations it took and how long. One type for exact, sampled,
pruned-fine-tune, retrain and baseline methods, so the report compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ValuationResult:
    """phi_i per player (in `players` order), with stderr (0 where exact).

    `u_full` and `u_empty` are U(N) and U(empty set) of the utility that produced the
    values; efficiency says sum(values) == u_full - u_empty for Shapley methods.
    """

    method: str
    property: str
    players: list[str]
    values: np.ndarray
    stderr: np.ndarray
    u_full: float
    u_empty: float
    evaluations: int = 0
    seconds: float = 0.0
    samples: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.values = np.asarray(self.values, dtype=np.float64)
        self.stderr = np.asarray(self.stderr, dtype=np.float64)
        if self.values.shape != (len(self.players),) or self.stderr.shape != self.values.shape:
            raise ValueError(f"values {self.values.shape} and stderr {self.stderr.shape} must "
                             f"have one entry per player ({len(self.players)})")

    def efficiency_gap(self) -> float:
        """|sum phi - (U(N) - U(empty))| relative to max(1, |U(N) - U(empty)|)."""
        total = self.u_full - self.u_empty
        return abs(float(np.sum(self.values)) - total) / max(1.0, abs(total))

    def as_dict(self) -> dict:
        return {"method": self.method, "property": self.property,
                "values": dict(zip(self.players, self.values.tolist(), strict=True)),
                "stderr": dict(zip(self.players, self.stderr.tolist(), strict=True)),
                "u_full": self.u_full, "u_empty": self.u_empty,
                "efficiency_gap": self.efficiency_gap(), "evaluations": self.evaluations,
                "samples": self.samples, "seconds": self.seconds, **self.extra}

    def __getitem__(self, player: str) -> float:
        return float(self.values[self.players.index(player)])
