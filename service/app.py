"""The BentoML service: a thin adapter over `service.platform.Platform`.

Every endpoint authenticates the `Authorization: Bearer <key>` header, calls one
library method and returns JSON. Domain errors become HTTP statuses in `STATUS`,
the one place they are mapped; the body is `{"error": "<message>"}`. Input models
forbid unknown fields. The store comes from `CDM_STORE` (default `var/store`).
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import bentoml
from bentoml._internal.marshal.dispatcher import CorkDispatcher
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from shards.errors import CDMError, DataError, StoreError, UnknownContributorError

from .auth import AuthError, ForbiddenError
from .platform import NotFoundError, Platform, UnavailableError

STATUS: list[tuple[type[Exception], int]] = [
    (AuthError, 401), (ForbiddenError, 403), (UnknownContributorError, 404),
    (NotFoundError, 404), (UnavailableError, 503), (DataError, 400), (StoreError, 409),
    (ValueError, 400),
]
MAX_BATCH = int(os.environ.get("CDM_MAX_BATCH", "8"))  # generate requests per batch; 1: off
MAX_LATENCY_MS = 300_000  # queued longer than this: 503
ContributorId = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateInput(Strict):
    contributors: list[str] | None = Field(None, min_length=1, max_length=256,
                                           description="contributor ids; default: all licensed")
    n: int = Field(4, ge=1, le=64, description="number of images")
    steps: int = Field(50, ge=1, le=500, description="denoising steps")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    mode: Literal["composed", "naive"] = "composed"
    scheduler: Literal["ddpm", "ddim"] = "ddpm"
    routing: Literal["dense", "topk"] | None = Field(
        None, description="dense: every image on every contributor's shard; topk (default "
                          "for mode composed): each image on its top shards only")
    top_k: int | None = Field(None, ge=1, le=1024, description="topk: at most this many shards")
    mass: float | None = Field(None, gt=0, le=1,
                               description="topk: the fewest shards holding this much weight")


class ForgetInput(Strict):
    contributor_id: str = ContributorId


class JobInput(Strict):
    job_id: str = Field(min_length=1, max_length=64)


class AddContributorInput(Strict):
    folder: str = Field(min_length=1, max_length=4096, description="a folder on the server")
    kind: Literal["full", "lora"] | None = None


class ValueInput(Strict):
    property: Literal["quality", "diversity", "confidence"] = "quality"
    methods: list[Literal["exact", "permutation", "kernelshap", "pruned", "retrain", "loo",
                          "attribution"]] = Field(["exact"], min_length=1, max_length=7)
    n: int = Field(256, ge=2, le=4096, description="samples per coalition")
    steps: int = Field(25, ge=1, le=500, description="sampling steps per coalition")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    heldout: str | None = Field(None, max_length=4096,
                                description="held-out digits folder on the server (first run)")


class AttributionInput(Strict):
    request_id: str = Field(min_length=1, max_length=64)


class Empty(Strict):
    pass


def _overloaded():
    raise UnavailableError("the service is overloaded; retry later")


def status_for(err: Exception) -> int:
    return next(code for cls, code in STATUS if isinstance(err, cls))


@bentoml.service(name="cdm", traffic={"timeout": 600})
class CDMService:
    def __init__(self) -> None:
        self.platform = Platform(os.environ.get("CDM_STORE", "var/store"))

    def _principal(self, ctx: bentoml.Context):
        return self.platform.verify(ctx.request.headers.get("authorization"))

    @staticmethod
    def _error(ctx: bentoml.Context, err: Exception) -> dict:
        ctx.response.status_code = status_for(err)
        return {"error": str(err)}

    def _call(self, ctx: bentoml.Context, method, **kwargs) -> dict | list:
        try:
            return method(self._principal(ctx), **kwargs)
        except (CDMError, ValueError) as err:
            return self._error(ctx, err)

    def __metrics__(self, content: str) -> str:
        return content + self.platform.metrics.exposition()

    @bentoml.api(input_spec=GenerateInput)
    async def generate(self, ctx: bentoml.Context, **kw) -> dict:
        """Images (base64 PNG) from the licensed, live contributors, with attribution.

        Checks and the ledger run per request; the sampling of concurrent requests is
        grouped by BentoML's adaptive-batching dispatcher into one batch."""
        try:
            job = await run_in_threadpool(self.platform.prepare_generation, self._principal(ctx), **kw)
            try:
                out = await self._batched_sample(job)
            finally:  # the dispatcher may drop a queued job (timeout, disconnect)
                self.platform.release(job.seq)
            if isinstance(out, Exception):
                raise out
            return await run_in_threadpool(self.platform.finish_generation, job, out)
        except (CDMError, ValueError) as err:
            return self._error(ctx, err)

    @functools.cached_property
    def _batched_sample(self):
        """BentoML's CorkDispatcher (the adaptive batching behind batchable APIs) in
        front of `Platform.sample_many`. Not a batchable endpoint: that would share
        one request context, and so one API key, across the batch."""
        dispatcher = CorkDispatcher(max_latency_in_ms=MAX_LATENCY_MS, max_batch_size=MAX_BATCH,
                                    fallback=_overloaded, get_batch_size=lambda job: 1)
        return dispatcher(self.platform.sample_many)

    @bentoml.api(input_spec=ForgetInput)
    def forget(self, ctx: bentoml.Context, contributor_id: str) -> dict:
        """Admin: exclude now, purge in the background; returns the purge job."""
        return self._call(ctx, self.platform.forget, contributor_id=contributor_id)

    @bentoml.api(input_spec=JobInput)
    def job(self, ctx: bentoml.Context, job_id: str) -> dict:
        """Admin: status of a background job."""
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
        """Per contributor: samples, attribution mass, share, latest Shapley values."""
        return self._call(ctx, lambda p: self.platform.credit())
