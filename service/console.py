"""The web console: static files at /ui, and the few read endpoints it needs.

The console (`service/console/`: index.html, app.js, style.css; no build step,
nothing fetched from elsewhere) is a page that calls the same JSON API as any
client, with the key the person pasted (kept in the browser's sessionStorage). Its
files hold no data and are served without a key; every API call carries
`Authorization: Bearer <key>` and passes the same `Gate` and the same role checks.

The API lacked what the console has to show; the endpoints below add it (their
inputs in schemas.py), each scoped by role like `credit` and `history`:

  whoami       any key: its user, role, contributor and licence
  keys         admin: every key (no secret, no hash)
  revoke_key   admin: revoke a key (audited)
  audit        admin: the audit log; a contributor key: its own contributor's records
  jobs         admin: recent background jobs (purge, add, value)
  valuations   admin: recorded valuations (newest first) with the payout shares each
               would give under the current policy; a contributor key: its own values
               and shares
"""

from __future__ import annotations

from pathlib import Path

from shards.errors import short

from .auth import Principal
from .credit import payout_policy, payout_shares
from .db import Database
from .errors import ForbiddenError, NotFoundError

STATIC = Path(__file__).with_name("console")
MOUNT = "/ui"
# the page only talks to its own origin; no inline script, no third-party anything
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def app():
    """The Starlette app that serves the console's files (mounted at /ui)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    files = StaticFiles(directory=STATIC, html=True)

    async def static(scope, receive, send):
        if scope["type"] != "http":
            return await files(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      *((k.lower().encode(), v.encode()) for k, v in HEADERS.items())]
            await send(message)

        return await files(scope, receive, with_headers)

    return Starlette(routes=[Mount("/", app=static)])


# --------------------------------------------------------------- endpoints
def whoami(principal: Principal) -> dict:
    """What the key is: the console picks its view from `role`."""
    return {"user": principal.user, "role": principal.role, "key_id": principal.key_id,
            "contributor_id": principal.contributor_id,
            "license": None if principal.license is None else sorted(principal.license)}


def keys(principal: Principal, db: Database) -> dict:
    principal.require_admin()
    return {"keys": db.list_keys()}


def revoke_key(principal: Principal, db: Database, key_id: str) -> dict:
    """Admin: refused from the next request on, in every worker (like `cdm keys revoke`)."""
    principal.require_admin()
    row = db.get_key(key_id)
    if row is None or not db.revoke_key(key_id):
        raise NotFoundError(f"no active key {short(key_id)!r}")
    db.audit(principal.user, "revoke_key", row["contributor_id"] or "*",
             {"key_id": key_id, "user": row["user"], "role": row["role"]})
    return {"key_id": key_id, "revoked": True}


def audit(principal: Principal, db: Database, contributor_id: str | None = None,
          limit: int = 200) -> dict:
    """Newest first. An admin's view of every record (or one contributor's); a
    contributor key's view of its own contributor's records."""
    if principal.role == "contributor":
        contributor_id = principal.contributor_id
    elif not principal.is_admin:
        raise ForbiddenError(f"user {principal.user!r} may not read the audit log")
    return {"records": db.audit_log(contributor_id, limit=limit, newest_first=True)}


def jobs(principal: Principal, db: Database, kind: str | None = None, limit: int = 50) -> dict:
    principal.require_admin()
    rows = db.jobs(kind=kind, limit=limit, newest_first=True)
    for job in rows:
        job.pop("plan", None)
    return {"jobs": rows}


def valuations(principal: Principal, db: Database, limit: int = 200) -> dict:
    """Recorded valuations, newest first, each with the payout shares it gives when
    the payout policy pays by its (property, method) (shares over its players)."""
    if principal.role == "user":
        raise ForbiddenError(f"user {principal.user!r} may not read valuations")
    policy = payout_policy(db)
    out = []
    for r in db.valuations(limit):
        values = r["values"]
        pays = ((r["property"], r["method"], r["params"])
                == (policy["property"], policy["method"], policy.get("params")))
        shares = payout_shares(values, set(values)) if pays else None
        if principal.role == "contributor":
            cid = principal.contributor_id
            if cid not in values:
                continue
            values = {cid: values[cid]}
            shares = {cid: shares[cid]} if shares else None
        out.append({"at": r["at"], "property": r["property"], "method": r["method"],
                    "params": r["params"], "kind": r["kind"], "values": values,
                    "payout_shares": shares})
    return {"policy": policy, "valuations": out}
