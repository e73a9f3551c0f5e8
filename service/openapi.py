"""The OpenAPI document BentoML publishes at /docs.json, completed: the bearer scheme
on every endpoint, the error statuses each can answer (schemas.ERRORS) with the error
body, whether a body is required, and pydantic's JSON Schema 2020-12 written as the
OpenAPI 3.0 the document declares (so that clients and fuzzers read it right).
"""

from __future__ import annotations

from .errors import REASONS
from .schemas import ERROR_SCHEMA, ERRORS, INPUTS

METRICS_ERRORS = (401, 403, 429)  # no key, not an admin's, too many failed checks


def to_openapi_30(node):
    """Pydantic writes JSON Schema 2020-12; the document says OpenAPI 3.0: a nullable
    field becomes `nullable: true` (and a nullable enum lists null), a numeric exclusive
    bound becomes `minimum`/`maximum` with a boolean `exclusive*`."""
    if isinstance(node, list):
        return [to_openapi_30(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: to_openapi_30(v) for k, v in node.items()}
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


def complete(spec: dict) -> dict:
    """BentoML's document with the security scheme, the error responses and 3.0 schemas."""
    spec = to_openapi_30(spec)
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
                responses[str(code)] = {"description": REASONS[code], "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            op["responses"] = responses
    for op in (spec.get("paths", {}).get("/metrics") or {}).values():  # guarded by the Gate
        op["security"] = [{"bearer": []}, {}]  # {}: open with CDM_METRICS_PUBLIC=1
        op.setdefault("responses", {}).update({
            str(code): {"description": REASONS[code], "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for code in METRICS_ERRORS})
    return spec
