"""What each role may read of past generation and credit: the live contributors,
a request's attribution, per-contributor credit (usage, Shapley values, payout share
under the payout policy), the request history; and the payout policy an admin sets.

A payout share is not usage: usage is the attribution mass of served samples; a payout
share follows the recorded valuation the policy names (negative values count as zero,
shares sum to 1 over the live contributors).
"""

from __future__ import annotations

import json

from shards import ShardStore
from shards.errors import StoreError, short
from shards.settings import BETA_ALPHA, BETA_BETA, DEFAULT_PAYOUT
from valuation.methods import primary
from valuation.result import ValuationResult

from .auth import Principal
from .db import Database
from .errors import NotFoundError


def record_primary(db: Database, results: dict) -> ValuationResult | None:
    """Record every method's values of a valuation run; the most exact Shapley values
    become their property's latest credit (`credit`'s `shapley`), the others are
    there for a payout policy to name. Returns the primary result, if any."""
    best = primary(results)
    for result in results.values():
        db.record_valuation(result.property, result.method, result.as_dict()["values"],
                            "primary" if result is best else "other", method_params(result))
    return best


def method_params(result: ValuationResult) -> dict | None:
    """The parameters a valuation's values depend on besides its method's name."""
    if result.method == "beta-shapley":
        return {"alpha": float(result.extra["alpha"]), "beta": float(result.extra["beta"])}
    return None


def payout_policy(db: Database) -> dict:
    """The policy an admin set last, else the default (`set_by` 'default')."""
    return db.payout_policy() or {**DEFAULT_PAYOUT, "set_at": None, "set_by": "default"}


def describe_policy(policy: dict) -> str:
    """'beta-shapley (alpha 16, beta 1) values of precision'."""
    params = policy.get("params")
    args = f" ({', '.join(f'{k} {v:g}' for k, v in params.items())})" if params else ""
    return f"{policy['method']}{args} values of {policy['property']}"


def payout_shares(values: dict[str, float], live: set[str]) -> dict[str, float]:
    """Each live contributor's share of a payout by `values`: negative values count as
    zero (a contributor who lowers the property is paid nothing, not charged), then
    shares are normalised to sum to 1 over the live contributors; all zero when no
    live contributor has a positive value."""
    floored = {c: max(0.0, float(values.get(c, 0.0))) for c in sorted(live)}
    total = sum(floored.values())
    return {c: (v / total if total > 0 else 0.0) for c, v in floored.items()}


