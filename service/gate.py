"""`Gate`, an ASGI middleware (BentoML's public `add_asgi_middleware`) in front of
every route of the service.

It authenticates the `Authorization: Bearer <key>` header (in a thread, off the event
loop), then validates the JSON body against the endpoint's strict input model
(schemas.py), so a request without a valid key learns nothing about the body, and a
bad body costs one log line, not a traceback. It writes one structured log line per
request (request id, user, path, status, seconds), serves the completed OpenAPI
document (openapi.py), and guards /metrics (an admin key, unless CDM_METRICS_PUBLIC=1).
The key verifier and database are this process's shared ones (context.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from shards.errors import short
from shards.settings import MAX_BODY_BYTES, METRICS_PUBLIC_ENV, env_flag, store_path

from .context import shared
from .errors import AuthError, DatabaseUnavailable, RateLimitError, status_for
from .openapi import complete
from .schemas import INPUTS

access_log = logging.getLogger("cdm.access")


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


def json_response(status: int, body: dict, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


class Gate:
    """Authentication, validation, access log, OpenAPI document and /metrics guard."""

    def __init__(self, app):
        self.app = app
        configure_logging()
        self.verify = shared(store_path()).verify
        self.metrics_public = env_flag(METRICS_PUBLIC_ENV)

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
            if path == "/metrics" and method not in ("GET", "HEAD"):  # before the key: no secret
                return await json_response(405, {"error": f"{short(method, 16)} is not allowed "
                                                          "on /metrics; use GET"},
                                           {"Allow": "GET, HEAD"})(scope, receive, send_logged)
            guarded = path in INPUTS or (path == "/metrics" and not self.metrics_public)
            if not guarded:
                return await self.app(scope, receive, send_logged)
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            client = (scope.get("client") or ("-",))[0]
            try:
                principal = await run_in_threadpool(self.verify, headers.get("authorization"), client)
            except (RateLimitError, DatabaseUnavailable) as err:
                return await json_response(status_for(err), {"error": str(err)},
                                           {"Retry-After": str(err.retry_after)})(scope, receive, send_logged)
            except AuthError as err:
                return await json_response(401, {"error": str(err)},
                                           {"WWW-Authenticate": "Bearer"})(scope, receive, send_logged)
            state["user"] = principal.user
            scope.setdefault("state", {})["cdm_principal"] = principal
            if path == "/metrics":
                if not principal.is_admin:
                    return await json_response(403, {"error": "/metrics needs an admin key"})(
                        scope, receive, send_logged)
                return await self.app(scope, receive, send_logged)
            if method != "POST":
                return await self.app(scope, receive, send_logged)
            kind = headers.get("content-type", "application/json").split(";")[0].strip().lower()
            if kind != "application/json":
                return await json_response(415, {"error": "send the body as application/json"})(
                    scope, receive, send_logged)
            body, error = await self._read_body(receive)
            if error is None:
                error = self._validate(INPUTS[path], body)
            if error is not None:
                return await json_response(*error)(scope, receive, send_logged)
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
            if size > MAX_BODY_BYTES:
                return b"", (413, {"error": f"request body larger than {MAX_BODY_BYTES} bytes"})
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

    async def _openapi(self, scope, receive, send):
        """BentoML's OpenAPI document, completed (openapi.py)."""
        chunks, start = [], {}

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        spec = complete(json.loads(b"".join(chunks)))
        await json_response(start.get("status", 200), spec)(scope, receive, send)


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
