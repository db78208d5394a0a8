"""On SQLite a store notices another process's commit from the WAL index's header (the
``-shm`` file, mapped read-only), so the caches keyed on change markers — the consent rules,
the grants built from them — never serve an answer from before that commit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hie.hub.store import open_resource_store
from hie.hub.store.port import IndexRows, NewVersion
from hie.hub.store.sql import SqlResourceStore, now_us

_WRITE_CONSENT = """
import sys
from hie.hub.store import open_resource_store
from hie.hub.store.port import IndexRows, NewVersion
from hie.hub.store.sql import now_us
store = open_resource_store(sys.argv[1])
with store.transaction() as tx:
    cur = tx.current("Consent", sys.argv[2])
    body = b'{"resourceType":"Consent","id":"%s"}' % sys.argv[2].encode()
    tx.write(NewVersion("Consent", sys.argv[2], body, IndexRows(), "PUT"),
             (cur.version + 1) if cur else 1, now_us())
store.close()
"""


def _write_elsewhere(url: str, rid: str) -> None:
    subprocess.run([sys.executable, "-c", _WRITE_CONSENT, url, rid], check=True, timeout=120)


def test_a_commit_by_another_process_moves_the_marker_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hie.db'}"
    store = open_resource_store(url)
    store.migrate()
    assert isinstance(store, SqlResourceStore)
    try:
        before = store.change_marker("Consent")
        assert store._wal_index is not None  # the header is read, not PRAGMA data_version
        assert store.change_marker("Consent") == before  # remembered: nothing changed
        version = store._data_version()
        _write_elsewhere(url, "c1")
        assert store._data_version() != version
        created = store.change_marker("Consent")
        assert created[0] == before[0] + 1
        _write_elsewhere(url, "c1")  # an update: same count, newer time
        updated = store.change_marker("Consent")
        assert updated[0] == created[0] and updated[1] > created[1]
        with store.transaction() as tx:  # our own commit moves it too
            tx.write(
                NewVersion(
                    "Patient", "p1", b'{"resourceType":"Patient","id":"p1"}', IndexRows(), "PUT"
                ),
                1,
                now_us(),
            )
        assert store._data_version() != version
        assert store.change_marker("Consent") == updated  # other types leave Consent's alone
    finally:
        store.close()