class Credit:
    """The reads of one store's ledger and valuations, scoped by role."""

    def __init__(self, store: ShardStore, db: Database):
        self.store, self.db = store, db

    def contributors(self) -> list[dict]:
        self.store.refresh()
        entries = dict(self.store.manifest["contributors"])  # one snapshot: no 404 mid-list
        return [{"contributor_id": c, "images": e["images"], "kind": e["kind"],
                 "added_at": e["added_at"],
                 "labels": dict(sorted(e.get("labels", {}).items(), key=lambda kv: int(kv[0]))),
                 "captions": e.get("captions")}  # text stores: distinct captions it holds
                for c, e in sorted(entries.items())]

    def attribution(self, principal: Principal, request_id: str) -> dict:
        row = self.db.get_request(request_id)
        if row is None or not (row["user"] == principal.user or principal.is_admin):
            raise NotFoundError(f"no request {short(request_id)!r}")  # the same for others' ids
        return {"request_id": request_id, "user": row["user"], "created_at": row["created_at"],
                "params": json.loads(row["params"]), "contributors": json.loads(row["contributors"]),
                "attribution": json.loads(row["attribution"])}

    def credit(self, principal: Principal) -> dict:
        """Per contributor: `usage` (samples generated with it allowed, attribution
        mass, share of all mass), `licence` (live contributors that stated one), `payout_share` under the admin's payout policy (once
        set and its valuation recorded), and the latest Shapley values per property.

        An admin sees every contributor, forgotten ones included (they were used
        before they left; they get no payout share); a contributor key its own row;
        a user key its own usage of the live contributors, without payouts."""
        self.store.refresh()
        live = set(self.store.contributor_ids)
        if principal.role == "user":
            totals = {c: t for c, t in self.db.credit_totals(principal.user).items() if c in live}
        else:
            totals = self.db.credit_totals()
        mass = sum(t["mass"] for t in totals.values()) or 1.0
        rows = {c: {"usage": {**t, "share": t["mass"] / mass}, "live": c in live}
                for c, t in totals.items()}
        if principal.role != "user":
            for c in live - set(rows):
                rows[c] = {"usage": {"samples": 0, "mass": 0.0, "share": 0.0}, "live": True}
            payout = self.payout(live)
            for c, row in rows.items():
                row["payout_share"] = payout["shares"].get(c) if payout["shares"] else None
        for c, row in rows.items():  # what the contributor's licence requires of users
            licence = self.store.contributor(c).get("licence") if c in live else None
            if licence is not None:
                row["licence"] = licence
        valuations = self.db.latest_valuations()
        for prop, val in valuations.items():
            for c, phi in val["values"].items():
                if c in rows:
                    rows[c].setdefault("shapley", {})[prop] = phi
        out = {}
        if principal.role == "contributor":
            rows = {c: r for c, r in rows.items() if c == principal.contributor_id}
            valuations = {p: {**v, "values": {c: x for c, x in v["values"].items()
                                              if c == principal.contributor_id}}
                          for p, v in valuations.items()}
            out["payout_policy"] = {k: v for k, v in payout.items() if k != "shares"}
        elif principal.role == "user":
            valuations = {}
        else:
            out["payout_policy"] = {k: v for k, v in payout.items() if k != "shares"}
        return {"contributors": dict(sorted(rows.items())), "valuations": valuations, **out}

    def payout(self, live: set[str]) -> dict:
        """The policy, the valuation it pays by, and the live contributors' shares (None
        with a `note` when there is no policy or its valuation is not recorded)."""
        policy = payout_policy(self.db)
        valuation = self.db.valuation(policy["property"], policy["method"], policy.get("params"))
        if valuation is None or not live <= set(valuation["values"]):
            return {"policy": policy, "shares": None,
                    "note": f"no recorded valuation gives {describe_policy(policy)} for every "
                            "live contributor (none yet, or a forget or an add since): run "
                            "value again"}
        return {"policy": policy, "valuation_at": valuation["at"],
                "shares": payout_shares(valuation["values"], live),
                "note": "negative values count as zero; shares sum to 1 over live contributors"}

    def set_payout_policy(self, principal: Principal, property: str, method: str,
                          alpha: float | None = None, beta: float | None = None) -> dict:
        """Admin: pay by the latest recorded `method` values of `property` (for
        beta-shapley, those computed with Beta(`alpha`, `beta`), default 16 and 1).

        Raises:
            ValueError: alpha or beta for a method other than beta-shapley, or not > 0.
            StoreError: no such valuation was ever recorded (409), naming those that were.
        """
        principal.require_admin()
        params = None
        if method == "beta-shapley":
            params = {"alpha": float(BETA_ALPHA if alpha is None else alpha),
                      "beta": float(BETA_BETA if beta is None else beta)}
            if not (params["alpha"] > 0 and params["beta"] > 0):
                raise ValueError(f"alpha={params['alpha']:g}, beta={params['beta']:g}; "
                                 "allowed: both > 0")
        elif alpha is not None or beta is not None:
            raise ValueError(f"alpha and beta apply to method 'beta-shapley' only, not {method!r}")
        policy = {"property": property, "method": method, "params": params}
        if self.db.valuation(property, method, params) is None:
            recorded = ", ".join(describe_policy({"property": p, "method": m, "params": a})
                                 for p, m, a in self.db.recorded_valuations()) or "none"
            raise StoreError(f"no recorded valuation gives {describe_policy(policy)}; run value "
                             f"with it first; recorded: {recorded}")
        self.db.set_payout_policy(principal.user, property, method, params)
        self.db.audit(principal.user, "payout_policy", "*", policy)
        self.store.refresh()
        return self.payout(set(self.store.contributor_ids))

    def history(self, principal: Principal, limit: int = 100, before: float | None = None) -> dict:
        """Newest first: an admin's view of every request, a user's own requests, or
        the requests that used a contributor key's contributor (its samples and
        attribution mass; not who sent them)."""
        if principal.role == "contributor":
            rows = self.db.history(contributor_id=principal.contributor_id, limit=limit, before=before)
        else:
            rows = self.db.history(user=None if principal.is_admin else principal.user,
                                   limit=limit, before=before)
        return {"requests": rows}
