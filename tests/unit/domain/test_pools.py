"""The pure API-pool rules (vmpool/domain/pools.py) and who may call what (pool_access.py)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from vmpool.api.pool_access import authorize_pool_call
from vmpool.auth.caller import Caller, current_caller
from vmpool.auth.policy import Grant
from vmpool.auth.principal import Principal
from vmpool.config.loading import parse_config
from vmpool.domain import pools
from vmpool.domain.leasing import FailedPrecondition, InvalidArgument, PermissionDenied
from vmpool.domain.pools import Counts, PoolSpec, pool_status
from vmpool.store.pools import PoolRow

CONFIG = parse_config(
    {
        "tiers": [{"name": "small", "min_ready": 2, "max_size": 3}],
        "hardware_templates": [{"name": "gpu", "has_gpu": True}],
        "versions": {
            "runtime": "intrinsic.platform.20261201.RC00",
            "intrinsic_os": "20261201.RC00",
            "runtime_pattern": r"^intrinsic\.platform\.\d{8}\.RC\d{2}$",
        },
    }
)


@pytest.mark.parametrize(
    "name",
    ["a", "my-pool", "Ad_Hoc.1", "Jürgen-ü", "日本語", "9lives", "x" * 128, "DOMAIN-User"],
)
def test_valid_names_are_kept_verbatim(name: str) -> None:
    assert pools.check_pool_name(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "must not be empty"),
        ("-a", "must start with a letter or digit"),
        ("_a", "must start with a letter or digit"),
        ("a b", "has ' '"),
        ("a/b", "has '/'"),
        ("organizations/o/pools/p", "has '/'"),
        ("x" * 129, "longer than 128"),
        ("a\x00b", "NUL"),
    ],
)
def test_invalid_names_name_the_field(name: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^name: .*{why}"):
        pools.check_pool_name(name)


def test_resolve_spec_pins_versions_and_defaults_tier_and_template() -> None:
    got = pools.resolve_spec(CONFIG, PoolSpec())
    assert got == PoolSpec(
        "intrinsic.platform.20261201.RC00", "20261201.RC00", "default", "ad_hoc_single"
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (PoolSpec(pool_tier="huge"), "spec.pool_tier: .*'small', 'ad_hoc_single'"),
        (PoolSpec(hardware_template="x"), "spec.hardware_template: .*'gpu', 'default'"),
        (PoolSpec(runtime="latest"), "spec.runtime: 'latest' does not match"),
    ],
)
def test_resolve_spec_refuses_unknown_names_and_bad_versions(spec: PoolSpec, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        pools.resolve_spec(CONFIG, spec)


def test_intrinsic_os_without_a_pattern_is_any_text() -> None:
    assert pools.resolve_spec(CONFIG, PoolSpec(intrinsic_os="whatever")).intrinsic_os == "whatever"


CURRENT = PoolSpec("intrinsic.platform.20250101.RC00", "20250101.RC00", "gpu", "small")


@pytest.mark.parametrize(
    ("paths", "requested", "expected"),
    [
        # Absent mask: every field replaced, empty meaning the default.
        (None, PoolSpec(intrinsic_os="20270101.RC01"),
         PoolSpec("intrinsic.platform.20261201.RC00", "20270101.RC01", "default", "ad_hoc_single")),
        # Present but empty: nothing changes.
        ([], PoolSpec(runtime="", pool_tier="ad_hoc_single"), CURRENT),
        # Prefixed and bare paths; fields outside the mask ignored.
        (["spec.runtime"], PoolSpec("intrinsic.platform.20270101.RC01", "x", "default", "ad_hoc_single"),
         PoolSpec("intrinsic.platform.20270101.RC01", "20250101.RC00", "gpu", "small")),
        (["pool_tier", "spec.pool_tier"], PoolSpec(pool_tier="ad_hoc_single"),
         PoolSpec(CURRENT.runtime, CURRENT.intrinsic_os, "gpu", "ad_hoc_single")),
        # A named field that is empty: the default (the current version now).
        (["spec.runtime"], PoolSpec(),
         PoolSpec("intrinsic.platform.20261201.RC00", "20250101.RC00", "gpu", "small")),
    ],
)  # fmt: skip
def test_update_masks(paths: list[str] | None, requested: PoolSpec, expected: PoolSpec) -> None:
    assert pools.updated_spec(CONFIG, CURRENT, requested, paths) == expected


def test_unknown_mask_path_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match=r"update_mask: unknown path 'spec\.colour'"):
        pools.mask_fields(["spec.runtime", "spec.colour"])
    with pytest.raises(InvalidArgument, match="update_mask"):
        pools.mask_fields(["spec"])


@pytest.mark.parametrize(
    ("desired", "counts", "reached", "current", "reconciling"),
    [
        ("RUNNING", Counts(provisioning=2), False, "INITIALIZING", True),
        ("RUNNING", Counts(ready=1, provisioning=1), False, "INITIALIZING", True),
        ("RUNNING", Counts(ready=2), False, "RUNNING", False),
        ("RUNNING", Counts(ready=1, leased=1), True, "RUNNING", True),  # refilling
        ("RUNNING", Counts(leased=3), False, "RUNNING", False),  # all at max_size leased
        ("RUNNING", Counts(ready=2, stale_free=1), True, "RUNNING", True),  # rollout
        ("PAUSED", Counts(ready=1, leased=1), True, "PAUSING", True),
        ("PAUSED", Counts(leased=1, destroying=1), True, "PAUSED", False),
        ("STOPPED", Counts(leased=1), True, "STOPPING", True),
        ("STOPPED", Counts(destroying=1), True, "STOPPING", True),
        ("STOPPED", Counts(), True, "STOPPED", False),
        ("DELETED", Counts(leased=1), True, "DELETING", True),
        ("DELETED", Counts(), True, "DELETING", True),
    ],
)
def test_status_machine(
    desired: str, counts: Counts, reached: bool, current: str, reconciling: bool
) -> None:
    got = pool_status(desired, counts, min_ready=2, max_size=3, reached_running=reached)
    assert (got.current, got.reconciling) == (current, reconciling)


def test_min_ready_zero_skips_initializing() -> None:
    got = pool_status("RUNNING", Counts(), min_ready=0, max_size=2, reached_running=False)
    assert (got.current, got.reconciling) == ("RUNNING", False)


def test_ad_hoc_single_with_its_vm_leased_is_running_and_settled() -> None:
    got = pool_status("RUNNING", Counts(leased=1), min_ready=1, max_size=1, reached_running=False)
    assert (got.current, got.reconciling) == ("RUNNING", False)


def test_changes_to_deleting_and_config_pools() -> None:
    with pytest.raises(FailedPrecondition, match="configuration file"):
        pools.check_mutable("cfg", "RUNNING", configured=True, what="update")
    with pytest.raises(FailedPrecondition, match="configuration file"):
        pools.check_mutable("cfg", "RUNNING", configured=True, what="delete")
    pools.check_mutable("cfg", "RUNNING", configured=True, what="pause")
    for what in ("resume", "pause", "stop", "update"):
        with pytest.raises(FailedPrecondition, match="DELETING"):
            pools.check_mutable("p", "DELETED", configured=False, what=what)
    pools.check_mutable("p", "DELETED", configured=False, what="delete")  # idempotent


def test_templates_get_the_versions_substituted() -> None:
    template = {
        "metadata": {"labels": {"rt": "${runtime}"}},
        "spec": {"image": "os:${intrinsic_os}", "list": ["${runtime}-${intrinsic_os}", 3]},
        "${runtime}": "key too",
        "untouched": "${other}",
    }
    got = pools.substitute(template, {"runtime": "R", "intrinsic_os": "O"})
    assert got == {
        "metadata": {"labels": {"rt": "R"}},
        "spec": {"image": "os:O", "list": ["R-O", 3]},
        "R": "key too",
        "untouched": "${other}",
    }


def test_api_pool_config_takes_sizing_from_the_tier_and_keeps_the_name() -> None:
    cfg = pools.pool_config_for(
        CONFIG, "Mein Pool", pools.resolve_spec(CONFIG, PoolSpec(pool_tier="small"))
    )
    assert cfg is not None
    assert (cfg.name, cfg.min_ready, cfg.max_size) == ("Mein Pool", 2, 3)
    assert pools.pool_config_for(CONFIG, "p", PoolSpec("r", "o", "gone", "small")) is None


# --- who may call what ---------------------------------------------------------------


def _row(owner: str, source: str = "api") -> PoolRow:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return PoolRow(
        "p", source, source == "config", "RUNNING", True, "", "", "", "", owner, now, now
    )


@pytest.fixture(autouse=True)
def _caller_restored() -> Iterator[None]:
    """Tests set the RPC's caller; later tests get the default back."""
    token = current_caller.set(current_caller.get())
    yield
    current_caller.reset(token)


