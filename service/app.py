"""The BentoML service: endpoints that call one `Platform` method each.

Every request passes the `Gate` first (gate.py: key, body, access log); a domain error
becomes its HTTP status here (errors.py). Environment: CDM_STORE (default var/store),
CDM_WORKERS, and the limits of shards/settings.py.
"""

from __future__ import annotations

import asyncio

import bentoml
from starlette.concurrency import run_in_threadpool

from shards.errors import CDMError
from shards.settings import REQUEST_SECONDS, env_int, store_path, usable_cpus

from . import console, schemas
from .errors import AuthError, status_for
from .gate import Gate, configure_logging
from .platform import Platform

WORKERS = env_int("CDM_WORKERS")


def release_when_prepared(platform: Platform):
    """A done-callback for the preparation of a request whose client left: release
    what it registered, in a thread (a synced database write that may wait for the
    lock must not block the event loop)."""
    def callback(task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is None:
            asyncio.get_running_loop().run_in_executor(None, platform.release, task.result().seq)

    return callback


@bentoml.service(name="cdm", traffic={"timeout": int(REQUEST_SECONDS)}, workers=WORKERS)
class CDMService:
    def __init__(self) -> None:
        import torch

        torch.set_num_threads(max(1, usable_cpus() // WORKERS))
        configure_logging()
        self.platform = Platform(store_path())

    @bentoml.on_shutdown
    def _close(self) -> None:
        self.platform.close()

    @staticmethod
    def _principal(ctx: bentoml.Context):
        principal = getattr(ctx.request.state, "cdm_principal", None)
        if principal is None:  # never reached behind the Gate; kept for direct use
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        return principal

    def _call(self, ctx: bentoml.Context, fn, /, **kwargs) -> dict | list:
        try:
            return fn(self._principal(ctx), **kwargs)
        except (CDMError, ValueError) as err:
            return self._error(ctx, err)

    @staticmethod
    def _error(ctx: bentoml.Context, err: Exception) -> dict:
        ctx.response.status_code = status_for(err)
        if getattr(err, "retry_after", None):  # 429s, and 503s of a store or database away
            ctx.response.headers["Retry-After"] = str(err.retry_after)
        return {"error": str(err)}

    def __metrics__(self, content: str) -> str:
        return content + self.platform.metrics.exposition(content)

    @bentoml.api(input_spec=schemas.GenerateInput)
    async def generate(self, ctx: bentoml.Context, **kw) -> dict:
        """Images (base64 PNG) from the licensed, live contributors, with attribution.

        Checks and the ledger run per request, in threads; sampling runs on this
        worker's step scheduler, which batches requests that arrive together and
        never makes a small request wait for more than one step of a big one."""
        try:
            principal = self._principal(ctx)
            prepared = asyncio.ensure_future(
                run_in_threadpool(self.platform.prepare_generation, principal, **kw))
            try:
                job = await asyncio.shield(prepared)
            except asyncio.CancelledError:  # the client left: release what it registered
                prepared.add_done_callback(release_when_prepared(self.platform))
                raise
            # the scheduler releases the job when it leaves; a client that leaves has its
            # job dropped before the next step, and the steps it did not take refunded
            try:
                out = await asyncio.wrap_future(self.platform.submit(job))
            except asyncio.CancelledError:
                self.platform.cancel(job)
                raise
            return await run_in_threadpool(self.platform.finish_generation, job, out)
        except (CDMError, ValueError) as err:
            return self._error(ctx, err)

    @bentoml.api(input_spec=schemas.ForgetInput)
    def forget(self, ctx: bentoml.Context, contributor_id: str) -> dict:
        """Admin, or the contributor's own key: exclude now, purge in the background;
        returns the purge job."""
        return self._call(ctx, self.platform.forget, contributor_id=contributor_id)

    @bentoml.api(input_spec=schemas.JobInput)
    def job(self, ctx: bentoml.Context, job_id: str) -> dict:
        """Status of a background job (admin; a contributor key: its own forgetting)."""
        return self._call(ctx, self.platform.job, job_id=job_id)

    @bentoml.api(input_spec=schemas.AddContributorInput)
    def add_contributor(self, ctx: bentoml.Context, folder: str, kind: str | None = None) -> dict:
        """Admin: train a shard from a folder on the server, in the background."""
        return self._call(ctx, self.platform.add_contributor, folder=folder, kind=kind)

    @bentoml.api(input_spec=schemas.ValueInput)
    def value(self, ctx: bentoml.Context, **kw) -> dict:
        """Admin: start a valuation job; `credit` then shows its Shapley values."""
        return self._call(ctx, self.platform.value, **kw)

    @bentoml.api(input_spec=schemas.Empty)
    def contributors(self, ctx: bentoml.Context) -> dict:
        """Live contributors with public metadata."""
        return self._call(ctx, lambda p: {"contributors": self.platform.contributors()})

    @bentoml.api(input_spec=schemas.AttributionInput)
    def attribution(self, ctx: bentoml.Context, request_id: str) -> dict:
        """Per-sample attribution of a past request, to its owner or an admin."""
        return self._call(ctx, self.platform.attribution, request_id=request_id)

    @bentoml.api(input_spec=schemas.Empty)
    def credit(self, ctx: bentoml.Context) -> dict:
        """Per contributor: samples, attribution mass, share, latest Shapley values
        (admin: all; contributor key: its own row; user key: its own usage)."""
        return self._call(ctx, self.platform.credit)

    @bentoml.api(input_spec=schemas.PayoutPolicyInput)
    def payout_policy(self, ctx: bentoml.Context, property: str, method: str,
                      alpha: float | None = None, beta: float | None = None) -> dict:
        """Admin: pay contributors by the latest recorded `method` values of
        `property` (`credit` then shows each live contributor's payout_share)."""
        return self._call(ctx, self.platform.set_payout_policy, property=property, method=method,
                          alpha=alpha, beta=beta)

    @bentoml.api(input_spec=schemas.HistoryInput)
    def history(self, ctx: bentoml.Context, limit: int = 100, before: float | None = None) -> dict:
        """Past requests, newest first (admin: all; user: its own; contributor key:
        the requests that used its contributor, with its samples and mass)."""
        return self._call(ctx, self.platform.history, limit=limit, before=before)

    # ---- what the web console (/ui) reads; the logic and scoping is in console.py
    @bentoml.api(input_spec=schemas.Empty)
    def whoami(self, ctx: bentoml.Context) -> dict:
        """The key's user, role, contributor and licence."""
        return self._call(ctx, console.whoami)

    @bentoml.api(input_spec=schemas.Empty)
    def keys(self, ctx: bentoml.Context) -> dict:
        """Admin: every API key (ids, users, roles, licences, state; no secrets)."""
        return self._call(ctx, console.keys, db=self.platform.db)

    @bentoml.api(input_spec=schemas.RevokeKeyInput)
    def revoke_key(self, ctx: bentoml.Context, key_id: str) -> dict:
        """Admin: revoke a key; refused from the next request on (audited)."""
        return self._call(ctx, console.revoke_key, db=self.platform.db, key_id=key_id)

    @bentoml.api(input_spec=schemas.AuditInput)
    def audit(self, ctx: bentoml.Context, contributor_id: str | None = None,
              limit: int = 200) -> dict:
        """The audit log, newest first (admin: all; contributor key: its own records)."""
        return self._call(ctx, console.audit, db=self.platform.db,
                          contributor_id=contributor_id, limit=limit)

    @bentoml.api(input_spec=schemas.JobsInput)
    def jobs(self, ctx: bentoml.Context, kind: str | None = None, limit: int = 50) -> dict:
        """Admin: recent background jobs, newest first."""
        return self._call(ctx, console.jobs, db=self.platform.db, kind=kind, limit=limit)

    @bentoml.api(input_spec=schemas.ValuationsInput)
    def valuations(self, ctx: bentoml.Context, limit: int = 200) -> dict:
        """Recorded valuations, newest first, with the payout shares under the policy
        (admin: all; contributor key: its own values)."""
        return self._call(ctx, console.valuations, db=self.platform.db, limit=limit)


CDMService.add_asgi_middleware(Gate)
CDMService.mount_asgi_app(console.app(), path=console.MOUNT)  # static files, no key needed
