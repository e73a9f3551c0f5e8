"""The request bodies the API accepts: strict models (no type coercion, unknown fields
refused), built from shards/settings.py so that every name, default and bound is
written once; `INPUTS` maps each endpoint to its model and `ERRORS` to the statuses it
can answer besides 200 (both published in the OpenAPI document, openapi.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from shards.settings import (
    BETA_ALPHA,
    BETA_BETA,
    CONTRIBUTOR_ID,
    DEFAULT_MASS,
    DEFAULT_TOP_K,
    JOB_KINDS,
    MAX_LABEL,
    METHODS,
    SAMPLE_STEPS,
    SCHEDULERS,
    SERVED_PROPERTIES,
    SHARD_KINDS,
    VALUATION,
    env_int,
)

# the largest generate request the schema admits; a cost (n x steps x shards per image)
# above CDM_MAX_REQUEST_COST (default: their product at the default routing) is a 400 too
MAX_N = env_int("CDM_MAX_N")
MAX_STEPS = env_int("CDM_MAX_STEPS")
ContributorId = Field(pattern=CONTRIBUTOR_ID)
Label = Annotated[int, Field(ge=0, le=MAX_LABEL)]
Property = Literal[SERVED_PROPERTIES]
Method = Literal[METHODS]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateInput(Strict):
    contributors: list[Annotated[str, Field(max_length=64)]] | None = Field(
        None, min_length=1, max_length=256, json_schema_extra={"uniqueItems": True},
        description="distinct contributor ids; default: all licensed")
    n: int = Field(4, ge=1, le=MAX_N, description="number of images (CDM_MAX_N)")
    steps: int = Field(SAMPLE_STEPS, ge=1, le=MAX_STEPS, description="denoising steps (CDM_MAX_STEPS)")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    scheduler: Literal[SCHEDULERS] = SCHEDULERS[0]
    top_k: int | None = Field(None, ge=1, le=1024,
                              description="each image on at most this many shards, by weight "
                                          "(cut to the number of contributors used)")
    mass: float | None = Field(None, gt=0, le=1,
                               description="each image on the fewest shards holding this much "
                                           "weight; 1: every shard with weight (dense). "
                                           f"Neither given: top_k {DEFAULT_TOP_K} with mass "
                                           f"{DEFAULT_MASS}")
    draw_above: int | None = Field(None, ge=0, le=100_000,
                                   description="at steps whose timestep exceeds it, each image "
                                               "runs on one shard drawn by its weight (an "
                                               "unbiased estimate of the mixture); default: "
                                               "the default routing's")
    label: Label | Annotated[list[Label], Field(min_length=1, max_length=MAX_N)] | None = Field(
        None, description="labelled stores: the label of every image, or a list of one per "
                          "image (repeated to fill n); default: drawn from the contributors' "
                          "labels. A label no licensed, live contributor holds is a 404")
    prompt: str | None = Field(
        None, min_length=1, max_length=300,
        description="text stores: what every image shows, e.g. \"red apple\" (at most 16 "
                    "tokens of the text encoder; a longer prompt is a 400 naming the limit); "
                    "default: none. A store without text conditioning answers 404")
    guidance: float = Field(1.0, ge=0, le=20,
                            description="text stores: classifier-free guidance, applied per "
                                        "shard; 1: none; any other value costs twice the "
                                        "shard evaluations (ignored without a prompt)")


class ForgetInput(Strict):
    contributor_id: str = ContributorId


class JobInput(Strict):
    job_id: str = Field(min_length=1, max_length=64)


class AddContributorInput(Strict):
    folder: str = Field(min_length=1, max_length=4096,
                        description="a folder on the server, under CDM_DATA_ROOTS")
    kind: Literal[SHARD_KINDS] | None = None


class ValueInput(Strict):
    property: Property = Field(VALUATION["property"],
                               description="default: what the default payout policy pays by")
    methods: list[Method] = Field(
        list(VALUATION["methods"]), min_length=1, max_length=len(METHODS),
        json_schema_extra={"uniqueItems": True},
        description="default: exact Shapley (credit's `shapley` and the default payout "
                    f"policy) and Beta({BETA_ALPHA:g}, {BETA_BETA:g}) Shapley (the better "
                    "policy on unconditional stores)")
    alpha: float = Field(BETA_ALPHA, gt=0, le=1000, description="beta-shapley: Beta(alpha, beta)")
    beta: float = Field(BETA_BETA, gt=0, le=1000, description="beta-shapley")
    n: int = Field(VALUATION["n"], ge=2, le=4096, description="samples per coalition")
    steps: int = Field(VALUATION["steps"], ge=1, le=500, description="sampling steps per coalition")
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
    property: Property
    method: Method
    alpha: float | None = Field(None, gt=0, le=1000,
                                description=f"beta-shapley only: Beta(alpha, beta), default "
                                            f"{BETA_ALPHA:g}")
    beta: float | None = Field(None, gt=0, le=1000,
                               description=f"beta-shapley only: default {BETA_BETA:g}")


class AttributionInput(Strict):
    request_id: str = Field(min_length=1, max_length=64)


class HistoryInput(Strict):
    limit: int = Field(100, ge=1, le=1000)
    before: float | None = Field(None, description="only requests created before this time (s)")


class Empty(Strict):
    pass


# ---- the console's endpoints (console.py)
class RevokeKeyInput(Strict):
    key_id: str = Field(min_length=1, max_length=64, description="the id `keys` lists")


class AuditInput(Strict):
    contributor_id: str | None = Field(None, pattern=r"^(\*|" + CONTRIBUTOR_ID[1:-1] + r")$",
                                       description="admin: only this contributor's records "
                                                   "('*': those about no one contributor)")
    limit: int = Field(200, ge=1, le=5000)


class JobsInput(Strict):
    kind: Literal[JOB_KINDS] | None = None
    limit: int = Field(50, ge=1, le=1000)


class ValuationsInput(Strict):
    limit: int = Field(200, ge=1, le=5000)


INPUTS = {"/generate": GenerateInput, "/forget": ForgetInput, "/job": JobInput,
          "/add_contributor": AddContributorInput, "/value": ValueInput,
          "/contributors": Empty, "/attribution": AttributionInput, "/credit": Empty,
          "/history": HistoryInput, "/payout_policy": PayoutPolicyInput,
          "/whoami": Empty, "/keys": Empty, "/revoke_key": RevokeKeyInput,
          "/audit": AuditInput, "/jobs": JobsInput, "/valuations": ValuationsInput}
_READ = (400, 401, 413, 415, 429)
ERRORS = {"/generate": (400, 401, 403, 404, 409, 413, 415, 429, 503),
          "/forget": (400, 401, 403, 404, 409, 413, 415, 429),
          "/job": (400, 401, 404, 413, 415, 429),
          "/add_contributor": (400, 401, 403, 404, 409, 413, 415, 429),
          "/value": (400, 401, 403, 404, 409, 413, 415, 429, 503),
          "/contributors": _READ, "/attribution": (400, 401, 404, 413, 415, 429),
          "/credit": _READ, "/history": _READ,
          "/payout_policy": (400, 401, 403, 409, 413, 415, 429),
          "/whoami": _READ, "/keys": (400, 401, 403, 413, 415, 429),
          "/revoke_key": (400, 401, 403, 404, 413, 415, 429),
          "/audit": (400, 401, 403, 413, 415, 429), "/jobs": (400, 401, 403, 413, 415, 429),
          "/valuations": (400, 401, 403, 413, 415, 429)}
ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "string"},
    "detail": {"type": "array", "items": {"type": "object", "properties": {
        "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
        "msg": {"type": "string"}, "type": {"type": "string"}}}}}}
