"""The resource store port: FHIR resources with every version, search-index rows, outbox.

The store knows nothing about FHIR semantics: the FHIR layer hands it JSON bytes plus the
search-index rows it extracted, and asks questions in the small condition language below. One
SQL implementation (:mod:`hie.hub.store.sql`) serves SQLite and PostgreSQL.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

Prefix = Literal["eq", "ne", "lt", "le", "gt", "ge", "sa", "eb", "ap"]


def param_id(resource_type: str, name: str) -> int:
    """Stable small integer for a search parameter of a resource type (keeps index rows small)."""
    return zlib.crc32(f"{resource_type}.{name}".encode()) & 0x7FFFFFFF


# --- index rows: what the FHIR layer extracts from a resource for searching -----------------


@dataclass(frozen=True, slots=True)
class TokenRow:
    """A coded value, identifier, boolean or code; ``system`` is None when the value has none."""

    param: str
    system: str | None
    code: str


@dataclass(frozen=True, slots=True)
class StringRow:
    """A string; ``norm`` is lower-cased and accent/ё-folded, ``exact`` as written."""

    param: str
    norm: str
    exact: str


@dataclass(frozen=True, slots=True)
class DateRow:
    """A date, dateTime, instant or Period as the closed range [lo, hi] in epoch microseconds."""

    param: str
    lo: int
    hi: int


@dataclass(frozen=True, slots=True)
class ReferenceRow:
    """A reference: relative (``target_type`` + ``target_id``) or absolute (type '' and the URL)."""

    param: str
    target_type: str
    target_id: str


@dataclass(frozen=True, slots=True)
class QuantityRow:
    """A number or Quantity (value with optional UCUM system/code)."""

    param: str
    value: float
    system: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class UriRow:
    """A uri, url or canonical."""

    param: str
    value: str


IndexRow = TokenRow | StringRow | DateRow | ReferenceRow | QuantityRow | UriRow


@dataclass(slots=True)
class IndexRows:
    """All search-index rows for one resource version."""

    rows: list[IndexRow] = field(default_factory=list)


# --- conditions: the search language the store compiles to SQL ------------------------------


@dataclass(frozen=True, slots=True)
class TokenCond:
    """``system|code`` match. ``system=None``: any system; ``system=''``: no system;
    ``code=None``: any code in the system. ``negate`` implements ``:not``."""

    param: str
    system: str | None
    code: str | None
    negate: bool = False


@dataclass(frozen=True, slots=True)
class StringCond:
    """String match on the normalised value: prefix (default), ``contains``, or ``exact``."""

    param: str
    value: str
    mode: Literal["prefix", "contains", "exact"] = "prefix"


@dataclass(frozen=True, slots=True)
class DateCond:
    """Date comparison of the stored range against the search value's range [lo, hi]."""

    param: str
    prefix: Prefix
    lo: int
    hi: int


@dataclass(frozen=True, slots=True)
class NumberCond:
    """Number/quantity comparison; [lo, hi] is the precision range of the search value."""

    param: str
    prefix: Prefix
    value: float
    lo: float
    hi: float
    system: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class ReferenceCond:
    """Reference to ``target_type/target_id`` (``target_type=None``: any type). With
    ``expand``, a reference to any member of the target's identity group matches too (see
    :class:`IdentityIndex`): one person's records from every MO, and merged records."""

    param: str
    target_type: str | None
    target_id: str
    expand: bool = False


@dataclass(frozen=True, slots=True)
class UriCond:
    """URI match: exact, ``below`` (prefix) or ``above`` (the stored URI is a prefix)."""

    param: str
    value: str
    mode: Literal["exact", "below", "above"] = "exact"


@dataclass(frozen=True, slots=True)
class MissingCond:
    """``:missing=true|false``; ``table`` names the index kind the parameter lives in."""

    param: str
    table: Literal["token", "string", "date", "reference", "quantity", "uri"]
    missing: bool


@dataclass(frozen=True, slots=True)
class IdCond:
    """``_id`` in a set of logical ids (``negate`` for ``:not``)."""

    ids: tuple[str, ...]
    negate: bool = False


@dataclass(frozen=True, slots=True)
class LastUpdatedCond:
    """``_lastUpdated`` comparison (epoch microseconds)."""

    prefix: Prefix
    lo: int
    hi: int