def _as(name: str, roles: set[str], authenticated: bool = True) -> None:
    grant = Grant(name, frozenset(roles), ("*",), ("*",), 0, 0)
    current_caller.set(Caller(Principal(name, (), authenticated), grant))


def test_pools_role_creates_and_owns() -> None:
    _as("alice", {"lease", "pools"})
    assert authorize_pool_call("create", None) == "alice"
    assert authorize_pool_call("pause", _row("alice")) == "alice"
    with pytest.raises(PermissionDenied, match='belongs to "bob"'):
        authorize_pool_call("delete", _row("bob"))
    with pytest.raises(PermissionDenied, match="configuration file"):
        authorize_pool_call("stop", _row("", source="config"))
    with pytest.raises(PermissionDenied, match="role admin"):
        authorize_pool_call("list_leases", None)  # every pool's leases
    assert authorize_pool_call("list_leases", _row("bob")) == "alice"  # a read


def test_lease_role_cannot_create_admin_does_everything() -> None:
    _as("carol", {"lease"})
    with pytest.raises(PermissionDenied, match="role pools"):
        authorize_pool_call("create", None)
    _as("root", {"admin"})
    for action in ("update", "delete", "pause", "stop", "resume", "stop_lease"):
        assert authorize_pool_call(action, _row("bob")) == "root"
    assert authorize_pool_call("stop", _row("", source="config")) == "root"


def test_anonymous_off_loopback_may_not_change_pools() -> None:
    # auth.mode none: from elsewhere than loopback the grant has the lease role only.
    _as("anonymous", {"lease"}, authenticated=False)
    with pytest.raises(PermissionDenied, match="loopback"):
        authorize_pool_call("create", None)
    _as("anonymous", {"lease", "pools", "admin"}, authenticated=False)  # from loopback
    assert authorize_pool_call("delete", _row("anonymous")) == "anonymous"
