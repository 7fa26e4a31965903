from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from vmpool.config.schema import PoolConfig
from vmpool.core.instant import GO_ZERO_TIME, UNIX_EPOCH, Instant
from vmpool.domain import leasing

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
POOL = PoolConfig(name="p", default_lease=timedelta(minutes=30), max_lease=timedelta(hours=2))


def at(offset: timedelta, nanos: int = 0) -> Instant:
    """NOW + offset, plus some nanoseconds."""
    return Instant(Instant.from_datetime(NOW + offset).ns + nanos)


@pytest.mark.parametrize("tag", ["x" * 129, "tab\there", "caf\u00e9", "nul\x00"])
def test_bad_service_tags_name_the_field(tag: str) -> None:
    with pytest.raises(leasing.InvalidArgument, match="service_tag"):
        leasing.check_service_tag(tag)


def test_good_service_tags() -> None:
    assert leasing.check_service_tag("") == ""  # today's public inctl sends no tag
    assert leasing.check_service_tag("inctl") == "inctl"
    assert leasing.check_service_tag("x" * 128) == "x" * 128
    assert leasing.check_service_tag("a b~!") == "a b~!"


def test_reservation_ids_are_uuids_of_any_version_any_case() -> None:
    u = uuid.uuid4()
    assert leasing.parse_reservation_id(str(u).upper()) == u
    assert leasing.parse_reservation_id(str(uuid.uuid1())).version == 1
    with pytest.raises(leasing.InvalidArgument, match="reservation_id"):
        leasing.parse_reservation_id("not-a-uuid")


@pytest.mark.parametrize("ts", [None, UNIX_EPOCH, GO_ZERO_TIME])
def test_timestamps_not_given(ts: Instant | None) -> None:
    assert not leasing.given(ts)
    requested = leasing.requested_expiry(ts, NOW)
    assert requested is None
    assert leasing.lease_expiry(requested, NOW, POOL) == at(timedelta(minutes=30))


def test_expiry_is_kept_to_the_nanosecond_or_capped_at_max_lease() -> None:
    assert leasing.lease_expiry(at(timedelta(days=3)), NOW, POOL) == at(timedelta(hours=2))
    asked = at(timedelta(hours=1), nanos=123)
    assert leasing.lease_expiry(asked, NOW, POOL) == asked
    assert leasing.lease_expiry(at(timedelta(0), 1), NOW, POOL) == at(timedelta(0), 1)


def test_expiry_in_the_past_is_refused() -> None:
    with pytest.raises(leasing.InvalidArgument, match="expires"):
        leasing.requested_expiry(at(-timedelta(seconds=1)), NOW)
    with pytest.raises(leasing.InvalidArgument, match="expires"):
        leasing.requested_expiry(at(timedelta(0)), NOW)
    with pytest.raises(leasing.InvalidArgument, match="expires"):
        leasing.requested_expiry(Instant(1), NOW)  # the epoch plus 1 ns is given
    asked = at(timedelta(0), 1)
    assert leasing.requested_expiry(asked, NOW) == asked


def test_max_lifetime_caps_leases_and_extensions() -> None:
    pool = POOL.model_copy(update={"max_lifetime": timedelta(hours=1)})
    assert leasing.lease_expiry(at(timedelta(hours=2)), NOW, pool) == at(timedelta(hours=1))
    leased_at = NOW - timedelta(minutes=50)
    new = leasing.extended_expiry(
        at(timedelta(hours=2)), NOW, leased_at, at(timedelta(0)), pool, extend_only=False
    )
    assert new == Instant.from_datetime(leased_at + timedelta(hours=1))


def test_extend_only_never_shortens_to_the_nanosecond() -> None:
    current = at(timedelta(hours=1), nanos=500)
    earlier = at(timedelta(minutes=10))
    assert leasing.extended_expiry(earlier, NOW, NOW, current, POOL, extend_only=True) is None
    assert leasing.extended_expiry(earlier, NOW, NOW, current, POOL, extend_only=False) == earlier
    later = at(timedelta(hours=1), nanos=501)
    assert leasing.extended_expiry(later, NOW, NOW, current, POOL, extend_only=True) == later
    same = at(timedelta(hours=1), nanos=500)
    assert leasing.extended_expiry(same, NOW, NOW, current, POOL, extend_only=True) is None


def test_extend_target_rules() -> None:
    with pytest.raises(leasing.InvalidArgument, match="to"):
        leasing.check_extend_target(GO_ZERO_TIME, NOW, extend_only=True)
    with pytest.raises(leasing.InvalidArgument, match="to"):
        leasing.check_extend_target(None, NOW, extend_only=True)
    with pytest.raises(leasing.InvalidArgument, match="to"):
        leasing.check_extend_target(at(-timedelta(1)), NOW, extend_only=False)
    past = at(-timedelta(minutes=1))
    assert leasing.check_extend_target(past, NOW, extend_only=True) == past


def test_pool_choice_most_free_then_name() -> None:
    assert leasing.choose_pool({"a": 1, "b": 3, "c": 3}, ["a", "b", "c"]) == "b"
    assert leasing.choose_pool({}, ["zeta", "alpha"]) == "alpha"
    assert leasing.choose_pool({"gone": 9}, ["a"]) == "a"
    assert leasing.choose_pool({}, []) is None


def test_queue_message_matches_the_spec() -> None:
    rid = uuid.UUID("1b4e28ba-2fa1-11d2-883f-0016d3cca427")
    assert (
        leasing.queued_message(rid, 2, 5, "alpha")
        == 'reservation 1b4e28ba-2fa1-11d2-883f-0016d3cca427 is queued at position 2 of 5 in pool "alpha"'
    )


def test_text_with_nul_never_reaches_the_database() -> None:
    with pytest.raises(leasing.InvalidArgument, match="instance: must not contain NUL"):
        leasing.check_instance("vmp-\x00")
    with pytest.raises(leasing.InvalidArgument, match="pool"):
        leasing.check_text("pool", "a\x00b")
    assert leasing.check_text("pool", "alpha") == "alpha"
