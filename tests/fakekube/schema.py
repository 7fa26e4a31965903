"""KubeVirt's OpenAPI definition of a VirtualMachine, as a JSON Schema validator."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]

#: The repo is cloned with shared/ beside it: <parent>/main and <parent>/shared.
SHARED = (Path(__file__).resolve().parents[2] / "../shared").resolve()
SWAGGER = SHARED / "kubevirt" / "swagger.json"
CIRROS_EXAMPLE = SHARED / "kubevirt" / "vm-cirros.yaml"


@functools.cache
def validator(definition: str = "v1.VirtualMachine") -> jsonschema.Draft4Validator:
    definitions = json.loads(SWAGGER.read_text())["definitions"]
    schema = {"$ref": f"#/definitions/{definition}", "definitions": definitions}
    return jsonschema.Draft4Validator(schema)


def schema_errors(obj: Any, definition: str) -> list[str]:
    """Every way ``obj`` breaks the swagger ``definition``, as readable strings."""
    found = sorted(validator(definition).iter_errors(obj), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in found]


def vm_errors(obj: Any) -> list[str]:
    """Every way ``obj`` breaks the v1.VirtualMachine schema."""
    return schema_errors(obj, "v1.VirtualMachine")


def vmi_errors(obj: Any) -> list[str]:
    """Every way ``obj`` breaks the v1.VirtualMachineInstance schema."""
    return schema_errors(obj, "v1.VirtualMachineInstance")
