"""FHIR date/dateTime/instant values as ranges of epoch microseconds, and HTTP dates."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from hie.fhir.dates import (
    format_http_date,
    format_instant,
    parse_http_date,
    parse_range,
    require_range,
)
from hie.hub.errors import InvalidRequest

US = 1_000_000


def us(*args: int) -> int:
    """Epoch microseconds of a UTC wall-clock time."""
    return int(datetime(*args, tzinfo=UTC).timestamp()) * US  # type: ignore[misc]


# --- precision ranges ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "lo", "hi"),
    [
        # a year covers all of it, leap or not
        ("2024", us(2024, 1, 1), us(2025, 1, 1) - 1),
        ("2023", us(2023, 1, 1), us(2024, 1, 1) - 1),
        # months, including February of a leap year and December (the year rolls over)
        ("2024-02", us(2024, 2, 1), us(2024, 3, 1) - 1),
        ("2023-02", us(2023, 2, 1), us(2023, 3, 1) - 1),
        ("2024-04", us(2024, 4, 1), us(2024, 5, 1) - 1),
        ("2024-12", us(2024, 12, 1), us(2025, 1, 1) - 1),
        # a day
        ("2024-02-29", us(2024, 2, 29), us(2024, 3, 1) - 1),
        ("2024-12-31", us(2024, 12, 31), us(2025, 1, 1) - 1),
        # minute and second precision
        ("2024-03-05T10:15", us(2024, 3, 5, 10, 15), us(2024, 3, 5, 10, 16) - 1),
        ("2024-03-05T10:15Z", us(2024, 3, 5, 10, 15), us(2024, 3, 5, 10, 16) - 1),
        ("2024-03-05T10:15:30", us(2024, 3, 5, 10, 15, 30), us(2024, 3, 5, 10, 15, 31) - 1),
        ("2024-03-05T10:15:30Z", us(2024, 3, 5, 10, 15, 30), us(2024, 3, 5, 10, 15, 31) - 1),
        ("2024-12-31T23:59:59Z", us(2024, 12, 31, 23, 59, 59), us(2025, 1, 1) - 1),
    ],
)
def test_precision_ranges(value: str, lo: int, hi: int) -> None:
    assert parse_range(value) == (lo, hi)


@pytest.mark.parametrize(
    ("frac", "offset", "width"),
    [
        ("5", 500_000, 100_000),
        ("50", 500_000, 10_000),
        ("123", 123_000, 1_000),
        ("123456", 123_456, 1),
        # beyond microseconds the value is one microsecond wide, truncated
        ("123456789", 123_456, 1),
        ("000000001", 0, 1),
    ],
)
def test_fractional_seconds(frac: str, offset: int, width: int) -> None:
    base = us(2024, 3, 5, 10, 15, 30)
    assert parse_range(f"2024-03-05T10:15:30.{frac}Z") == (base + offset, base + offset + width - 1)


def test_ranges_are_closed_and_nested() -> None:
    year = parse_range("2024")
    month = parse_range("2024-12")
    day = parse_range("2024-12-31")
    second = parse_range("2024-12-31T23:59:59Z")
    assert year and month and day and second
    # each finer value lies inside the coarser one and they share the same last microsecond
    assert year[0] <= month[0] <= day[0] <= second[0]
    assert year[1] == month[1] == day[1] == second[1]


def test_surrounding_whitespace_is_ignored() -> None:
    assert parse_range(" 2024-03-05 ") == parse_range("2024-03-05")
    assert parse_range("2024-03-05T10:15:30Z\n") == parse_range("2024-03-05T10:15:30Z")


def test_extreme_years() -> None:
    # the last representable day must not overflow while computing its end
    assert parse_range("9999") == (us(9999, 1, 1), us(9999, 12, 31) + 86_400 * US - 1)
    assert parse_range("9999-12") == (us(9999, 12, 1), us(9999, 12, 31) + 86_400 * US - 1)
    assert parse_range("9999-12-31") == (us(9999, 12, 31), us(9999, 12, 31) + 86_400 * US - 1)
    end = parse_range("9999-12-31T23:59:59.999999Z")
    assert end is not None and end[0] == end[1]
    assert parse_range("0001-01-01") == (us(1, 1, 1), us(1, 1, 2) - 1)


# --- time zones ---------------------------------------------------------------------------


def test_moscow_offset_is_converted_to_utc() -> None:
    moscow = parse_range("2024-03-05T10:15:30+03:00")
    assert moscow == (us(2024, 3, 5, 7, 15, 30), us(2024, 3, 5, 7, 15, 31) - 1)
    assert moscow == parse_range("2024-03-05T07:15:30Z")


def test_negative_offset_and_date_change() -> None:
    # 22:30 in New York (-05:00) is 03:30 the next day in UTC
    assert parse_range("2024-01-31T22:30:00-05:00") == parse_range("2024-02-01T03:30:00Z")


def test_offset_with_minutes_and_fraction() -> None:
    # India (+05:30)
    assert parse_range("2024-03-05T10:15:30.25+05:30") == (
        us(2024, 3, 5, 4, 45, 30) + 250_000,
        us(2024, 3, 5, 4, 45, 30) + 259_999,
    )


def test_minute_precision_with_offset() -> None:
    assert parse_range("2024-03-05T10:15+03:00") == (
        us(2024, 3, 5, 7, 15),
        us(2024, 3, 5, 7, 16) - 1,
    )


def test_offset_limits() -> None:
    assert parse_range("2024-01-01T00:00:00+14:00") == parse_range("2023-12-31T10:00:00Z")
    assert parse_range("2024-01-01T00:00:00-14:00") == parse_range("2024-01-01T14:00:00Z")
    assert parse_range("2024-01-01T00:00:00-00:00") == parse_range("2024-01-01T00:00:00Z")


def test_values_without_a_zone_are_utc() -> None:
    assert parse_range("2024-03-05T10:15:30") == parse_range("2024-03-05T10:15:30Z")
    assert parse_range("2024-03-05") == (us(2024, 3, 5), us(2024, 3, 6) - 1)


# --- invalid values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "2024-02-30",
        "2023-02-29",
        "2024-04-31",
        "2024-13",
        "2024-00",
        "2024-01-00",
        "0000",
        "2024-03-05T24:00",
        "2024-03-05T23:60",
        "2024-03-05T23:59:60",
        "2024-03-05T10:15:30+25:00",
        "2024-03-05T10:15:30+03:99",
        "2024-03-05T10:15:30+14:30",
        "garbage",
        "",
        " ",
        "2024-3-5",
        "24-03-05",
        "20240305",
        "2024-03-05T10",
        "2024-03-05 10:15",
        "2024-03-05T10:15:30.",
        "2024-03-05T10:15:30.1234567890",
        "2024-03-05T10:15:30+0300",
        "2024-03-05T10:15:30z",
        "-2024",
        "12024",
        # only ASCII digits are digits in FHIR
        "２０２４",
        "٢٠٢٤-٠٣",
        "2024-03-05T10:15:30Z\x00",
    ],
)
def test_invalid_values(value: str) -> None:
    assert parse_range(value) is None


def test_require_range_names_the_parameter() -> None:
    assert require_range("2024", "birthdate") == parse_range("2024")
    with pytest.raises(InvalidRequest, match="birthdate") as err:
        require_range("2024-02-30", "birthdate")
    assert err.value.status == 400
    assert err.value.code == "HIE-1001"


# --- formatting -----------------------------------------------------------------------------


def test_format_instant() -> None:
    assert format_instant(0) == "1970-01-01T00:00:00.000Z"
    assert format_instant(us(2024, 3, 5, 7, 15, 30) + 123_456) == "2024-03-05T07:15:30.123Z"
    assert format_instant(-1) == "1969-12-31T23:59:59.999Z"


@pytest.mark.parametrize(
    "when",
    [
        0,
        1,
        999,
        1_000,
        1_709_622_930_123_456,
        us(2000, 2, 29, 12),
        us(1950, 6, 1),
        us(9999, 12, 31),
    ],
)
def test_format_instant_round_trips_to_the_millisecond(when: int) -> None:
    text = format_instant(when)
    rng = parse_range(text)
    assert rng is not None
    # the instant is written with millisecond precision, so it covers that millisecond
    assert rng == (when - when % 1_000, when - when % 1_000 + 999)
    assert format_instant(rng[0]) == text


def test_format_http_date() -> None:
    assert format_http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert format_http_date(us(2024, 3, 5, 7, 15, 30) + 999_999) == "Tue, 05 Mar 2024 07:15:30 GMT"


@pytest.mark.parametrize(
    "when", [0, 1_709_622_930_123_456, us(2024, 12, 31, 23, 59, 59), us(1999, 1, 1)]
)
def test_http_date_round_trips_to_the_second(when: int) -> None:
    assert parse_http_date(format_http_date(when)) == when - when % US


def test_parse_http_date_other_forms_and_garbage() -> None:
    # RFC 850 and asctime forms are obsolete but still valid HTTP-dates
    assert parse_http_date("Tue, 05 Mar 2024 07:15:30 +0300") == us(2024, 3, 5, 4, 15, 30)
    assert parse_http_date("garbage") is None
    assert parse_http_date("") is None
