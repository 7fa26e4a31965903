"""A CustomResourceDefinition's schema as a JSON Schema validator.

A CRD's openAPIV3Schema is structural OpenAPI v3, which the API server reads
with extensions jsonschema does not know: `x-kubernetes-int-or-string` (an
integer or a string), `nullable`, `x-kubernetes-preserve-unknown-fields` (the
only place unknown fields survive: elsewhere they are pruned, or refused
under strict field validation), `x-kubernetes-list-type: set` (unique items)
and `x-kubernetes-validations` (CEL rules). `to_json_schema` converts the
first four; the CEL rules are handed back with where they apply, for the
caller to check the ones its object reaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# Keys that are structure to recurse into (a schema, or a list or map of them).
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf")


@dataclass(frozen=True)
class CelRule:
    path: str  # dotted, "[]" for any item of a list: "spec.postgresql.synchronous"
    rule: str
    message: str


def load_crd_schema(crd_file: Path, version: str) -> dict[str, Any]:
    crd = yaml.safe_load(crd_file.read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema: dict[str, Any] = served["schema"]["openAPIV3Schema"]
    return schema


def to_json_schema(node: dict[str, Any]) -> tuple[dict[str, Any], list[CelRule]]:
    """The schema jsonschema can check strictly, and the CEL rules it cannot."""
    rules: list[CelRule] = []
    return _convert(node, "", rules), rules


def _convert(node: dict[str, Any], path: str, rules: list[CelRule]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {
                name: _convert(sub, f"{path}.{name}".lstrip("."), rules)
                for name, sub in value.items()
            }
        elif key == "items" and isinstance(value, dict):
            out[key] = _convert(value, f"{path}[]", rules)
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = _convert(value, f"{path}.*", rules)
        elif key in _SCHEMA_LISTS:
            out[key] = [_convert(sub, path, rules) for sub in value]
        elif key == "not":
            out[key] = _convert(value, path, rules)
        elif key == "x-kubernetes-validations":
            rules.extend(CelRule(path, v["rule"], v.get("message", "")) for v in value)
        elif key == "x-kubernetes-list-type":
            if value == "set":
                out["uniqueItems"] = True
        elif key == "nullable" or key.startswith("x-kubernetes-"):
            continue  # handled below, or no check of ours
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def reach(obj: Any, path: str) -> list[Any]:
    """Every value at a CelRule path in obj ("[]" stands for each list item)."""
    found = [obj]
    for part in path.replace("[]", ".[]").split(".") if path else []:
        nxt: list[Any] = []
        for value in found:
            if part == "[]" and isinstance(value, list):
                nxt.extend(value)
            elif part == "*" and isinstance(value, dict):
                nxt.extend(value.values())
            elif isinstance(value, dict) and part in value:
                nxt.append(value[part])
        found = nxt
    return found
