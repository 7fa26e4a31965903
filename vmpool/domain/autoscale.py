"""Adaptive warm pools (issue 24): the desired ready buffer S of a pool.

The planner keeps ready + booting = S (+ waiting calls) and boots one
replacement per lease: a base-stock policy. With arrivals at rate λ and a mean
boot time L, the VMs booting are Poisson(λL) (Palm), so a Lease finds no VM
with probability P(Poisson(λL) >= S). S is therefore

- the rate term: the Poisson quantile of λL for the target wait share, λ the
  largest of several sliding-window estimates (each short window discounted by
  its noise, so a rise is seen within a boot time or two and a steady rate is
  not over-counted);
- the profile term (``learn_daily``): per bin of the period (UTC time of day),
  the peak arrivals within one mean boot time seen in that bin, the second
  largest over the last PROFILE_DAYS periods (a burst seen on two days is
  served on the third; one random burst teaches nothing), applied from one
  boot-time quantile before the bin starts;
- the larger of the two, bounded by floor, ceiling and max_size; a rise is
  taken at once, a fall only after scale_down_delay and then linearly over
  another scale_down_delay.

No I/O: times are seconds since the epoch passed in by the caller (the
reconciler's clock, or a simulation's). tests/unit/domain/test_autoscale.py has the
table tests; tests/bench/autoscale.py drives these functions in a simulation.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from vmpool.config.autoscale import AutoscaleConfig
from vmpool.config.schema import PoolConfig

DEFAULT_BOOT_S = 60.0  # before a pool's first boot is seen
BOOT_SAMPLES = 64  # recent boot times kept per pool
BOOT_QUANTILE = 0.95  # how early to start booting for a learned bin
PROFILE_DAYS = 7  # periods of profile kept
NOISE_Z = 2.0  # a short window's count is discounted by this many standard deviations
RISE_Z = 3.7  # ... unless it is this many above the window's rate (p < 1e-4): a real rise
SHORT_WINDOWS = 4  # windows of window/2, /4, /8, /16 besides the whole window
SLOTS_PER_WINDOW = 360
#: The rate is an estimate, and P(wait) is convex in S: aiming at the target
#: itself misses it on average. The rate term aims this much under it.
AIM = 0.7


@dataclass(frozen=True, slots=True)
class Settings:
    """An ``autoscale:`` block in seconds (see vmpool.config.autoscale)."""

    floor: int = 0
    ceiling: int = 10_000
    target: float = 0.01
    delay: float = 600.0
    learn_daily: bool = True
    period: float = 86_400.0
    bin: float = 300.0
    window: float = 1800.0
    act: bool = True

    @property
    def slot(self) -> float:
        """Resolution of the demand record: at least 1 s (what replicas flush)."""
        return max(1.0, math.floor(min(self.window / SLOTS_PER_WINDOW, self.bin)))

    @property
    def bins(self) -> int:
        return max(1, round(self.period / self.bin))


def poisson_quantile(mean: float, share: float) -> int:
    """The least S with P(Poisson(mean) >= S) <= share (0 when nothing arrives)."""
    if mean <= 0:
        return 0
    if mean > 500:  # exp(-mean) underflows: the normal approximation is close there
        z = _normal_upper(share)
        return math.ceil(mean + z * math.sqrt(mean) + 0.5)
    k = 0
    p = math.exp(-mean)
    cdf = p
    while 1.0 - cdf > share and k < 100_000:
        k += 1
        p *= mean / k
        cdf += p
    return k + 1


def _normal_upper(share: float) -> float:
    """z with P(Z > z) = share (bisection on erfc; only for very large means)."""
    lo, hi = -10.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(mid / math.sqrt(2)) > share:
            lo = mid
        else:
            hi = mid
    return hi


class Demand:
    """Lease attempts per slot over the last ``keep`` seconds (in memory).

    Slots are kept with running totals, so a count over any span is two
    binary searches, whatever the window's length."""

    __slots__ = ("_base", "_cum", "_head", "_idx", "keep", "since", "slot")

    def __init__(self, slot: float, keep: float, since: float) -> None:
        self.slot = slot
        self.keep = keep
        self.since = since  # demand is known from here on (start-up, or what was read back)
        self._idx: list[int] = []  # slot index, ascending
        self._cum: list[int] = []  # running total up to and including that slot
        self._head = 0  # slots before this are trimmed
        self._base = 0  # running total before the head

    def add(self, at: float, count: int = 1) -> None:
        idx = int(at // self.slot)
        ids, cum = self._idx, self._cum
        if len(ids) > self._head and ids[-1] == idx:
            cum[-1] += count
        elif len(ids) == self._head or ids[-1] < idx:
            ids.append(idx)
            cum.append((cum[-1] if cum else self._base) + count)
        else:  # a late flush from another replica: rare
            pos = bisect.bisect_left(ids, idx, self._head)
            if ids[pos] != idx:
                ids.insert(pos, idx)
                cum.insert(pos, cum[pos - 1] if pos > 0 else self._base)
            for k in range(pos, len(cum)):
                cum[k] += count

    def trim(self, now: float) -> None:
        oldest = int((now - self.keep) // self.slot)
        head = bisect.bisect_left(self._idx, oldest, self._head)
        if head > self._head:
            self._base = self._cum[head - 1]
            self._head = head
        if self._head > 512 and self._head * 2 > len(self._idx):
            del self._idx[: self._head]
            del self._cum[: self._head]
            self._head = 0

    def _before(self, pos: int) -> int:
        return self._cum[pos - 1] if pos > self._head else self._base

    def counts_within(self, now: float, spans: list[float]) -> list[int]:
        """Arrivals in (now - span, now] for each span."""
        last = int(now // self.slot)
        ids, head = self._idx, self._head
        upto = self._before(bisect.bisect_right(ids, last, head))
        out = []
        for span in spans:
            first = last - max(1, round(span / self.slot))
            out.append(upto - self._before(bisect.bisect_right(ids, first, head)))
        return out

    def total(self) -> int:
        return (self._cum[-1] if len(self._cum) > self._head else self._base) - self._base


@dataclass(slots=True)
class Learned:
    """What survives a restart or a new leader (stored in PostgreSQL)."""

    boots: list[float] = field(default_factory=list)  # recent boot times, newest last
    profile_days: list[int] = field(default_factory=lambda: [-1] * PROFILE_DAYS)
    profile: list[list[int]] = field(default_factory=list)  # PROFILE_DAYS rows x bins
    s: int = 0  # the desired S now
    hold: int = 0  # S when it last rose
    raised_at: float | None = None  # when S last rose


def boot_mean(learned: Learned) -> float:
    return sum(learned.boots) / len(learned.boots) if learned.boots else DEFAULT_BOOT_S


def boot_quantile(learned: Learned, q: float = BOOT_QUANTILE) -> float:
    if not learned.boots:
        return DEFAULT_BOOT_S
    ordered = sorted(learned.boots)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def observe_boot(learned: Learned, seconds: float) -> None:
    learned.boots.append(max(seconds, 0.0))
    del learned.boots[:-BOOT_SAMPLES]


def arrival_rate(settings: Settings, demand: Demand, now: float, boot: float) -> float:
    """Arrivals per second expected over the next boot time: the largest of

    - the whole window's rate (a steady rate, measured with the least noise);
    - each shorter window's rate less NOISE_Z standard deviations, or its plain
      rate when its count is beyond doubt (RISE_Z) above the window's rate: a
      step up is followed within a boot time;
    - a rise across the window (its newer half against its older half, when
      beyond doubt) carried forward to one boot time from now: a ramp."""
    known = max(now - demand.since, demand.slot, boot)
    window = settings.window
    spans = sorted({window / 2**k for k in range(SHORT_WINDOWS + 1)} | {boot})
    counts = demand.counts_within(now, spans)
    whole = counts[-1] / max(min(window, known), demand.slot)
    best = whole
    for span, count in zip(spans[:-1], counts[:-1], strict=True):
        seconds = max(min(span, known), demand.slot)
        expected = whole * seconds
        if count - expected > RISE_Z * math.sqrt(expected + 1):
            best = max(best, count / seconds)
        elif count:
            best = max(best, (count - NOISE_Z * math.sqrt(count)) / seconds)
    if known >= window:
        newer = counts[spans.index(window / 2)]
        older = counts[-1] - newer
        if newer - older > RISE_Z * math.sqrt(newer + older + 1):
            slope = (newer - older) / (window / 2) ** 2  # per second, per second
            best = max(best, newer / (window / 2) + slope * (window / 4 + boot))
    return best


def _row(learned: Learned, settings: Settings, day: int) -> list[int]:
    bins = settings.bins
    if len(learned.profile) != PROFILE_DAYS or any(len(r) != bins for r in learned.profile):
        learned.profile = [[0] * bins for _ in range(PROFILE_DAYS)]
        learned.profile_days = [-1] * PROFILE_DAYS
    r = day % PROFILE_DAYS
    if learned.profile_days[r] != day:
        learned.profile_days[r] = day
        learned.profile[r] = [0] * bins
    return learned.profile[r]


def record_peak(settings: Settings, learned: Learned, now: float, within_boot: int) -> None:
    """The arrivals within one mean boot time up to ``now``: the bin's peak today."""
    if not settings.learn_daily:
        return
    day, offset = divmod(now, settings.period)
    row = _row(learned, settings, int(day))
    b = min(int(offset // settings.bin), settings.bins - 1)
    row[b] = max(row[b], within_boot)


def profile_term(settings: Settings, learned: Learned, now: float, lead: float) -> int:
    """For the bins from now to now + lead: the second largest peak of recent days."""
    if not settings.learn_daily or not learned.profile:
        return 0
    today = int(now // settings.period)
    rows = [
        row
        for day, row in zip(learned.profile_days, learned.profile, strict=False)
        if 0 <= today - day < PROFILE_DAYS
    ]
    if len(rows) < 2:
        return 0
    first = int((now % settings.period) // settings.bin)
    last = int(((now + lead) % settings.period) // settings.bin)
    count = (last - first) % settings.bins + 1
    best = 0
    for k in range(count):
        b = (first + k) % settings.bins
        top = second = 0
        for row in rows:
            v = row[b] if b < len(row) else 0
            if v > top:
                top, second = v, top
            elif v > second:
                second = v
        best = max(best, second)
    return best


@dataclass(frozen=True, slots=True)
class Decision:
    """The desired S and what it came from (status, metrics, the log line)."""

    s: int
    rate: float  # arrivals per second
    boot_mean: float
    boot_quantile: float
    rate_term: int
    profile_term: int
    reason: str


def decide(
    settings: Settings,
    learned: Learned,
    demand: Demand,
    now: float,
    max_size: int,
) -> Decision:
    """The desired S at ``now``; updates ``learned`` (profile peak, S, its hold)."""
    mean = boot_mean(learned)
    lead = boot_quantile(learned)
    within = demand.counts_within(now, [mean + demand.slot])[0]  # the slot now is partial
    record_peak(settings, learned, now, within)
    rate = arrival_rate(settings, demand, now, mean)
    rate_term = poisson_quantile(rate * mean, settings.target * AIM)
    prof = profile_term(settings, learned, now, lead)
    wanted, reason = (prof, "profile") if prof > rate_term else (rate_term, "rate")
    top = min(settings.ceiling, max_size)
    if wanted < settings.floor:
        wanted, reason = settings.floor, "floor"
    if wanted > top:
        wanted, reason = top, "ceiling" if settings.ceiling <= max_size else "max_size"
    s = held(settings, learned, wanted, now)
    if s != wanted:
        reason = "holding" if s == learned.hold else "falling"
    return Decision(s, rate, mean, lead, rate_term, prof, reason)


def held(settings: Settings, learned: Learned, wanted: int, now: float) -> int:
    """Fast up, slow down: a rise at once; a fall after the delay, linearly."""
    if learned.raised_at is None or wanted > learned.s or now < learned.raised_at:
        learned.s = learned.hold = wanted
        learned.raised_at = now
        return wanted
    since = now - learned.raised_at - settings.delay
    if since <= 0:
        return learned.s
    decayed = math.ceil(learned.hold * (1.0 - since / settings.delay))
    learned.s = max(wanted, min(learned.s, decayed))
    return learned.s


def settings_of(block: AutoscaleConfig, max_size: int) -> Settings:
    return Settings(
        floor=block.floor,
        ceiling=block.ceiling if block.ceiling is not None else max_size,
        target=block.target_wait_share,
        delay=block.scale_down_delay.total_seconds(),
        learn_daily=block.learn_daily,
        period=block.period.total_seconds(),
        bin=block.bin.total_seconds(),
        window=block.window.total_seconds(),
        act=block.acts,
    )


def least_ready(pool: PoolConfig) -> int:
    """What a pool keeps ready at least (RUNNING once it has them): its
    min_ready, or with an acting autoscale block the floor of S."""
    block = pool.autoscale
    return block.floor if block is not None and block.acts else pool.min_ready
