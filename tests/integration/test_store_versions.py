"""On SQLite a store notices another process's commit (``PRAGMA data_version``), so the
caches keyed on change markers — the consent rules, the grants built from them — never serve
an answer from before that commit; and other processes connecting and disconnecting never
disturb it (a mapped WAL index once made the hub die of SIGBUS)."""

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


def _data_version(store: SqlResourceStore) -> int:
    """``PRAGMA data_version`` on the store's (single, idle) lean read connection."""
    assert store._lean is not None
    return int(store._lean.rows("PRAGMA data_version", ())[0][0])


def test_a_commit_by_another_process_moves_the_marker_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hie.db'}"
    store = open_resource_store(url)
    store.migrate()
    assert isinstance(store, SqlResourceStore)
    try:
        before = store.change_marker("Consent")
        assert store.change_marker("Consent") == before  # remembered: nothing changed
        version = _data_version(store)
        _write_elsewhere(url, "c1")
        assert _data_version(store) != version
        created = store.change_marker("Consent")
        assert created[0] > before[0]
        _write_elsewhere(url, "c1")  # an update: same newest row, newer time
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
        assert _data_version(store) != version
        assert store.change_marker("Consent") == updated  # other types leave Consent's alone
    finally:
        store.close()


_READ_ONLY_VISITS = """
import sqlite3, sys, time
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    c = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
    c.execute("SELECT count(*) FROM resources").fetchone()
    c.close()
"""


def test_other_processes_connecting_do_not_disturb_a_busy_store(tmp_path: Path) -> None:
    # a backup, `sqlite3` in a shell or the hub's own other process open and close
    # connections all the time; a store that writes and asks for its markers meanwhile
    # must neither die nor miss a change
    path = tmp_path / "hie.db"
    store = open_resource_store(f"sqlite:///{path}")
    store.migrate()
    visitor = subprocess.Popen([sys.executable, "-c", _READ_ONLY_VISITS, str(path), "4"])
    try:
        seen = []
        n = 0
        while visitor.poll() is None:
            with store.transaction() as tx:
                tx.write(NewVersion("Consent", f"c{n}", b"{}", IndexRows(), "POST"), 1, now_us())
            n += 1
            for _ in range(20):
                marker = store.change_marker("Consent")
            seen.append(marker)
        assert visitor.returncode == 0
        assert n > 10 and len(set(seen)) == len(seen)  # every commit moved the marker
    finally:
        visitor.kill()
        store.close()
