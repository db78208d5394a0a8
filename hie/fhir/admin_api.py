"""``/admin/messages``: the rejected-message store (:mod:`hie.hub.rejected`) for operators.

What the listeners refused or failed on is listed, shown, downloaded byte for byte, replayed
once its cause is fixed (a sender registered, a code list loaded) or discarded with a reason —
the same as ``hie messages list|show|replay``, for an operator's console rather than a shell.

The API speaks plain JSON (a kept message is not a FHIR resource); errors are
OperationOutcomes with stable ``HIE-xxxx`` codes like everywhere else in the app. Only roles
the policy's operation ``rejected-messages`` names may call it (``admin`` and the hub's
``service``): a kept message can hold a patient's data, and no one else needs it. The
middleware authenticates and audits every call; each call also names what it did in its audit
record (``rejected-search``, ``rejected-read``, ``rejected-raw``, ``rejected-replay``,
``rejected-discard``), and a replay's record names the resources and patients it wrote.

- ``GET /admin/messages?status=&channel=&since=&_count=&before=`` — newest first, without the
  bytes; ``next`` continues before the last id of the page.
- ``GET /admin/messages/{id}`` — what is known about it and its text for reading.
- ``GET /admin/messages/{id}/raw`` — the exact bytes kept, as an attachment.
- ``POST /admin/messages/{id}/$replay`` — an HL7 message through the MLLP intake again
  (outcome ``AA``/``AE``/``AR``), or a DICOM instance through the archive's storage service
  as the MO that sent it (:mod:`hie.pacs.replay`; outcome ``stored``, ``duplicate`` — the
  same bytes were stored meanwhile — or ``refused``, each problem with the C-STORE failure
  status as ``dimse_status``). A replay that fails again is an answer (200), not an HTTP
  error: the message stays open. 409 when it is not open or cannot be replayed (a frame
  that never was a message; an instance kept without file meta, not a whole dataset,
  refused as unreadable, or whose MO is no longer registered).
- ``POST /admin/messages/{id}/$discard`` with ``{"reason": "…"}`` — close it unreplayed; 409
  when it is not open.
"""

from __future__ import annotations

import codecs
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from hie.adapters.hl7_listener import Hl7Listener, Outcome, replay
from hie.adapters.hl7_listener import replayable as can_replay
from hie.adapters.hl7v2 import Hl7Problem, codec_for
from hie.fhir.api import query_items, read_json_body
from hie.fhir.dates import require_range
from hie.fhir.service import FhirService
from hie.hub.audit import note_access
from hie.hub.blobs.port import BlobStore
from hie.hub.errors import InvalidRequest, NotFound, NotSupported
from hie.hub.logging import get_logger
from hie.hub.rejected import RejectedMessage, RejectedStore
from hie.hub.settings import Settings
from hie.pacs import replay as dicom_replay
from hie.pacs.storage import StorageService
from hie.registries.patient_index import MasterPatientIndex

Json = dict[str, Any]
log = get_logger("hie.admin")

