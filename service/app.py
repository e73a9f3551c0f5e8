"""The BentoML service: a thin adapter over `service.platform.Platform`.

`Gate`, an ASGI middleware (BentoML's public `add_asgi_middleware`), sees every
request first: it authenticates the `Authorization: Bearer <key>` header (in a
thread, off the event loop), then validates the JSON body against the endpoint's
strict input model (no type coercion, unknown fields refused), so a request without
a valid key learns nothing about the body, and a bad body costs one log line, not a
traceback. It writes one structured log line per request (request id, user, path,
status, seconds), adds the security scheme and every error status to the OpenAPI
document, and guards /metrics. Endpoints call one `Platform` method each; domain
errors become HTTP statuses in `STATUS`, the one place they are mapped; every error
body is `{"error": "<message>"}` (plus `detail` for a 400 from validation).

Environment: CDM_STORE (default var/store), CDM_WORKERS (worker processes, default
1), CDM_METRICS_PUBLIC (1: /metrics without a key), CDM_AUTH_FAILURES_PER_MINUTE
(failed key checks a client may make per minute and worker before 429, default 20), the limits of `platform.Limits`
and CDM_DATA_ROOTS (`paths.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from typing import Annotated, Literal

import bentoml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from shards.data import MAX_LABEL
from shards.errors import (
    CDMError,
    DataError,
    LabelUnavailableError,
    StoreError,
    UnknownContributorError,
    short,
)

from . import console
from .auth import AuthError, FailureLimiter, ForbiddenError, KeyVerifier, Principal, RateLimitError
from .db import Database
from .platform import DEFAULT_VALUE_METHODS, NotFoundError, Platform, UnavailableError

STATUS: list[tuple[type[Exception], int]] = [
    (AuthError, 401), (ForbiddenError, 403), (UnknownContributorError, 404),
    (LabelUnavailableError, 404),
    (NotFoundError, 404), (RateLimitError, 429), (UnavailableError, 503), (DataError, 400),
    (StoreError, 409), (ValueError, 400),
]
WORKERS = int(os.environ.get("CDM_WORKERS", "1") or 1)
# the largest generate request the schema admits; n x steps above CDM_MAX_REQUEST_COST
# (default: their product) is a 400 too
MAX_N = int(os.environ.get("CDM_MAX_N", "64"))
MAX_STEPS = int(os.environ.get("CDM_MAX_STEPS", "500"))
MAX_BODY = 1 << 20  # bytes of JSON a request may send
ContributorId = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
access_log = logging.getLogger("cdm.access")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Label = Annotated[int, Field(ge=0, le=MAX_LABEL)]


class GenerateInput(Strict):
    contributors: list[Annotated[str, Field(max_length=64)]] | None = Field(
        None, min_length=1, max_length=256, json_schema_extra={"uniqueItems": True},
        description="distinct contributor ids; default: all licensed")
    n: int = Field(4, ge=1, le=MAX_N, description="number of images (CDM_MAX_N)")
    steps: int = Field(50, ge=1, le=MAX_STEPS, description="denoising steps (CDM_MAX_STEPS)")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    scheduler: Literal["ddpm", "ddim"] = "ddpm"
    top_k: int | None = Field(None, ge=1, le=1024,
                              description="each image on at most this many shards, by weight "
                                          "(cut to the number of contributors used)")
    mass: float | None = Field(None, gt=0, le=1,
                               description="each image on the fewest shards holding this much "
                                           "weight; 1: every shard with weight (dense). "
                                           "Neither given: top_k 3 with mass 0.9")
    label: Label | Annotated[list[Label], Field(min_length=1, max_length=MAX_N)] | None = Field(
        None, description="labelled stores: the label of every image, or a list of one per "
                          "image (repeated to fill n); default: drawn from the contributors' "
                          "labels. A label no licensed, live contributor holds is a 404")


class ForgetInput(Strict):
    contributor_id: str = ContributorId


class JobInput(Strict):
    job_id: str = Field(min_length=1, max_length=64)


class AddContributorInput(Strict):
    folder: str = Field(min_length=1, max_length=4096,
                        description="a folder on the server, under CDM_DATA_ROOTS")
    kind: Literal["full", "lora"] | None = None


class ValueInput(Strict):
    property: Literal["quality", "diversity", "confidence", "precision", "recall"] = Field(
        "precision", description="default: what the default payout policy pays by")
    methods: list[Literal["exact", "permutation", "kernelshap", "banzhaf", "banzhaf-msr",
                          "beta-shapley", "pruned", "retrain", "loo", "attribution"]] = Field(
        list(DEFAULT_VALUE_METHODS), min_length=1, max_length=10,
        json_schema_extra={"uniqueItems": True},
        description="default: exact Shapley (credit's `shapley` and the default payout "
                    "policy) and Beta(16, 1) Shapley (the better policy on unconditional stores)")
    alpha: float = Field(16.0, gt=0, le=1000, description="beta-shapley: Beta(alpha, beta)")
    beta: float = Field(1.0, gt=0, le=1000, description="beta-shapley")
    n: int = Field(256, ge=2, le=4096, description="samples per coalition")
    steps: int = Field(25, ge=1, le=500, description="sampling steps per coalition")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    heldout: str | None = Field(None, min_length=1, max_length=4096,
                                description="held-out digits folder on the server (first run)")


def _beta_params_only_with_beta_shapley(schema: dict) -> None:
    """Publish that alpha and beta come only with method beta-shapley (the platform
    enforces it with a 400): the body is one of two complete schemas."""
    props, others = schema["properties"], [m for m in schema["properties"]["method"]["enum"]
                                           if m != "beta-shapley"]
    beta = {**schema, "properties": {**props, "method": {**props["method"],
                                                         "enum": ["beta-shapley"]}}}
    rest = {**schema, "properties": {**props, "alpha": {"enum": [None], "nullable": True},
                                     "beta": {"enum": [None], "nullable": True}}}
    rest["properties"]["method"] = {**props["method"], "enum": others}
    schema["anyOf"] = [{k: v for k, v in b.items() if k != "title"} for b in (beta, rest)]


class PayoutPolicyInput(Strict):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra=_beta_params_only_with_beta_shapley)
    property: Literal["quality", "diversity", "confidence", "precision", "recall"]
    method: Literal["exact", "permutation", "kernelshap", "banzhaf", "banzhaf-msr",
                    "beta-shapley", "pruned", "retrain", "loo", "attribution"]
    alpha: float | None = Field(None, gt=0, le=1000,
                                description="beta-shapley only: Beta(alpha, beta), default 16")
    beta: float | None = Field(None, gt=0, le=1000, description="beta-shapley only: default 1")


class AttributionInput(Strict):
    request_id: str = Field(min_length=1, max_length=64)


class HistoryInput(Strict):
    limit: int = Field(100, ge=1, le=1000)
    before: float | None = Field(None, description="only requests created before this time (s)")


class Empty(Strict):
    pass


INPUTS = {"/generate": GenerateInput, "/forget": ForgetInput, "/job": JobInput,
          "/add_contributor": AddContributorInput, "/value": ValueInput,
          "/contributors": Empty, "/attribution": AttributionInput, "/credit": Empty,
          "/history": HistoryInput, "/payout_policy": PayoutPolicyInput}
# the statuses each endpoint can answer besides 200 (OpenAPI), all with ERROR_SCHEMA
ERRORS = {"/generate": (400, 401, 403, 404, 409, 413, 415, 429, 503),
          "/forget": (400, 401, 403, 404, 409, 413, 415, 429),
          "/job": (400, 401, 404, 413, 415, 429),
          "/add_contributor": (400, 401, 403, 404, 409, 413, 415, 429),
          "/value": (400, 401, 403, 404, 409, 413, 415, 429, 503),
          "/contributors": (400, 401, 413, 415, 429), "/attribution": (400, 401, 404, 413, 415, 429),
          "/credit": (400, 401, 413, 415, 429), "/history": (400, 401, 413, 415, 429),
          "/payout_policy": (400, 401, 403, 409, 413, 415, 429)}
INPUTS.update(console.INPUTS)  # the console's endpoints (whoami, keys, audit, ...)
ERRORS.update(console.ERRORS)
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "string"},
    "detail": {"type": "array", "items": {"type": "object", "properties": {
        "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
        "msg": {"type": "string"}, "type": {"type": "string"}}}}}}


def configure_logging() -> None:
    """One JSON line per request on stderr (`cdm.access`), warnings of the service's
    threads (`cdm`) with a timestamp. Called in each worker, after BentoML has set
    up its own logging (which would otherwise disable or swallow these loggers)."""
    for name, fmt in (("cdm.access", "%(message)s"),
                      ("cdm", "%(asctime)s %(levelname)s %(name)s: %(message)s")):
        logger = logging.getLogger(name)
        logger.disabled = False
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter(fmt))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def status_for(err: Exception) -> int:
    return next(code for cls, code in STATUS if isinstance(err, cls))


def _json_response(status: int, body: dict, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


class Gate:
    """Authentication, validation, access log, OpenAPI security and /metrics guard,
    in front of every BentoML route."""

    def __init__(self, app):
        self.app = app
        configure_logging()
        store = os.environ.get("CDM_STORE", "var/store")
        failures = int(os.environ.get("CDM_AUTH_FAILURES_PER_MINUTE", "20"))
        if failures < 1:
            raise ValueError(f"CDM_AUTH_FAILURES_PER_MINUTE={failures}; allowed: an integer >= 1")
        self.verify = KeyVerifier(Database(os.path.join(store, "service.db")),
                                  FailureLimiter(limit=failures))
        self.metrics_public = os.environ.get("CDM_METRICS_PUBLIC", "") in ("1", "true")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        start, request_id = time.perf_counter(), uuid.uuid4().hex[:16]
        state = {"status": 500, "user": "-"}

        async def send_logged(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode()),
                                      (b"x-cdm-worker", str(os.getpid()).encode())]
            await send(message)

        try:
            if path == "/docs.json" and method == "GET":
                return await self._openapi(scope, receive, send_logged)
            guarded = path in INPUTS or (path == "/metrics" and not self.metrics_public)
            if not guarded:
                return await self.app(scope, receive, send_logged)
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            client = (scope.get("client") or ("-",))[0]
            try:
                principal = await run_in_threadpool(self.verify, headers.get("authorization"), client)
            except RateLimitError as err:
                return await _json_response(429, {"error": str(err)},
                                            {"Retry-After": str(err.retry_after)})(scope, receive, send_logged)
            except AuthError as err:
                return await _json_response(401, {"error": str(err)},
                                            {"WWW-Authenticate": "Bearer"})(scope, receive, send_logged)
            state["user"] = principal.user
            scope.setdefault("state", {})["cdm_principal"] = principal
            if path == "/metrics":
                if not principal.is_admin:
                    return await _json_response(403, {"error": "/metrics needs an admin key"})(
                        scope, receive, send_logged)
                return await self.app(scope, receive, send_logged)
            if method != "POST":
                return await self.app(scope, receive, send_logged)
            kind = headers.get("content-type", "application/json").split(";")[0].strip().lower()
            if kind != "application/json":
                return await _json_response(415, {"error": "send the body as application/json"})(
                    scope, receive, send_logged)
            body, error = await self._read_body(receive)
            if error is None:
                error = self._validate(INPUTS[path], body)
            if error is not None:
                return await _json_response(*error)(scope, receive, send_logged)
            return await self.app(scope, _replay(body, receive), send_logged)
        finally:
            access_log.info(json.dumps({
                "request_id": request_id, "method": method, "path": short(path, 100),
                "user": state["user"], "status": state["status"],
                "seconds": round(time.perf_counter() - start, 4)}))

    @staticmethod
    async def _read_body(receive) -> tuple[bytes, tuple | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", (400, {"error": "client disconnected"})
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY:
                return b"", (413, {"error": f"request body larger than {MAX_BODY} bytes"})
            if not message.get("more_body"):
                return b"".join(chunks), None

    @staticmethod
    def _validate(model: type[BaseModel], body: bytes) -> tuple | None:
        try:
            model.model_validate_json(body or b"{}")
        except ValidationError as err:
            detail = [{"loc": [short(p, 64) if isinstance(p, str) else p for p in e["loc"]],
                       "msg": e["msg"], "type": e["type"]}
                      for e in err.errors(include_url=False, include_input=False)[:20]]
            return 400, {"error": f"invalid request body: {len(detail)} error(s)", "detail": detail}
        return None

    @staticmethod
    def _openapi_30(node):
        """Pydantic writes JSON Schema 2020-12; the document says OpenAPI 3.0: a
        nullable field becomes `nullable: true` (and a nullable enum lists null), a
        numeric exclusive bound becomes `minimum`/`maximum` with a boolean `exclusive*`."""
        if isinstance(node, list):
            return [Gate._openapi_30(x) for x in node]
        if not isinstance(node, dict):
            return node
        node = {k: Gate._openapi_30(v) for k, v in node.items()}
        for key in ("anyOf", "oneOf"):
            options = node.get(key)
            if isinstance(options, list) and {"type": "null"} in options:
                rest = [o for o in options if o != {"type": "null"}]
                node.pop(key)
                if len(rest) == 1:
                    node.update(rest[0])
                else:
                    node[key] = rest
                node["nullable"] = True
        if "default" in node and node["default"] is None and "type" in node:
            node["nullable"] = True
        if node.get("nullable") and isinstance(node.get("enum"), list) and None not in node["enum"]:
            node["enum"] = [*node["enum"], None]  # 3.0: a nullable enum lists null too
        for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            value = node.get(bound)
            if isinstance(value, int | float) and not isinstance(value, bool):
                node[plain], node[bound] = value, True
        return node

    async def _openapi(self, scope, receive, send):
        """BentoML's OpenAPI document, with the bearer scheme on every endpoint and
        the error statuses each can answer."""
        chunks, start = [], {}

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        spec = self._openapi_30(json.loads(b"".join(chunks)))
        components = spec.setdefault("components", {})
        components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
        components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
        for path, codes in ERRORS.items():
            for op in (spec.get("paths", {}).get(path) or {}).values():
                op["security"] = [{"bearer": []}]
                if "requestBody" in op:  # an absent body is "{}": required when fields are
                    op["requestBody"]["required"] = any(
                        f.is_required() for f in INPUTS[path].model_fields.values())
                responses = {k: v for k, v in op.get("responses", {}).items() if k.startswith("2")}
                for code in codes:
                    responses[str(code)] = {"description": _REASONS[code], "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                op["responses"] = responses
        await _json_response(start.get("status", 200), spec)(scope, receive, send)


_REASONS = {400: "Bad input", 401: "Missing, invalid, revoked or expired key",
            403: "The key lacks the right or the licence", 404: "Not found",
            409: "Conflicts with the store's state", 413: "Body too large",
            415: "The body is not application/json",
            429: "Rate limited; see Retry-After", 503: "No live contributor"}


def _replay(body: bytes, receive):
    """The body already read, then the client's own messages (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _release_when_prepared(platform: Platform):
    def callback(task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is None:
            platform.release(task.result().seq)

    return callback


@bentoml.service(name="cdm", traffic={"timeout": 600}, workers=WORKERS)
class CDMService:
    def __init__(self) -> None:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))
        configure_logging()
        self.platform = Platform(os.environ.get("CDM_STORE", "var/store"))

    @bentoml.on_shutdown
    def _close(self) -> None:
        self.platform.close()

    def _principal(self, ctx: bentoml.Context) -> Principal:
        principal = getattr(ctx.request.state, "cdm_principal", None)
        if principal is None:  # never reached behind Gate; kept for direct use
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        return principal

    @staticmethod
    def _error(ctx: bentoml.Context, err: Exception) -> dict:
        ctx.response.status_code = status_for(err)
        if isinstance(err, RateLimitError):
            ctx.response.headers["Retry-After"] = str(err.retry_after)
        return {"error": str(err)}

    def _call(self, ctx: bentoml.Context, fn, /, **kwargs) -> dict | list:
        try:
            return fn(self._principal(ctx), **kwargs)
        except (CDMError, ValueError) as err:
            return self._error(ctx, err)

    def __metrics__(self, content: str) -> str:
        return content + self.platform.metrics.exposition(content)

    @bentoml.api(input_spec=GenerateInput)
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
                prepared.add_done_callback(_release_when_prepared(self.platform))
                raise
            # the scheduler releases the job when it leaves (a cancelled future that
            # never started included); a running one finishes on its snapshot
            out = await asyncio.wrap_future(self.platform.submit(job))
            return await run_in_threadpool(self.platform.finish_generation, job, out)
        except (CDMError, ValueError) as err:
            return self._error(ctx, err)

    @bentoml.api(input_spec=ForgetInput)
    def forget(self, ctx: bentoml.Context, contributor_id: str) -> dict:
        """Admin, or the contributor's own key: exclude now, purge in the background;
        returns the purge job."""
        return self._call(ctx, self.platform.forget, contributor_id=contributor_id)

    @bentoml.api(input_spec=JobInput)
    def job(self, ctx: bentoml.Context, job_id: str) -> dict:
        """Status of a background job (admin; a contributor key: its own forgetting)."""
        return self._call(ctx, self.platform.job, job_id=job_id)

    @bentoml.api(input_spec=AddContributorInput)
    def add_contributor(self, ctx: bentoml.Context, folder: str, kind: str | None = None) -> dict:
        """Admin: train a shard from a folder on the server, in the background."""
        return self._call(ctx, self.platform.add_contributor, folder=folder, kind=kind)

    @bentoml.api(input_spec=ValueInput)
    def value(self, ctx: bentoml.Context, **kw) -> dict:
        """Admin: start a valuation job; `credit` then shows its Shapley values."""
        return self._call(ctx, self.platform.value, **kw)

    @bentoml.api(input_spec=Empty)
    def contributors(self, ctx: bentoml.Context) -> dict:
        """Live contributors with public metadata."""
        return self._call(ctx, lambda p: {"contributors": self.platform.contributors()})

    @bentoml.api(input_spec=AttributionInput)
    def attribution(self, ctx: bentoml.Context, request_id: str) -> dict:
        """Per-sample attribution of a past request, to its owner or an admin."""
        return self._call(ctx, self.platform.attribution, request_id=request_id)

    @bentoml.api(input_spec=Empty)
    def credit(self, ctx: bentoml.Context) -> dict:
        """Per contributor: samples, attribution mass, share, latest Shapley values
        (admin: all; contributor key: its own row; user key: its own usage)."""
        return self._call(ctx, self.platform.credit)

    @bentoml.api(input_spec=PayoutPolicyInput)
    def payout_policy(self, ctx: bentoml.Context, property: str, method: str,
                      alpha: float | None = None, beta: float | None = None) -> dict:
        """Admin: pay contributors by the latest recorded `method` values of
        `property` (`credit` then shows each live contributor's payout_share)."""
        return self._call(ctx, self.platform.set_payout_policy, property=property, method=method,
                          alpha=alpha, beta=beta)

    @bentoml.api(input_spec=HistoryInput)
    def history(self, ctx: bentoml.Context, limit: int = 100, before: float | None = None) -> dict:
        """Past requests, newest first (admin: all; user: its own; contributor key:
        the requests that used its contributor, with its samples and mass)."""
        return self._call(ctx, self.platform.history, limit=limit, before=before)

    # ---- what the web console (/ui) reads; the logic and scoping is in console.py
    @bentoml.api(input_spec=console.NoInput)
    def whoami(self, ctx: bentoml.Context) -> dict:
        """The key's user, role, contributor and licence."""
        return self._call(ctx, console.whoami)

    @bentoml.api(input_spec=console.NoInput)
    def keys(self, ctx: bentoml.Context) -> dict:
        """Admin: every API key (ids, users, roles, licences, state; no secrets)."""
        return self._call(ctx, console.keys, db=self.platform.db)

    @bentoml.api(input_spec=console.RevokeKeyInput)
    def revoke_key(self, ctx: bentoml.Context, key_id: str) -> dict:
        """Admin: revoke a key; refused from the next request on (audited)."""
        return self._call(ctx, console.revoke_key, db=self.platform.db, key_id=key_id)

    @bentoml.api(input_spec=console.AuditInput)
    def audit(self, ctx: bentoml.Context, contributor_id: str | None = None,
              limit: int = 200) -> dict:
        """The audit log, newest first (admin: all; contributor key: its own records)."""
        return self._call(ctx, console.audit, db=self.platform.db,
                          contributor_id=contributor_id, limit=limit)

    @bentoml.api(input_spec=console.JobsInput)
    def jobs(self, ctx: bentoml.Context, kind: str | None = None, limit: int = 50) -> dict:
        """Admin: recent background jobs, newest first."""
        return self._call(ctx, console.jobs, db=self.platform.db, kind=kind, limit=limit)

    @bentoml.api(input_spec=console.ValuationsInput)
    def valuations(self, ctx: bentoml.Context, limit: int = 200) -> dict:
        """Recorded valuations, newest first, with the payout shares under the policy
        (admin: all; contributor key: its own values)."""
        return self._call(ctx, console.valuations, db=self.platform.db, limit=limit)


CDMService.add_asgi_middleware(Gate)
CDMService.mount_asgi_app(console.app(), path=console.MOUNT)  # static files, no key needed
