"""The JSON Schema of policy files, for editors (`# yaml-language-server: $schema=...`)."""

from __future__ import annotations

import copy
from typing import Any

from autoscaler.policy.model import Policy

__all__ = ["policy_json_schema"]


def policy_json_schema() -> dict[str, Any]:
    """The schema as ops write the file: `pools` is a mapping from pool name to its settings."""
    schema = Policy.model_json_schema(mode="validation")
    schema = copy.deepcopy(schema)
    defs = schema.get("$defs", {})
    pool = defs.get("PoolPolicy")
    if pool is not None:
        pool["properties"].pop("name", None)
        pool["required"] = [r for r in pool.get("required", []) if r != "name"]
    schema["properties"]["pools"] = {
        "title": "Pools",
        "description": "Worker pools by name; each scales one Compose or Swarm service.",
        "type": "object",
        "minProperties": 1,
        "propertyNames": {"pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"},
        "additionalProperties": {"$ref": "#/$defs/PoolPolicy"},
    }
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "autoscaler policy"
    return schema