PREFIX = "/admin/messages"
OPERATION = "rejected-messages"  # hie/hub/policy.py OPERATIONS: who may use this API
_LIST_PARAMS = frozenset({"status", "channel", "since", "_count", "before"})
# Russian first, with English: these are shown to operators as they are.
STATUS_TEXT = {
    "open": "открыто / open",
    "replayed": "обработано повторно / replayed",
    "discarded": "закрыто без обработки / discarded",
}
OUTCOME_TEXT = {
    # HL7 v2: the acknowledgement code (MSA-1)
    "AA": "принято / accepted",
    "AE": "ошибка при обработке / application error",
    "AR": "отклонено / rejected",
    # DICOM: what the archive did with the instance (hie.pacs.replay.Replayed.outcome)
    "stored": "сохранено / stored",
    "duplicate": "уже было сохранено / already stored (duplicate)",
    "refused": "отклонено / refused",
}
# A download's file name ending, by the channel the bytes came in on.
_SUFFIX = {"mllp": "hl7", "dicom": "dcm", "stow": "dcm", "fhir": "json"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# MLLP framing bytes around a message (start block 0x0B, end block 0x1C 0x0D).
_FRAMING = b"\x0b\x1c\r\n\t "


def iso_utc(value: datetime | None) -> str | None:
    """A stored time as ISO 8601 in UTC with milliseconds and ``Z`` (None stays None)."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def replayable(m: RejectedMessage) -> bool:
    """Whether ``m`` can be run through the intake again now: open, and a whole HL7 message
    or a DICOM instance refused for a cause outside its bytes (whether those carry file meta
    is only known when it is replayed)."""
    return m.status == "open" and (can_replay(m) or dicom_replay.replayable(m))


def message_summary(m: RejectedMessage) -> Json:
    """A kept message's metadata as the API shows it (never its bytes)."""
    return {
        "id": m.id,
        "received": iso_utc(m.received),
        "channel": m.channel,
        "sender": m.sender,
        "peer": m.peer,
        "kind": m.kind,
        "code": m.code,
        "reason": m.reason,
        "control_id": m.control_id,
        "size": m.size,
        "status": m.status,
        "status_text": STATUS_TEXT.get(m.status, m.status),
        "replayable": replayable(m),
        "replayed_at": iso_utc(m.replayed_at),
        "replay_outcome": m.replay_outcome,
        "discarded_at": iso_utc(m.discarded_at),
        "discard_reason": m.discard_reason,
    }


def _declared_codec(raw: bytes) -> str | None:
    """The codec MSH-18 names, when ``raw`` begins with a readable MSH segment.

    Read here rather than with the HL7 reader: that one refuses bytes that are not valid in
    the declared character set, and a kept message is often kept for exactly that reason."""
    data = raw.lstrip(_FRAMING)
    end = min((i for i in (data.find(b"\r"), data.find(b"\n")) if i >= 0), default=len(data))
    line = data[:end].decode("latin-1")  # MSH is ASCII by rule; latin-1 maps every byte
    if not line.startswith("MSH") or len(line) < 8:
        return None
    sep, repetition = line[3], line[5]  # MSH-1, and MSH-2's second character
    fields = line.split(sep)  # MSH-n is fields[n - 1]: MSH-1 is the separator itself
    charset = fields[17].split(repetition, 1)[0].strip() if len(fields) > 17 else ""
    try:
        return codec_for(charset)
    except Hl7Problem:  # a character set the hub does not read: guess as for none
        return None


def readable(raw: bytes) -> tuple[str, str]:
    """A kept message as text to read, and the encoding it was read with.

    MSH-18's character set when declared; else UTF-8, and failing that Windows-1251 (the
    region's legacy systems send it without saying so). Segment terminators (CR, HL7 v2.5.1
    §2.5.2) become new lines; other control characters are shown as ``\\xNN`` so that nothing
    the sender sent is hidden. The exact bytes are at ``…/raw``."""
    declared = _declared_codec(raw)
    candidates = [c for c in (declared, "utf-8", "cp1251") if c is not None]
    for codec in dict.fromkeys(candidates):
        try:
            text = raw.decode(codec)
        except UnicodeDecodeError:
            continue
        break
    else:  # cp1251 leaves only 0x98 undefined: replace it rather than show nothing
        codec = "cp1251"
        text = raw.decode(codec, errors="replace")
    name = codecs.lookup(codec).name
    encoding = {"cp1251": "windows-1251"}.get(name, name)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    shown = "".join(c if c in "\n\t" or c.isprintable() else _escaped(c) for c in text)
    return shown, encoding


def _escaped(c: str) -> str:
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def _ident(value: str) -> int:
    """A message id from the path; anything but a number names no message."""
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise NotFound(f"сообщение {value!r} не найдено / no kept message {value!r}")
    return int(value)


def _json(body: Json, status: int = 200) -> Response:
    # no-store: a kept message may hold a patient's data; no cache should keep a copy
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


class Replayer:
    """Runs kept HL7 messages through an MLLP intake of the app's own services again, and
    kept DICOM instances through a storage service over them.

    Each is built on the first replay that needs it (most app processes never replay).
    Replays run one at a time: two operators pressing replay on the same message would both
    apply it — harmless, the intake is idempotent by MSH-10 and the archive by SOP Instance
    UID, but its outcome would be recorded twice."""

    def __init__(
        self,
        svc: FhirService,
        mpi: MasterPatientIndex | None,
        rejected: Callable[[], RejectedStore],
        blobs: Callable[[], BlobStore],
    ) -> None:
        self.svc = svc
        self.mpi = mpi
        self.rejected = rejected
        self.blobs = blobs
        self._lock = threading.Lock()
        self._handler: Hl7Listener | None = None
        self._storage: StorageService | None = None

    def run(self, ident: int) -> Outcome | dicom_replay.Replayed:
        """Replay message ``ident``: an instance by :func:`hie.pacs.replay.replay_instance`,
        anything else by :func:`hie.adapters.hl7_listener.replay` (which refuses what is not
        an HL7 message)."""
        with self._lock:
            kept = self.rejected().get(ident)
            if kept is None:
                raise NotFound(f"сообщение {ident} не найдено / no kept message {ident}")
            if kept.channel == dicom_replay.CHANNEL:
                return self._instance(kept)
            if self._handler is None:
                if self.mpi is None:
                    raise NotSupported(
                        "повторная обработка HL7 требует индекса пациентов (HIE_MPI_ENABLED) / "
                        "replaying HL7 needs the master patient index (HIE_MPI_ENABLED)"
                    )
                # no worker threads are started: replay calls the intake directly
                self._handler = Hl7Listener(self.svc, self.mpi, self.rejected(), workers=1)
            # the operator has just fixed the cause, often by registering the sender: a
            # cached "unknown sender" answer must not outlive that fix
            self._handler.senders.invalidate()
            return replay(self._handler, ident)

    def _instance(self, kept: RejectedMessage) -> dicom_replay.Replayed:
        if self._storage is None:
            self._storage = StorageService(self.svc, self.blobs(), self.rejected())
        out = dicom_replay.replay_instance(self._storage, kept)
        if out.stored is not None and not out.stored.duplicate:
            # as when an association ends: the study's ImagingStudy counts are caught up
            self._storage.refresh_summaries()
        return out

    def close(self) -> None:
        """Stop the storage service's file-writer threads (when one was built)."""
        with self._lock:
            if self._storage is not None:
                self._storage.close()
                self._storage = None


def _problem(p: Hl7Problem, severity: str) -> Json:
    out: Json = {"severity": severity, "code": p.code, "message": p.message}
    if p.segment:
        out["location"] = p.location
    return out


def _replay_answer(out: Outcome | dicom_replay.Replayed) -> Json:
    """``outcome``, ``outcome_text`` and ``problems`` of a replay, for either channel."""
    if isinstance(out, dicom_replay.Replayed):
        problems = []
        if out.refused is not None:
            err = out.refused
            problems.append(
                {
                    "severity": "error",
                    "code": err.code,
                    "message": err.message,
                    "dimse_status": f"{out.status:04X}",
                }
            )
        return {
            "outcome": out.outcome,
            "outcome_text": OUTCOME_TEXT[out.outcome],
            "problems": problems,
        }
    return {
        "outcome": out.code,
        "outcome_text": OUTCOME_TEXT[out.code],
        "problems": [_problem(p, "error") for p in out.errors]
        + [_problem(p, "warning") for p in out.warnings],
    }


def admin_router(
    svc: FhirService,
    mpi: MasterPatientIndex | None,
    rejected: Callable[[], RejectedStore],
    settings: Settings,
    blobs: Callable[[], BlobStore],
) -> APIRouter:
    """The routes under ``/admin/messages`` (see the module docstring). ``rejected`` gives the
    hub's store (opened on first use); ``svc`` and ``mpi`` are the app's, for replays;
    ``blobs`` the hub's blob store, for DICOM replays."""
    replayer = Replayer(svc, mpi, rejected, blobs)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(replayer.close)

    router = APIRouter(prefix=PREFIX, tags=["admin: rejected messages"], lifespan=lifespan)

    def base(request: Request) -> str:
        return (settings.base_url.rstrip("/") or str(request.base_url).rstrip("/")) + PREFIX

    def kept(ident: int) -> RejectedMessage:
        msg = rejected().get(ident)
        if msg is None or msg.raw is None:
            raise NotFound(f"сообщение {ident} не найдено / no kept message {ident}")
        return msg

    def search(items: list[tuple[str, str]], url: str) -> Json:
        svc.operation(OPERATION)
        status = channel = None
        since: datetime | None = None
        before: int | None = None
        count = settings.page_size
        for key, value in items:
            if key not in _LIST_PARAMS:
                raise InvalidRequest(
                    f"параметр {key!r} не поддерживается / parameter {key!r} is not supported "
                    f"(use {', '.join(sorted(_LIST_PARAMS))})"
                )
            if not value:
                continue  # an empty filter from a form: not filtered
            if key == "status":
                status = value
            elif key == "channel":
                channel = value
            elif key == "since":
                since = _EPOCH + timedelta(microseconds=require_range(value, "since")[0])
            elif key == "_count":
                if not value.isascii() or not value.isdigit() or int(value) < 1:
                    raise InvalidRequest("_count: нужно целое > 0 / must be a positive integer")
                count = min(int(value), settings.max_page_size)
            elif key == "before":
                if not value.isascii() or not value.isdigit() or len(value) > 18:
                    raise InvalidRequest("before: нужен id сообщения / must be a message id")
                before = int(value)
        # one more than asked for says whether there is a next page
        found = rejected().list(
            status=status, channel=channel, since=since, limit=count + 1, before_id=before
        )
        note_access("rejected-search", action="E")
        page = found[:count]
        nxt = None
        if len(found) > count:
            keep = [(k, v) for k, v in items if k != "before"]
            nxt = f"{url}?{urlencode([*keep, ('before', str(page[-1].id))])}"
        return {"items": [message_summary(m) for m in page], "count": len(page), "next": nxt}

    def show(id: str, url: str) -> Json:
        svc.operation(OPERATION)
        ident = _ident(id)
        msg = kept(ident)
        note_access("rejected-read", action="R")
        assert msg.raw is not None
        text, encoding = readable(msg.raw)
        return {
            **message_summary(msg),
            "kept_bytes": len(msg.raw),
            "truncated": len(msg.raw) < msg.size,  # a too-large frame: only its head is kept
            "encoding": encoding,
            "text": text,
            "raw": f"{url}/{ident}/raw",
        }

    def download(id: str) -> tuple[bytes, str]:
        svc.operation(OPERATION)
        ident = _ident(id)
        msg = kept(ident)
        note_access("rejected-raw", action="R")
        assert msg.raw is not None
        return msg.raw, f"rejected-{ident}.{_SUFFIX.get(msg.channel, 'bin')}"

    def run_replay(id: str) -> Json:
        svc.operation(OPERATION)
        ident = _ident(id)
        # named first: the intake's writes add their resources and patients to this record,
        # a create (it files the message's records), so as durable as they are
        note_access("rejected-replay", action="C")
        answer = _replay_answer(replayer.run(ident))
        log.info(
            "admin.rejected.replayed",
            id=ident,
            outcome=answer["outcome"],
            errors=sum(p["severity"] == "error" for p in answer["problems"]),
        )
        return {"id": ident, **answer, "message": message_summary(kept(ident))}

    def run_discard(ident: int, reason: str) -> Json:
        svc.operation(OPERATION)
        note_access("rejected-discard", action="U")
        rejected().discard(ident, reason)
        log.info("admin.rejected.discarded", id=ident)
        return message_summary(kept(ident))

    @router.get("", summary="Rejected messages, newest first / Отклонённые сообщения")
    async def list_messages(request: Request) -> Response:
        return _json(await run_in_threadpool(search, query_items(request), base(request)))

    @router.get("/{id}", summary="One rejected message, its text for reading")
    async def show_message(id: str, request: Request) -> Response:
        return _json(await run_in_threadpool(show, id, base(request)))

    @router.get("/{id}/raw", summary="The exact bytes of a rejected message")
    async def raw_message(id: str) -> Response:
        raw, name = await run_in_threadpool(download, id)
        return Response(
            raw,
            media_type="application/octet-stream",
            headers={
                "Content-Disposition": f'attachment; filename="{name}"',
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @router.post(
        "/{id}/$replay",
        summary="Run a rejected HL7 message or DICOM instance through the intake again",
    )
    async def replay_message(id: str) -> Response:
        return _json(await run_in_threadpool(run_replay, id))

    @router.post("/{id}/$discard", summary="Close a rejected message without replaying it")
    async def discard_message(id: str, request: Request) -> Response:
        svc.operation(OPERATION)  # before reading a body from someone who may not send one
        ident = _ident(id)
        body = await read_json_body(request, settings.max_body_bytes, what='{"reason": "…"}')
        reason = body.get("reason") if isinstance(body, dict) else None
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidRequest(
                'нужна причина: {"reason": "…"} / a reason is required: {"reason": "…"}'
            )
        return _json(await run_in_threadpool(run_discard, ident, reason.strip()))

    return router
