"""The optional ``autoscale:`` block of a pool or a tier (issue 24): the ready
buffer S (ready + booting) sized from observed demand instead of ``min_ready``.
The rules that use it are in vmpool.domain.autoscale."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from vmpool.core.durations import parse_duration

MAX_SPAN = timedelta(days=366)  # a period or delay longer than a year is a typo
MAX_BINS = 10_000  # the profile is kept, and stored, per bin (7 periods of them)
MAX_WINDOW = timedelta(days=1)


def _span(value: Any) -> timedelta:
    """A positive duration string; seconds are fine (short test periods)."""
    if isinstance(value, timedelta):
        out = value
    elif isinstance(value, str):
        out = parse_duration(value)
    else:
        raise ValueError(f'{value!r} is not a duration string such as "30s" or "10m"')
    if out <= timedelta(0):
        raise ValueError("must be positive")
    if out > MAX_SPAN:
        raise ValueError("must be at most 366d")
    return out


Span = Annotated[timedelta, BeforeValidator(_span)]


class AutoscaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    floor: int = Field(default=0, ge=0, le=10_000)
    ceiling: int | None = Field(default=None, ge=0, le=10_000)  # None: max_size
    target_wait_share: float = Field(default=0.01, gt=0, lt=1)
    scale_down_delay: Span = timedelta(minutes=10)
    learn_daily: bool = True
    period: Span = timedelta(hours=24)
    bin: Span = timedelta(minutes=5)
    window: Span = timedelta(minutes=30)  # the longest window demand is measured over
    mode: Literal["act", "observe"] = "act"

    @model_validator(mode="after")
    def _consistent(self) -> AutoscaleConfig:
        if self.ceiling is not None and self.floor > self.ceiling:
            raise ValueError(f"floor ({self.floor}) exceeds ceiling ({self.ceiling})")
        period_ms = round(self.period.total_seconds() * 1000)
        bin_ms = round(self.bin.total_seconds() * 1000)
        if bin_ms > period_ms or period_ms % bin_ms:
            raise ValueError(
                f"bin ({self.bin.total_seconds():g}s) does not divide period "
                f"({self.period.total_seconds():g}s)"
            )
        if period_ms // bin_ms > MAX_BINS:
            raise ValueError(f"period / bin is {period_ms // bin_ms} bins; at most {MAX_BINS}")
        if self.window > MAX_WINDOW:
            raise ValueError("window: at most 24h (demand is kept in memory for it)")
        return self

    @property
    def acts(self) -> bool:
        return self.mode == "act"


def check_against_size(block: AutoscaleConfig | None, max_size: int) -> None:
    """The block's bounds against the pool's (or tier's) ``max_size``."""
    if block is None:
        return
    if block.ceiling is not None and block.ceiling > max_size:
        raise ValueError(f"autoscale.ceiling ({block.ceiling}) exceeds max_size ({max_size})")
    if block.floor > max_size:
        raise ValueError(f"autoscale.floor ({block.floor}) exceeds max_size ({max_size})")
