"""API pool rules (pool-api.md sections 2-5). Pure: no I/O, no clock.

Names, specs and update masks are checked here; the status of a pool is
computed here from what the store counts; and an API pool's tier and hardware
template become the PoolConfig the reconciler and providers already know.
"""

from __future__ import annotations

import copy
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from vmpool.config.schema import Config, HardwareTemplateConfig, PoolConfig, TierConfig
from vmpool.core.echo import echo
from vmpool.domain.leasing import FailedPrecondition, InvalidArgument, check_text

MAX_NAME = 128
DEFAULT_TIER = "ad_hoc_single"
DEFAULT_HW_TEMPLATE = "default"

RUNNING = "RUNNING"
PAUSED = "PAUSED"
STOPPED = "STOPPED"
DELETED = "DELETED"
DESIRED_STATUSES = (RUNNING, PAUSED, STOPPED, DELETED)
INITIALIZING = "INITIALIZING"
PAUSING = "PAUSING"
STOPPING = "STOPPING"
DELETING = "DELETING"
CURRENT_STATUSES = (INITIALIZING, RUNNING, PAUSING, PAUSED, STOPPING, STOPPED, DELETING)

SPEC_FIELDS = ("runtime", "intrinsic_os", "hardware_template", "pool_tier")

#: What a config pool says when asked to change through the API.
CONFIG_MANAGED = "managed by the configuration file"


def _name_char(c: str, first: bool) -> bool:
    category = unicodedata.category(c)
    if category.startswith("L") or category == "Nd":
        return True
    return not first and c in "-_."


def check_pool_name(name: str, field: str = "name") -> str:
    """1-128 letters (any script), digits, '-', '_', '.'; first a letter or digit."""
    if not name:
        raise InvalidArgument(f"{field}: must not be empty")
    check_text(field, name)
    if len(name) > MAX_NAME:
        raise InvalidArgument(f"{field}: longer than {MAX_NAME} characters ({len(name)})")
    for i, c in enumerate(name):
        if not _name_char(c, i == 0):
            shown = echo(name)
            where = "must start with a letter or digit" if i == 0 else f"has {c!r} at {i}"
            raise InvalidArgument(
                f"{field}: {shown!r} {where} (allowed: letters, digits, '-', '_', '.')"
            )
    return name


class SpecFields(Protocol):
    """Anything that carries a spec: a pools table row, a Spec message."""

    @property
    def runtime(self) -> str: ...
    @property
    def intrinsic_os(self) -> str: ...
    @property
    def hardware_template(self) -> str: ...
    @property
    def pool_tier(self) -> str: ...


@dataclass(frozen=True, slots=True)
class PoolSpec:
    runtime: str = ""
    intrinsic_os: str = ""
    hardware_template: str = ""
    pool_tier: str = ""

    @classmethod
    def of(cls, source: SpecFields) -> PoolSpec:
        return cls(source.runtime, source.intrinsic_os, source.hardware_template, source.pool_tier)


def _check_choice(field: str, value: str, valid: list[str]) -> None:
    if value not in valid:
        names = ", ".join(repr(v) for v in valid)
        raise InvalidArgument(f"spec.{field}: no such {field} {echo(value)!r} (valid: {names})")


def _check_version(config: Config, field: str, value: str) -> None:
    check_text(f"spec.{field}", value)
    pattern = getattr(config.versions, f"{field}_pattern")
    if len(value) > 256:
        raise InvalidArgument(f"spec.{field}: longer than 256 characters")
    if pattern and not re.search(pattern, value):
        raise InvalidArgument(f"spec.{field}: {echo(value)!r} does not match {pattern!r}")


def resolve_field(config: Config, field: str, value: str) -> str:
    """One Spec field as stored: empty means the default (versions: current now)."""
    if field == "pool_tier":
        value = value or DEFAULT_TIER
        _check_choice(field, value, [t.name for t in config.tiers])
    elif field == "hardware_template":
        value = value or DEFAULT_HW_TEMPLATE
        _check_choice(field, value, [t.name for t in config.hardware_templates])
    else:
        if not value:
            return str(getattr(config.versions, field))
        _check_version(config, field, value)
    return value


def resolve_spec(config: Config, spec: PoolSpec) -> PoolSpec:
    """The spec as stored: every empty field replaced by its default, all checked."""
    return PoolSpec(**{f: resolve_field(config, f, getattr(spec, f)) for f in SPEC_FIELDS})


