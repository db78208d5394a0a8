"""FHIR date/dateTime/instant values as closed ranges of epoch microseconds (UTC).

A value covers its whole precision: ``2024`` is every microsecond of 2024, ``2024-03-05`` the
whole day. Values without a time zone are taken as UTC.
"""

from __future__ import annotations

import calendar
import functools
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from hie.hub.errors import InvalidRequest

_RX = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?$",
    re.ASCII,  # FHIR digits are ASCII; \d alone would take "２０２４" or Arabic-Indic digits
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_DAY = 86_400_000_000


def _us(dt: datetime) -> int:
    return (dt - _EPOCH) // _US


def parse_range(value: str) -> tuple[int, int] | None:
    """The range [lo, hi] a FHIR date-ish value covers, or None if it is not one."""
    m = _RX.match(value.strip())
    if not m:
        return None
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    try:
        tzinfo = UTC
        if tz and tz != "Z":
            # FHIR allows offsets from -14:00 to +14:00 with minutes 00-59
            if int(tz[4:6]) > 59 or tz[1:] > "14:00":
                return None
            sign = 1 if tz[0] == "+" else -1
            tzinfo = timezone_from(sign * (int(tz[1:3]) * 60 + int(tz[4:6])))
        # the span is counted in microseconds, not as a datetime, so 9999-12-31 does not overflow
        if mo is None:
            lo = datetime(int(y), 1, 1, tzinfo=UTC)
            span = (366 if calendar.isleap(int(y)) else 365) * _DAY
        elif d is None:
            lo = datetime(int(y), int(mo), 1, tzinfo=UTC)
            span = calendar.monthrange(int(y), int(mo))[1] * _DAY
        elif hh is None:
            lo = datetime(int(y), int(mo), int(d), tzinfo=UTC)
            span = _DAY
        else:
            lo = datetime(int(y), int(mo), int(d), int(hh), int(mi), int(ss or 0), tzinfo=tzinfo)
            if frac:
                lo_us = _us(lo) + int(frac[:6].ljust(6, "0"))
                return lo_us, lo_us + 10 ** (6 - min(len(frac), 6)) - 1
            span = 1_000_000 if ss is not None else 60_000_000
    except ValueError:
        return None
    return _us(lo), _us(lo) + span - 1


def timezone_from(minutes: int) -> Any:
    """A fixed-offset tzinfo."""
    from datetime import timezone

    return timezone(timedelta(minutes=minutes))


def require_range(value: str, what: str) -> tuple[int, int]:
    """Like :func:`parse_range` but raises InvalidRequest naming ``what``."""
    rng = parse_range(value)
    if rng is None:
        raise InvalidRequest(f"{what}: {value!r} is not a valid FHIR date/dateTime")
    return rng


@functools.lru_cache(maxsize=256)
def format_instant(us: int) -> str:
    """Epoch microseconds as a FHIR instant with millisecond precision, UTC."""
    dt = _EPOCH + timedelta(microseconds=us)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def format_http_date(us: int) -> str:
    """Epoch microseconds as an RFC 9110 HTTP-date (Last-Modified)."""
    dt = _EPOCH + timedelta(microseconds=us)
    return dt.strftime("%a, %d %b %Y %H:%M:%S GMT")


def parse_http_date(value: str) -> int | None:
    """An HTTP-date as epoch microseconds (second precision), or None."""
    from email.utils import parsedate_to_datetime

    try:
        return _us(parsedate_to_datetime(value))
    except (TypeError, ValueError):
        return None