@dataclass(frozen=True, slots=True)
class ChainCond:
    """``param:TargetType.inner``: the reference ``param`` points at a ``target_type`` resource
    that satisfies every condition in ``conds``."""

    param: str
    target_type: str
    conds: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    """OR of conditions (comma-separated values of one parameter)."""

    conds: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class CompartmentCond:
    """The resource is in the compartment of one of the owners (e.g. ``Patient/…``): it references
    an owner through one of ``links`` ((resource type, reference parameter) pairs), or it is an
    owner itself."""

    owner_type: str
    owner_ids: tuple[str, ...]
    links: tuple[tuple[str, str], ...]
    expand: bool = False  # the owners' identity groups (see ReferenceCond)
    negate: bool = False  # outside every owner's compartment (a patient's consent denial)


@dataclass(frozen=True, slots=True)
class AllOf:
    """AND of conditions (a branch of an :class:`AnyOf`)."""

    conds: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """The condition does not hold."""

    cond: Condition


@dataclass(frozen=True, slots=True)
class OwnerCond:
    """The resource was created by (written for) the organisation ``owner``: see
    :attr:`NewVersion.owner`."""

    owner: str


@dataclass(frozen=True, slots=True)
class Via:
    """A relationship found through another resource: current ``resource_type`` resources
    matching ``conds`` whose reference ``param`` points at the owner (e.g. an open Encounter
    at an MO, through its ``subject``)."""

    resource_type: str
    param: str
    conds: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class RelatedCond:
    """The resource lies in the compartment of an owner (through ``links``, or is the owner)
    who has one of the relationships ``via``, with owners' identity groups expanded: "records
    of the patients this MO is treating". Evaluated per row (correlated), so its cost does not
    grow with the number of related owners."""

    owner_type: str
    links: tuple[tuple[str, str], ...]
    via: tuple[Via, ...]


@dataclass(frozen=True, slots=True)
class TypeCond:
    """``_type``: the resource is one of these types (system-level searches)."""

    types: tuple[str, ...]


Condition = (
    TokenCond
    | StringCond
    | DateCond
    | NumberCond
    | ReferenceCond
    | UriCond
    | MissingCond
    | IdCond
    | LastUpdatedCond
    | ChainCond
    | AnyOf
    | CompartmentCond
    | AllOf
    | Not
    | OwnerCond
    | RelatedCond
    | TypeCond
)


@dataclass(frozen=True, slots=True)
class SortKey:
    """Sort by a parameter (``_id``, ``_lastUpdated`` or an indexed one) of a given kind."""

    param: str
    kind: Literal["id", "lastUpdated", "token", "string", "date", "quantity", "uri"]
    descending: bool = False


@dataclass(slots=True)
class Query:
    """A search over one resource type (``resource_type=None`` for a system-level search)."""

    resource_type: str | None
    conds: list[Condition] = field(default_factory=list)
    sort: list[SortKey] = field(default_factory=list)
    count: int = 50
    after: list[object] | None = None  # keyset cursor: sort values then rid of the last row
    total: bool = False


# --- what comes back ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredResource:
    """One version of a resource as stored (``content`` is JSON bytes; None for a deletion)."""

    resource_type: str
    id: str
    version: int
    last_updated: int  # epoch microseconds, UTC
    deleted: bool
    content: bytes | None
    method: str = "PUT"
    rid: int = 0


@dataclass(slots=True)
class Page:
    """A page of search results with the keyset cursor for the next page (None at the end)."""

    items: list[StoredResource]
    next_after: list[object] | None
    total: int | None = None


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """A committed change, in commit order, for consumers (search index, notifications, …)."""

    seq: int
    resource_type: str
    id: str
    version: int
    op: str  # create | update | delete
    created: int


@dataclass(slots=True)
class NewVersion:
    """A version to write: the FHIR layer fills content (with meta) and index rows."""

    resource_type: str
    id: str
    content: bytes | None  # None for a delete
    index: IndexRows
    method: Literal["POST", "PUT", "PATCH", "DELETE"]
    if_version: int | None = None  # optimistic lock: the version the writer saw
    # The organisation the resource is written for (the writing MO); kept from the first
    # version, which is whose record it is.
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class LinkedRecord:
    """One member of an identity group as the record-linkage index holds it.

    ``features`` is the matcher's JSON for a record that takes part in matching (a source
    record); None for the group's own record (the golden one) and for retired members.
    """

    id: str
    group_id: str
    features: bytes | None


