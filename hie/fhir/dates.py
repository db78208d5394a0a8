"""FHIR date/dateTime/instant values as closed ranges of epoch microseconds (UTC).

A value covers its whole precision: ``2024`` is every microsecond of 2024, ``2024-03-05`` the
whole day. Values without a time zone are taken as UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from hie.hub.errors import InvalidRequest

_RX = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


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
            sign = 1 if tz[0] == "+" else -1
            tzinfo = timezone_from(sign * (int(tz[1:3]) * 60 + int(tz[4:6])))
        if mo is None:
            lo = datetime(int(y), 1, 1, tzinfo=UTC)
            hi = datetime(int(y) + 1, 1, 1, tzinfo=UTC)
        elif d is None:
            lo = datetime(int(y), int(mo), 1, tzinfo=UTC)
            hi = datetime(int(y) + (mo == "12"), int(mo) % 12 + 1, 1, tzinfo=UTC)
        elif hh is None:
            lo = datetime(int(y), int(mo), int(d), tzinfo=UTC)
            hi = lo + timedelta(days=1)
        else:
            lo = datetime(int(y), int(mo), int(d), int(hh), int(mi), int(ss or 0), tzinfo=tzinfo)
            if frac:
                lo = lo + timedelta(microseconds=int(frac[:6].ljust(6, "0")))
                hi = lo + timedelta(microseconds=10 ** (6 - min(len(frac), 6)))
            elif ss is not None:
                hi = lo + timedelta(seconds=1)
            else:
                hi = lo + timedelta(minutes=1)
    except ValueError:
        return None
    return _us(lo), _us(hi) - 1


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
