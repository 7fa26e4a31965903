"""Typed, validated configuration (spec section 7), loaded once at start-up."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from vmpool.config.autoscale import AutoscaleConfig, check_against_size
from vmpool.config.database import DatabaseConfig, check_database_url
from vmpool.core.address import split_host_port
from vmpool.core.durations import parse_duration

POOL_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_DURATION = timedelta(days=3650)  # 10 years: anything longer is a typo, and overflows dates
MAX_POOL_SIZE = 10_000


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        # A bare number is ambiguous (seconds? minutes?): say which string to write.
        raise ValueError(
            f'{value!r} is a bare number; durations are strings with a unit, e.g. "{value}s"'
            ' or "30m" (units ms, s, m, h, d)'
        )
    if not isinstance(value, str):
        raise ValueError("must be a duration string such as 30m")
    return parse_duration(value)


def _bounded_duration(value: Any) -> timedelta:
    out = _duration(value)
    if abs(out) > MAX_DURATION:
        raise ValueError("must be at most 10 years")
    return out


def _optional_duration(value: Any) -> timedelta | None:
    if value is None or value == "":
        return None
    return _bounded_duration(value)


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be positive")
    return value


Duration = Annotated[timedelta, BeforeValidator(_bounded_duration)]
PositiveDuration = Annotated[
    timedelta, BeforeValidator(_bounded_duration), AfterValidator(_positive)
]
OptionalDuration = Annotated[timedelta | None, BeforeValidator(_optional_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FakeProviderConfig(_Strict):
    boot_seconds: float = Field(default=2.0, ge=0, le=86_400)
    failure_rate: float = Field(default=0.0, ge=0, le=1)
    seed: int | None = None  # fixed seed: reproducible failures


class KubevirtProviderConfig(_Strict):
    namespace: str = "vmpool"
    kubeconfig: str = ""
    deployment: str = "vmpool"
    qps: float = Field(default=20.0, gt=0, le=10_000)
    burst: int = Field(default=40, ge=1, le=100_000)
    orphan_grace: Duration = timedelta(minutes=10)


class ProviderConfig(_Strict):
    kind: Literal["fake", "kubevirt"] = "fake"
    fake: FakeProviderConfig = FakeProviderConfig()
    kubevirt: KubevirtProviderConfig = KubevirtProviderConfig()


class Sizing(_Strict):
    """How many instances a pool keeps and how long they are leased: the keys a
    config pool and an API pool's tier share, checked the same way."""

    min_ready: int = Field(default=2, ge=0, le=MAX_POOL_SIZE)
    max_size: int = Field(default=10, ge=0, le=MAX_POOL_SIZE)
    max_provisioning: int = Field(default=5, ge=1, le=MAX_POOL_SIZE)
    default_lease: Duration = timedelta(minutes=30)
    max_lease: Duration = timedelta(hours=24)
    max_lifetime: OptionalDuration = None
    reservation_ttl: Duration = timedelta(minutes=5)
    boot_timeout: Duration = timedelta(minutes=10)
    max_ready_age: OptionalDuration = None
    autoscale: AutoscaleConfig | None = None  # None: a fixed min_ready, as always

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.min_ready > self.max_size:
            raise ValueError(f"min_ready ({self.min_ready}) exceeds max_size ({self.max_size})")
        if self.default_lease <= timedelta(0):
            raise ValueError("default_lease must be positive")
        if self.default_lease > self.max_lease:
            raise ValueError("default_lease exceeds max_lease")
        if self.reservation_ttl <= timedelta(0):
            raise ValueError("reservation_ttl must be positive")
        check_against_size(self.autoscale, self.max_size)
        return self


class PoolConfig(Sizing):
    name: str
    labels: dict[str, str] = {}
    zone: str = ""
    template: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not POOL_NAME.match(value):
            raise ValueError("must be a DNS label: lowercase letters, digits and '-'")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Any:
        # YAML turns `size: 2` into an int; labels are strings on the wire.
        if isinstance(value, dict):
            return {str(k): "" if v is None else str(v) for k, v in value.items()}
        return value


# --- identity (identity.md): TLS, authentication, policy, quotas -------------

MAX_QUOTA = 1_000_000


class TlsConfig(_Strict):
    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    require_client_cert: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    @model_validator(mode="after")
    def _consistent(self) -> TlsConfig:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")
        if (self.client_ca_file or self.require_client_cert) and not self.cert_file:
            raise ValueError("client certificates need cert_file and key_file")
        if self.require_client_cert and not self.client_ca_file:
            raise ValueError("require_client_cert needs client_ca_file")
        return self


