"""The bidirectional schedules by the name a config uses ("dualpipe", "dualpipev")."""

from __future__ import annotations

from .bidirectional import BidirectionalSchedule
from .dualpipe import DualPipe
from .dualpipev import DualPipeV

SCHEDULES: dict[str, type[BidirectionalSchedule]] = {cls.name.lower(): cls
                                                     for cls in (DualPipeV, DualPipe)}


def schedule_class(name: str) -> type[BidirectionalSchedule]:
    """The schedule a config names ("dualpipev" or "dualpipe", any case)."""
    try:
        return SCHEDULES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown pipeline schedule {name!r}; use one of "
                         f"{sorted(SCHEDULES)}") from None


__all__ = ["SCHEDULES", "schedule_class"]