def mask_fields(paths: list[str] | None) -> tuple[str, ...]:
    """The Spec fields an update_mask names: None (absent mask) means all of them.
    Paths may be written ``runtime`` or ``spec.runtime``."""
    if paths is None:
        return SPEC_FIELDS
    out: list[str] = []
    for path in paths:
        field = path.removeprefix("spec.")
        if field not in SPEC_FIELDS:
            valid = ", ".join(SPEC_FIELDS)
            raise InvalidArgument(
                f"update_mask: unknown path {echo(path)!r} (valid: {valid}, optionally 'spec.'-prefixed)"
            )
        if field not in out:
            out.append(field)
    return tuple(out)


def updated_spec(
    config: Config, current: PoolSpec, requested: PoolSpec, paths: list[str] | None
) -> PoolSpec:
    """UpdatePool's new spec. ``paths`` None: the mask was absent (replace every
    field, empty meaning the default); an empty list: nothing changes."""
    changes = {f: resolve_field(config, f, getattr(requested, f)) for f in mask_fields(paths)}
    return replace(current, **changes)


# --- status -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Counts:
    """A pool's instances by state (what the store counts)."""

    provisioning: int = 0
    ready: int = 0
    reserved: int = 0
    leased: int = 0
    destroying: int = 0
    stale_free: int = 0  # free or booting instances of an older spec

    @property
    def free(self) -> int:
        return self.provisioning + self.ready + self.reserved

    @property
    def vms(self) -> int:
        return self.free + self.leased + self.destroying


def effective_min_ready(min_ready: int, max_size: int, counts: Counts) -> int:
    """min_ready, as far as max_size leaves room beside the leased instances."""
    return max(0, min(min_ready, max_size - counts.leased))


@dataclass(frozen=True, slots=True)
class Status:
    current: str
    reconciling: bool


def pool_status(
    desired: str,
    counts: Counts,
    *,
    min_ready: int,
    max_size: int,
    reached_running: bool,
) -> Status:
    """current_status and reconciling of section 3, from the counts."""
    if desired == RUNNING:
        want = effective_min_ready(min_ready, max_size, counts)
        filled = counts.ready + counts.reserved >= want
        current = RUNNING if reached_running or filled else INITIALIZING
        return Status(current, current != RUNNING or not filled or counts.stale_free > 0)
    if desired == PAUSED:
        done = counts.free == 0
        return Status(PAUSED if done else PAUSING, not done)
    if desired == STOPPED:
        done = counts.vms == 0
        return Status(STOPPED if done else STOPPING, not done)
    return Status(DELETING, True)


def check_mutable(name: str, desired: str, *, configured: bool, what: str) -> None:
    """UpdatePool / DeletePool on config pools, and changes to a deleting pool."""
    if configured and what in ("update", "delete"):
        raise FailedPrecondition(f'name: pool "{name}" is {CONFIG_MANAGED}; {what} it there')
    if desired == DELETED and what != "delete":
        raise FailedPrecondition(f'name: pool "{name}" is DELETING; it cannot {what}')


def not_leasable(name: str, desired: str) -> str:
    return f'pool: "{name}" has desired status {desired}; leasing needs RUNNING'


# --- tiers and templates -------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\$\{(runtime|intrinsic_os)\}")


def substitute(value: Any, versions: Mapping[str, str]) -> Any:
    """``${runtime}`` and ``${intrinsic_os}`` replaced in every string (keys too)."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: versions[m.group(1)], value)
    if isinstance(value, dict):
        return {substitute(k, versions): substitute(v, versions) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, versions) for v in value]
    return value


# Any valid config pool name: PoolConfig's own rules check the sizing, then the
# API pool's real name (a wider alphabet) is put in.
_STAND_IN = "api-pool"


def api_pool_config(
    name: str, spec: PoolSpec, tier: TierConfig, template: HardwareTemplateConfig
) -> PoolConfig:
    """The PoolConfig an API pool runs with: its tier's sizing, its template's VM."""
    versions = {"runtime": spec.runtime, "intrinsic_os": spec.intrinsic_os}
    sizing = tier.model_dump(exclude={"name", "description"})
    checked = PoolConfig(
        name=_STAND_IN,
        labels={"tier": tier.name, "hardware_template": template.name},
        template=substitute(copy.deepcopy(template.template), versions),
        **sizing,
    )
    return checked.model_copy(update={"name": name})


def pool_config_for(config: Config, name: str, spec: PoolSpec) -> PoolConfig | None:
    """None when the tier or template was removed from the config since."""
    tier = config.tier(spec.pool_tier)
    template = config.hw_template(spec.hardware_template)
    if tier is None or template is None:
        return None
    return api_pool_config(name, spec, tier, template)
