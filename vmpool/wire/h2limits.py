"""What vmpool.wire.h2guard holds each HTTP/2 connection to: the limits (from
the config's ``limits``) and the token bucket that rate limits spend."""

from __future__ import annotations

from dataclasses import dataclass

from vmpool.config.schema import LimitsConfig


@dataclass(frozen=True, slots=True)
class GuardSettings:
    max_message_bytes: int = 65536
    max_concurrent_streams: int = 100
    max_connections: int = 2000
    idle_timeout: float = 300.0
    handshake_timeout: float = 10.0
    ping_strikes: int = 10  # pings too close together tolerated
    min_ping_interval: float = 1.0  # seconds
    control_burst: int = 100  # SETTINGS, PRIORITY, PING ACK, empty DATA frames
    control_rate: float = 10.0  # per second, refilled

    @property
    def reset_burst(self) -> int:
        return 2 * self.max_concurrent_streams

    @property
    def reset_rate(self) -> float:
        return float(self.max_concurrent_streams)

    @classmethod
    def from_limits(cls, limits: LimitsConfig) -> GuardSettings:
        return cls(
            max_message_bytes=limits.max_message_bytes,
            max_concurrent_streams=limits.max_concurrent_streams,
            max_connections=limits.max_connections,
            idle_timeout=limits.idle_timeout.total_seconds(),
            handshake_timeout=limits.handshake_timeout.total_seconds(),
        )


class Budget:
    """A token bucket: ``spend`` is False once more than ``burst`` were spent
    faster than ``rate`` a second refills them."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, burst: int, rate: float, now: float) -> None:
        self._burst = float(burst)
        self._rate = rate
        self._tokens = float(burst)
        self._stamp = now

    def spend(self, now: float) -> bool:
        tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True


class PingPolicy:
    """The PINGs a connection may send. Any PING after the server sent data is
    fine (keepalive between calls, BDP probes); without data in between, one
    per ``min_interval`` seconds, ``strikes`` closer ones forgiven. ``allow``
    is False past that: the connection is to be closed (too_many_pings)."""

    __slots__ = ("_last", "_limit", "_min_interval", "_strikes")

    def __init__(self, min_interval: float, strikes: int) -> None:
        self._min_interval = min_interval
        self._limit = strikes
        self._strikes = 0
        self._last = -1e9

    def allow(self, now: float, sent_data_since: bool) -> bool:
        if sent_data_since:
            self._strikes = 0
        elif now - self._last < self._min_interval:
            self._strikes += 1
            if self._strikes > self._limit:
                return False
        self._last = now
        return True