class KubernetesAuthConfig(_Strict):
    kubeconfig: str = ""
    audiences: list[str] = ["vmpool"]
    cache_ttl: Duration = timedelta(seconds=60)


class JwtAuthConfig(_Strict):
    issuer: str = ""
    audiences: list[str] = []
    jwks_url: str = ""
    jwks_file: str = ""
    username_claim: str = Field(default="sub", min_length=1)
    groups_claim: str = "groups"


Role = Literal["lease", "pools", "admin"]


class PolicyDefault(_Strict):
    roles: list[Role] = ["lease"]
    service_tags: list[str] = ["*"]
    pools: list[str] = ["*"]
    max_active_leases: int | None = Field(default=None, ge=0, le=MAX_QUOTA)
    max_queued_reservations: int | None = Field(default=None, ge=0, le=MAX_QUOTA)


class PolicyEntry(PolicyDefault):
    subject: str = Field(min_length=1)


class AuthConfig(_Strict):
    mode: Literal["none", "kubernetes", "jwt", "mtls"] = "none"
    kubernetes: KubernetesAuthConfig = KubernetesAuthConfig()
    jwt: JwtAuthConfig = JwtAuthConfig()
    mtls: dict[str, Any] = {}
    policy: list[PolicyEntry] = []
    default: PolicyDefault = PolicyDefault()
    allow_anonymous_admin: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> AuthConfig:
        if self.mtls:
            raise ValueError("mtls: takes no keys (use {})")
        if self.mode == "jwt":
            if not self.jwt.issuer:
                raise ValueError("jwt.issuer: required with auth.mode jwt")
            if bool(self.jwt.jwks_url) == bool(self.jwt.jwks_file):
                raise ValueError("jwt: set exactly one of jwks_url and jwks_file")
        return self


class LimitsConfig(_Strict):
    # Quotas per owner, counted in the database (identity.md section 5).
    max_queued_reservations: int = Field(default=100, ge=0, le=MAX_QUOTA)
    max_active_leases: int = Field(default=0, ge=0, le=MAX_QUOTA)
    # What one process lets its clients cost, enforced by vmpool.wire.h2guard and the
    # waiting-call cap (identity.md sections 5-6).
    max_waiting_calls: int = Field(default=500, ge=0, le=1_000_000)
    # A waiting Lease re-reads its reservation at least this often (the wake-up
    # when its VM is assigned, here or by NOTIFY, usually comes first).
    wait_recheck: Duration = timedelta(seconds=1)
    max_message_bytes: int = Field(default=65536, ge=1024, le=16 * 1024 * 1024)
    max_concurrent_streams: int = Field(default=100, ge=1, le=10_000)
    max_connections: int = Field(default=2000, ge=1, le=1_000_000)
    idle_timeout: Duration = timedelta(minutes=5)
    handshake_timeout: Duration = timedelta(seconds=10)
    # WatchLeases streams (docs/api.md): per process, per connection, the
    # events one stream may fall behind before it is ended, the heartbeat.
    max_watch_streams: int = Field(default=2000, ge=0, le=100_000)
    max_watch_streams_per_connection: int = Field(default=100, ge=1, le=10_000)
    watch_buffer: int = Field(default=1000, ge=10, le=1_000_000)
    watch_heartbeat: Duration = timedelta(seconds=15)

    @field_validator("idle_timeout", "handshake_timeout", "watch_heartbeat", "wait_recheck")
    @classmethod
    def _bounded_duration(cls, value: timedelta) -> timedelta:
        if not timedelta(0) < value <= timedelta(days=1):
            raise ValueError("must be positive and at most 24h")
        return value


class ReconcilerConfig(_Strict):
    """The background work's own keys (leadership, housekeeping)."""

    # A leader trusts itself until its last renewal + leader_ttl (less a
    # margin); a follower takes over once that has passed in the database.
    leader_ttl: PositiveDuration = timedelta(seconds=10)
    # Ended leases kept in lease_history this long, then deleted in batches.
    lease_history_retention: PositiveDuration = timedelta(days=30)
    # Lease events kept for WatchLeases to resume from (older cursors: OUT_OF_RANGE).
    lease_events_retention: PositiveDuration = timedelta(hours=1)


# --- API pools: tiers, hardware templates, versions (pool-api.md section 5) ---


class TierConfig(Sizing):
    """A sizing preset for API pools (the sizing half of a PoolConfig); its
    API pools get its autoscale block too."""

    name: str
    description: str = ""
    min_ready: int = Field(default=1, ge=0, le=MAX_POOL_SIZE)
    max_size: int = Field(default=1, ge=0, le=MAX_POOL_SIZE)
    max_provisioning: int = Field(default=1, ge=1, le=MAX_POOL_SIZE)
    reservation_ttl: Duration = timedelta(minutes=1)