@dataclass(frozen=True, slots=True)
class IdentityLogEntry:
    """One entry of the identity journal: a match decision, a merge, an unmerge…"""

    seq: int
    id: str
    group_id: str
    kind: str
    body: bytes  # JSON, written and read by the master patient index
    created: int


class IdentityIndex(Protocol):
    """Identity groups of a resource type, their record-linkage keys and journal.

    A group is the set of records that describe one real-world entity: for the master patient
    index, one person's source records from every MO, any records merged into them, and the
    golden record whose id is the group id. Reference searches with ``expand`` see through
    groups, so re-grouping (a link, a merge, an unmerge) rewrites no resource. The blocking
    keys find candidate members for an incoming record; the journal keeps every decision.
    """

    def group_of(self, rtype: str, id: str) -> str | None:
        """The group ``id`` belongs to, or None if it is in none."""

    def members(self, rtype: str, group_id: str) -> list[LinkedRecord]:
        """Every member of the group (the group's own record included), ordered by id."""

    def records(self, rtype: str, ids: Sequence[str]) -> list[LinkedRecord]:
        """The members with these ids (unknown ids skipped)."""

    def put(
        self,
        rtype: str,
        id: str,
        group_id: str,
        features: bytes | None = None,
        keys: Sequence[str] | None = None,
        *,
        new: bool = False,
    ) -> None:
        """Add ``id`` to ``group_id`` or move it there, storing ``features``; ``keys``
        replaces its blocking keys (None keeps them as they are). ``new`` says the caller
        knows ``id`` is in no group yet (one insert, nothing to replace)."""

    def move_group(self, rtype: str, from_group: str, to_group: str) -> list[str]:
        """Move every member of ``from_group`` into ``to_group``; the ids moved."""

    def remove(self, rtype: str, id: str) -> None:
        """Take ``id`` out of its group and drop its keys."""

    def candidates(self, rtype: str, keys: Sequence[str], limit: int) -> list[LinkedRecord]:
        """Members with features sharing a blocking key with ``keys``, most shared keys
        first (ties by id), at most ``limit``. A key with more than :data:`MAX_KEY_MEMBERS`
        members is left out."""

    def log(self, rtype: str, id: str, group_id: str, kind: str, body: bytes, when: int) -> int:
        """Append to the journal; returns the entry's sequence number."""

    def journal(
        self,
        rtype: str,
        *,
        id: str | None = None,
        group_id: str | None = None,
        kind: str | None = None,
        limit: int = 100,
    ) -> list[IdentityLogEntry]:
        """Journal entries about ``id`` and/or ``group_id`` (and of ``kind``), newest first."""


# A blocking key shared by more records than this tells people apart no better than chance
# (a clinic's phone entered for its patients, a placeholder document number): a lookup leaves
# it out, so it neither turns one match into a scan nor crowds out the selective keys.
MAX_KEY_MEMBERS = 100


class WriteTx(Protocol):
    """One atomic unit of work: every write inside commits together with its outbox rows."""

    def current(
        self, resource_type: str, id: str, *, for_update: bool = True
    ) -> StoredResource | None:
        """The current version (deleted ones included) as seen inside this transaction."""

    def write(self, new: NewVersion, version: int, last_updated: int) -> StoredResource:
        """Store ``new`` as ``version`` (1 for a create); raises VersionConflict if raced."""

    def write_many(
        self, items: Sequence[tuple[NewVersion, int]], last_updated: int
    ) -> list[StoredResource]:
        """Bulk :meth:`write` for versions that are all creates (version 1) — the fast path."""

    def search_ids(self, query: Query) -> list[tuple[str, str]]:
        """(type, id) pairs matching ``query``, seen inside the transaction (conditional ops)."""

    def lock(self, name: str) -> None:
        """Hold ``name`` until the transaction ends; another transaction locking the same name
        waits for this one. Taken before a look-up that decides a create ("find the patient
        with this identifier, else create one"), so two writers never both create."""

    def ids_by_token(
        self,
        resource_type: str,
        param: str,
        tokens: Sequence[tuple[str, str]],
        conds: Sequence[Condition] = (),
    ) -> dict[tuple[str, str], list[str]]:
        """For each ``(system, code)`` of ``tokens``: the ids of current ``resource_type``
        resources whose token parameter ``param`` has it and that match ``conds`` — many
        conditional updates' lookups in one query."""

    @property
    def identity(self) -> IdentityIndex:
        """The identity groups and record-linkage index, inside this transaction."""


