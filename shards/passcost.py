"""Which shards of a routed step run as calls of their own: chosen by measured cost.

The shard bank (bank.py) evaluates a step's rows either as one plain UNet call per
shard (that shard's weights, any number of rows) or together in one stacked pass
(every row its own shard's weights). Which is cheaper depends on the model and the
machine, and neither cost is linear in the rows: on 2 CPU cores a plain call of the
digits' 164k-parameter UNet takes 4.3 ms for 1 row and 9.0 ms for 17, a stacked pass
of 122 rows 51 ms, so one stacked pass beats seven calls of 17 rows; on the studios'
1.06M-parameter UNet a stacked row costs 2.1-2.7x a plain one, and seven calls of 10
rows beat one stacked pass of 70.

So the bank times both kinds of call at a few sizes once, on its first pass
(`measure`), and then for every step predicts the cost of each split by interpolating
those timings: starting from every shard in the stacked pass, it moves a shard's rows
(largest first) into a call of their own whenever that lowers the predicted cost
(`PassCosts.solo`). The choice changes which kernels run, not what they compute:
images agree within float rounding whichever split runs. The timings are kept for the
process, by architecture, input and device (`measured`), so every sampler of a
process splits a step alike (the same seed gives the same bits there) and a sampler
reloaded after a forget does not time again; two processes may split differently.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

ROWS = (1, 4, 16, 64)  # the sizes timed
REPEATS = 3  # timed runs of each, after one warm-up
BUDGET_S = 0.25  # a one-row call slower than this: nothing is timed (the model is large)
_MEASURED: dict[str, PassCosts | None] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class PassCosts:
    """Seconds of a plain call (`plain[i]`) and of a stacked pass (`stacked[i]`) of
    `rows[i]` rows."""

    rows: tuple[int, ...]
    plain: tuple[float, ...]
    stacked: tuple[float, ...]

    def plain_s(self, rows: int) -> float:
        return _interpolate(self.rows, self.plain, rows)

    def stacked_s(self, rows: int) -> float:
        return 0.0 if rows == 0 else _interpolate(self.rows, self.stacked, rows)

    def solo(self, counts: dict[str, int]) -> set[str]:
        """The shards (of {shard: rows}) whose rows run as a call of their own."""
        rest, out = sum(counts.values()), set()
        for cid in sorted(counts, key=lambda c: -counts[c]):
            r = counts[cid]
            if self.plain_s(r) + self.stacked_s(rest - r) < self.stacked_s(rest):
                out.add(cid)
                rest -= r
        return out


def _interpolate(xs: tuple[int, ...], ys: tuple[float, ...], x: int) -> float:
    """Piecewise linear through (xs, ys), extended linearly past both ends."""
    i = 1
    while i < len(xs) - 1 and x > xs[i]:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def measure(run: Callable[[int, bool], None], device: torch.device) -> PassCosts | None:
    """Time `run(rows, stacked)` at every size of ROWS (median of REPEATS after a
    warm-up); None when a one-row plain call, once warm, takes longer than BUDGET_S."""

    def seconds(rows: int, stacked: bool) -> float:
        runs = []
        for _ in range(1 + REPEATS):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run(rows, stacked)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            runs.append(time.perf_counter() - start)
            if len(runs) == 2 and runs[1] > BUDGET_S:  # after the warm-up: too slow
                return runs[1]
        return statistics.median(runs[1:])

    if seconds(1, stacked=False) > BUDGET_S:
        return None
    plain = tuple(seconds(r, stacked=False) for r in ROWS)
    stacked = tuple(seconds(r, stacked=True) for r in ROWS)
    return PassCosts(ROWS, plain, stacked)


def measured(key: str, run: Callable[[int, bool], None], device: torch.device) -> PassCosts | None:
    """`measure(run, device)`, once per `key` (and thread count) in this process."""
    key = f"{key}|{device}|{torch.get_num_threads()}"
    with _LOCK:
        if key not in _MEASURED:
            _MEASURED[key] = measure(run, device)
        return _MEASURED[key]