class HardwareTemplateConfig(_Strict):
    """A VM shape for API pools; ${runtime} and ${intrinsic_os} are substituted."""

    name: str
    description: str = ""
    has_gpu: bool = False
    template: dict[str, Any] = {}


class VersionsConfig(_Strict):
    runtime: str = "intrinsic.platform.20261201.RC00"
    intrinsic_os: str = "20261201.RC00"
    runtime_pattern: str = ""
    intrinsic_os_pattern: str = ""

    @field_validator("runtime_pattern", "intrinsic_os_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a regular expression: {err}") from None
        return value

    @model_validator(mode="after")
    def _current_matches(self) -> VersionsConfig:
        for key in ("runtime", "intrinsic_os"):
            pattern = getattr(self, f"{key}_pattern")
            if pattern and not re.search(pattern, getattr(self, key)):
                raise ValueError(f"versions.{key} does not match versions.{key}_pattern")
        return self


BUILTIN_TIER = TierConfig(
    name="ad_hoc_single",
    description="One VM, made on demand",
    min_ready=1,
    max_size=1,
    max_provisioning=1,
)
BUILTIN_HW_TEMPLATE = HardwareTemplateConfig(name="default", description="The default VM")


def _with_builtin(items: list[Any], builtin: Any) -> list[Any]:
    """The Go client sends ``ad_hoc_single`` / ``default`` when the user names
    none, so both always exist: appended when the file does not define them."""
    if any(i.name == builtin.name for i in items):
        return items
    return [*items, builtin]


class Config(_Strict):
    listen: str = "0.0.0.0:50051"
    metrics_listen: str = "0.0.0.0:9090"
    database_url: Annotated[str, AfterValidator(check_database_url)] = ""
    data_dir: str = ".vmpool"
    reconcile_interval: PositiveDuration = timedelta(seconds=1)
    shutdown_grace: Duration = timedelta(seconds=20)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    default_pool: str = ""
    provider: ProviderConfig = ProviderConfig()
    pools: list[PoolConfig] = []
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()
    admin_listen: str = ""
    # Plaintext grpc.health.v1 only, for the kubelet's gRPC probes when TLS is on.
    health_listen: str = ""
    limits: LimitsConfig = LimitsConfig()
    reconciler: ReconcilerConfig = ReconcilerConfig()
    database: DatabaseConfig = DatabaseConfig()

    tiers: list[TierConfig] = Field(default=[], validate_default=True)
    hardware_templates: list[HardwareTemplateConfig] = Field(default=[], validate_default=True)
    versions: VersionsConfig = VersionsConfig()

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, value: list[TierConfig]) -> list[TierConfig]:
        return _with_builtin(_unique(value, "tiers"), BUILTIN_TIER)

    @field_validator("hardware_templates")
    @classmethod
    def _hw_templates(cls, value: list[HardwareTemplateConfig]) -> list[HardwareTemplateConfig]:
        return _with_builtin(_unique(value, "hardware_templates"), BUILTIN_HW_TEMPLATE)

    @field_validator("listen", "metrics_listen", "admin_listen", "health_listen")
    @classmethod
    def _address(cls, value: str, info: Any) -> str:
        if value == "" and info.field_name in ("metrics_listen", "admin_listen", "health_listen"):
            return value
        split_host_port(value)
        return value

    @model_validator(mode="after")
    def _pools(self) -> Config:
        names = [p.name for p in self.pools]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"pools: duplicate pool name {name!r}")
        if self.default_pool and self.default_pool not in names:
            raise ValueError(f"default_pool: no pool named {self.default_pool!r}")
        return self

    @model_validator(mode="after")
    def _identity(self) -> Config:
        if self.auth.mode == "mtls" and not self.tls.client_ca_file:
            raise ValueError(
                "auth.mode mtls: needs tls.client_ca_file to verify client certificates"
            )
        if self.admin_listen and self.admin_listen == self.listen:
            raise ValueError("admin_listen: must differ from listen")
        return self

    def pool(self, name: str) -> PoolConfig | None:
        for p in self.pools:
            if p.name == name:
                return p
        return None

    def tier(self, name: str) -> TierConfig | None:
        return next((t for t in self.tiers if t.name == name), None)

    def hw_template(self, name: str) -> HardwareTemplateConfig | None:
        return next((t for t in self.hardware_templates if t.name == name), None)


def _unique(items: list[Any], key: str) -> list[Any]:
    names = [i.name for i in items]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"duplicate name {name!r}")
        if not name:
            raise ValueError("a name must not be empty")
    return items