class ResourceStore(Protocol):
    """The resource store port (see module docstring)."""

    dialect: str

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""

    def transaction(self) -> AbstractContextManager[WriteTx]:
        """Open a write transaction; it commits (durably) when the block exits normally."""

    def read(self, resource_type: str, id: str) -> StoredResource | None:
        """Current version, or None if never existed (a tombstone has ``deleted=True``)."""

    def read_where(
        self, resource_type: str, id: str, conds: tuple[Condition, ...]
    ) -> StoredResource | None:
        """The current version if it exists, is not deleted and matches ``conds`` (an access
        grant), else None — one query, prepared once per ``conds`` and reused."""

    def vread(self, resource_type: str, id: str, version: int) -> StoredResource | None:
        """A specific version (tombstones included) or None."""

    def read_many(self, refs: Sequence[tuple[str, str]]) -> list[StoredResource]:
        """Current, non-deleted versions of the given (type, id) pairs; missing ones skipped."""

    def history(
        self,
        resource_type: str | None,
        id: str | None,
        *,
        since: int | None,
        count: int,
        before_seq: int | None,
    ) -> tuple[list[StoredResource], int | None]:
        """Versions newest first (instance, type or system level) and the cursor for more."""

    def search(self, query: Query) -> Page:
        """Run a search, filtering and paging in the database."""

    def ids_by_token(
        self,
        resource_type: str,
        param: str,
        tokens: Sequence[tuple[str, str]],
        conds: Sequence[Condition] = (),
    ) -> dict[tuple[str, str], list[str]]:
        """:meth:`WriteTx.ids_by_token` on committed data: exact-token lookups (an order by
        its placer or filler number) with a statement prepared once, not a compiled search."""

    def identity_reader(self) -> AbstractContextManager[IdentityIndex]:
        """The identity index for reading outside a write transaction (one snapshot)."""

    def references_from(
        self, rids: Sequence[int], params: Sequence[tuple[str, str]] | None
    ) -> list[tuple[str, str]]:
        """Targets referenced by resources ``rids`` through (type, param) pairs (None: all)."""

    def referencing(
        self, targets: Sequence[tuple[str, str]], source_type: str, param: str | None, limit: int
    ) -> list[StoredResource]:
        """Current resources of ``source_type`` that reference any target via ``param``."""

    def outbox_read(self, consumer: str, limit: int) -> list[OutboxEvent]:
        """Committed events not yet acknowledged by ``consumer``, in order."""

    def outbox_ack(self, consumer: str, seq: int) -> None:
        """Record that ``consumer`` has durably handled every event up to ``seq``."""

    def outbox_position(self, consumer: str) -> tuple[int, int]:
        """(acknowledged seq, newest seq) for lag metrics."""

    def outbox_behind(self, consumer: str) -> tuple[int, int | None]:
        """(acknowledged seq, commit time in µs of the oldest event ``consumer`` has not
        acknowledged, or None when it has caught up): how far behind it is, in time."""

    def change_marker(self, resource_type: str) -> tuple[int, int]:
        """(newest row of the type, newest change time): differs
        after any create, update or delete of that type, so a cache keyed on it is never
        stale (the consent rules use it)."""

    def iter_current(
        self, resource_type: str | None, batch: int = 1000
    ) -> Iterator[StoredResource]:
        """Every current, non-deleted resource (for re-indexing)."""

    def close(self) -> None:
        """Release connections."""


def iter_search(store: ResourceStore, query: Query) -> Iterator[StoredResource]:
    """Every resource ``query`` matches, page after page (``query.after`` advances)."""
    while True:
        page = store.search(query)
        yield from page.items
        if page.next_after is None:
            return
        query.after = page.next_after
