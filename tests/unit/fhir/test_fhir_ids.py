"""Server-assigned ids: UUID version 7, unique across threads and across forked processes."""

from __future__ import annotations

import os
import threading
import uuid

from hie.fhir.service import new_id


def test_ids_are_uuid7_and_sort_by_time() -> None:
    ids = [new_id() for _ in range(2000)]
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert len(set(ids)) == len(ids)
    # the first 48 bits are milliseconds: never decreasing within one process
    stamps = [u.int >> 80 for u in parsed]
    assert stamps == sorted(stamps)


def test_ids_are_unique_across_threads() -> None:
    out: list[list[str]] = [[] for _ in range(4)]

    def make(mine: list[str]) -> None:
        mine.extend(new_id() for _ in range(5000))

    threads = [threading.Thread(target=make, args=(o,)) for o in out]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for o in out for i in o]
    assert len(set(every)) == len(every) == 20_000


def test_a_forked_child_does_not_repeat_its_parents_random_bytes() -> None:
    new_id()  # the parent holds buffered random bytes now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, written to the parent
        os.close(read)
        os.write(write, "\n".join(new_id() for _ in range(50)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = f.read().split("\n")
    os.waitpid(pid, 0)
    parent = [new_id() for _ in range(50)]
    # the random parts (the last 74 bits) never coincide
    tails = {uuid.UUID(i).int & (2**74 - 1) for i in parent}
    assert len(child) == 50
    assert not tails & {uuid.UUID(i).int & (2**74 - 1) for i in child}
