"""The single entry point: ``hie …`` (Typer).

Every command builds its settings from ``HIE_*`` variables; nothing is read at import time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from hie.hub import logging as hlog
from hie.hub.settings import Settings, load_settings

if TYPE_CHECKING:
    from hie.hub.runtime import Hub

app = typer.Typer(
    help="Regional health information exchange hub (FHIR R4, HL7 v2, DICOM).",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
search_app = typer.Typer(help="Full-text search index.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(search_app, name="search")


def _settings() -> Settings:
    try:
        settings = load_settings()
    except ValueError as exc:
        typer.echo(f"configuration error: {exc}", err=True)
        raise typer.Exit(2) from None
    hlog.configure(settings.log_level, settings.log_format)
    return settings


@app.command()
def serve(
    migrate: Annotated[bool, typer.Option(help="Apply database migrations first.")] = True,
) -> None:
    """Run the HTTP API, the MLLP listener (HL7 v2), the DICOM listener and the outbox worker.

    With ``HIE_HTTP_WORKERS`` > 1 the HTTP API runs in that many processes (validation is
    CPU-bound and Python has one core per process); this process keeps the outbox worker.
    """
    import os
    import signal

    import uvicorn

    from hie.adapters.dicom import start_dicom
    from hie.adapters.hl7_listener import start_mllp
    from hie.fhir.app import background_work, create_app
    from hie.hub.runtime import open_hub, settle_process

    settings = _settings()
    hub = open_hub(settings)
    if migrate:
        hub.store.migrate()
    workers = settings.effective_http_workers
    base = settings.public_base
    typer.echo(
        f"HIE hub on {base} ({workers} HTTP worker process(es))\n"
        f"  FHIR      {base}/fhir (metadata: {base}/fhir/metadata)\n"
        f"  API docs  {base}/docs\n  health    {base}/healthz\n  metrics   {base}/metrics\n"
        f"  data      {settings.data_dir.resolve()}",
        err=True,
    )
    options: dict[str, object] = {
        "host": settings.http_host,
        "port": settings.http_port,
        "log_config": None,
        "access_log": False,
        "loop": "uvloop",
        "http": "httptools",
        "timeout_graceful_shutdown": 10,
    }
    mllp = start_mllp(hub)
    if mllp is not None:
        typer.echo(f"  MLLP      {settings.mllp_host}:{mllp.port} (HL7 v2)", err=True)
    dicom = start_dicom(hub)
    if dicom is not None:
        typer.echo(
            f"  DICOM     {settings.dicom_host}:{dicom.port} (AE title {dicom.ae_title})", err=True
        )
    # uvicorn handles SIGTERM, shuts down, then raises the signal again: with the default
    # action that killed this process before the listeners and the hub below were stopped
    signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        if settings.http_port == 0:
            typer.echo("HIE_HTTP_PORT=0: HTTP listener disabled", err=True)
            _run_without_http(hub)
            return
        if workers == 1:
            one = create_app(settings, hub, index_gate=True)
            settle_process()
            uvicorn.run(one, **options)  # type: ignore[arg-type]
            return
        if settings.worker:
            background_work(hub)
            hub.start_worker()
        os.environ["HIE_WORKER"] = "false"  # the worker processes must not start their own
        # nor chain the audit records their requests write ahead: this process does
        os.environ["HIE_AUDIT_CHAIN"] = "false"
        hub.audit.keep_chained()
        settle_process()  # this process keeps the listeners and the outbox worker
        uvicorn.run(
            "hie.fhir.app:app_from_env",
            factory=True,
            workers=workers,
            **options,  # type: ignore[arg-type]
        )
    finally:
        if dicom is not None:
            dicom.stop()
        if mllp is not None:
            mllp.stop()
        hub.close()


def _exit_quietly(_signum: int, _frame: object) -> None:
    """SIGTERM once uvicorn has shut down: leave through ``serve``'s cleanup, exit status 0."""
    raise SystemExit(0)


def _run_without_http(hub: Hub) -> None:
    """The outbox worker (and the listeners already started) until SIGTERM or Ctrl-C."""
    import signal
    import threading

    from hie.fhir.app import background_work
    from hie.hub.runtime import settle_process

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if hub.settings.worker:
        background_work(hub)
        hub.start_worker()
    settle_process()
    stop.wait()


@app.command()
def worker(
    once: Annotated[bool, typer.Option(help="Drain what is pending, then exit.")] = False,
) -> None:
    """Run only the outbox worker (scale-out deployments run several hubs and one worker set)."""
    import signal
    import threading

    from hie.fhir.app import background_work
    from hie.hub.runtime import open_hub

    settings = _settings()
    hub = open_hub(settings)
    background_work(hub)
    if once:
        hub.worker.drain(timeout=3600)
        hub.close()
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    hub.start_worker()
    typer.echo("outbox worker running; Ctrl-C to stop", err=True)
    stop.wait()
    hub.close()


@db_app.command("migrate")
def db_migrate() -> None:
    """Create or upgrade the database schema (Alembic)."""
    from hie.hub.store import open_resource_store

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_resource_store(settings.database_url)
    store.migrate()
    store.close()
    typer.echo(f"database at the newest schema: {settings.redacted()['database_url']}", err=True)


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings as JSON, secrets redacted."""
    settings = _settings()
    json.dump(settings.redacted(), sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


@app.command()
def demo(
    patients: Annotated[int, typer.Option(help="How many synthetic patients.")] = 50,
    per_patient: Annotated[int, typer.Option(help="Resources in each patient's record.")] = 40,
    documents_per_patient: Annotated[
        int, typer.Option(help="Each patient gets 2 to this many documents (0: none).")
    ] = 4,
    seed: Annotated[int, typer.Option(help="Generator seed (same seed, same city).")] = 2026,
    if_empty: Annotated[bool, typer.Option(help="Do nothing if the hub has patients.")] = False,
) -> None:
    """Load a synthetic city: MOs with endpoints, practitioners, patients with their records
    and clinical documents (bodies in the blob store, indexed by the outbox worker)."""
    from rich.progress import Progress

    from hie.demo.load import load_demo
    from hie.fhir.service import FhirService
    from hie.hub.runtime import open_hub
    from hie.hub.store.port import Query

    settings = _settings()
    hub = open_hub(settings)
    hub.store.migrate()
    if if_empty and hub.store.search(Query("Patient", count=1)).items:
        typer.echo("demo data already present; skipping", err=True)
        hub.close()
        return
    # document bodies go to the blob store, as a clinic's ITI-65 publish does
    svc = FhirService(hub.store, settings, blobs=lambda: hub.blobs)
    from hie.lab_exchange.alerts import load_builtin_limits
    from hie.registries.patient_index import attach_mpi
    from hie.registries.terminology import load_builtin

    attach_mpi(svc)  # demo patients get golden records like any MO's

    load_builtin(svc)  # the reference data the demo's codes come from
    load_builtin_limits(svc)  # critical limits of lab tests (alerts)
    with Progress() as progress:
        task = progress.add_task("demo patients", total=patients)
        sent = load_demo(
            lambda b: svc.transaction(b, settings.public_base + "/fhir"),
            patients=patients,
            resources_per_patient=per_patient,
            documents_per_patient=documents_per_patient,
            seed=seed,
            progress=lambda n: progress.advance(task, n),
        )
    hub.close()
    typer.echo(f"loaded {sent} demo resources", err=True)


@app.command()
def token(
    role: Annotated[
        list[str],
        typer.Option(help="Role: mis, clinician, radiologist, patient, official, admin, service."),
    ],
    org: Annotated[str | None, typer.Option(help="Organization id of the caller's MO.")] = None,
    practitioner: Annotated[str | None, typer.Option(help="Practitioner id.")] = None,
    patient: Annotated[str | None, typer.Option(help="Patient id (role patient).")] = None,
    person: Annotated[
        str | None,
        typer.Option(help="The caller's own Patient id when acting as a proxy for --patient."),
    ] = None,
    scope: Annotated[
        str | None, typer.Option(help="SMART scopes (default: what the role uses).")
    ] = None,
    subject: Annotated[str | None, typer.Option(help="The token's sub.")] = None,
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 3600,
) -> None:
    """Print a development bearer token signed with the local key in the data dir
    (refused when HIE_ENV=production: tokens come from the OIDC provider there)."""
    from hie.hub.auth import DevTokenIssuer, DevTokensRefused

    settings = _settings()
    try:
        issuer = DevTokenIssuer(settings)
        typer.echo(
            issuer.issue(
                role,
                org=org,
                practitioner=practitioner,
                patient=patient,
                person=person,
                scope=scope,
                subject=subject,
                ttl=ttl,
            )
        )
    except DevTokensRefused as exc:
        typer.echo(f"refused: {exc.message}", err=True)
        raise typer.Exit(3) from None
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


audit_app = typer.Typer(help="The audit trail.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify() -> None:
    """Walk the audit trail's hash chain; exit 1 at the first record changed, removed or
    moved (its position is printed)."""
    from hie.hub.audit import open_audit_log

    settings = _settings()
    trail = open_audit_log(settings.database_url, settings.audit_url)
    trail.migrate()
    result = trail.verify()
    trail.close()
    if result.ok:
        typer.echo(f"audit trail intact: {result.checked} records")
        return
    typer.echo(
        f"audit trail BROKEN at record {result.first_bad}: {result.problem} "
        f"({result.checked} records before it are intact)",
        err=True,
    )
    raise typer.Exit(1)


@search_app.command("reindex")
def search_reindex() -> None:
    """Rebuild the full-text index from the resource store (run while `hie serve` is stopped)."""
    import orjson
    from rich.progress import Progress

    from hie.fhir.indexing import FULLTEXT_TYPES, SearchIndexer
    from hie.hub.runtime import open_hub

    settings = _settings()
    hub = open_hub(settings)
    idx = hub.search_index
    # documents with the text of their bodies, as the outbox worker indexes them
    indexer = SearchIndexer(
        hub.store,
        lambda: idx,
        blobs=lambda: hub.blobs,
        max_body_bytes=settings.max_document_bytes,
    )
    idx.clear()
    with Progress() as progress:
        for rtype in sorted(FULLTEXT_TYPES):
            task = progress.add_task(rtype, total=None)
            batch = []
            for stored in hub.store.iter_current(rtype):
                batch.append(indexer.document(orjson.loads(stored.content or b"{}")))
                if len(batch) >= 500:
                    idx.upsert(batch)
                    progress.advance(task, len(batch))
                    batch = []
            if batch:
                idx.upsert(batch)
                progress.advance(task, len(batch))
            idx.commit()
    _, newest = hub.store.outbox_position(SearchIndexer.name)
    hub.store.outbox_ack(SearchIndexer.name, newest)
    hub.close()


# --- registry: the facility and practitioner registries (ФРМО / ФРМР style) -----------------

registry_app = typer.Typer(
    help="Facility and practitioner registries (organisations, endpoints, practitioners).",
    no_args_is_help=True,
)
app.add_typer(registry_app, name="registry")


@registry_app.command("load")
def registry_load(
    file: Annotated[
        str, typer.Argument(help="CSV, JSON (Bundle or array of resources) or NDJSON file.")
    ],
    kind: Annotated[
        str,
        typer.Option(
            help="organizations | locations | practitioners | roles | endpoints | auto "
            "(auto: from the CSV columns; JSON may mix types)."
        ),
    ] = "auto",
    skip_bad: Annotated[
        bool, typer.Option(help="Load the good rows and report the bad ones as skipped.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Validate and count what would change; write nothing.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON on stdout.")
    ] = False,
) -> None:
    """Validate a registry file and load it (all or nothing, unless --skip-bad).

    Every bad row is reported as FILE:LINE: reason. Loading is idempotent: resources are PUT
    by id and unchanged ones are left alone. Exit code 1 when nothing was loaded because of
    bad rows or an unusable file.
    """
    from typing import cast

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

    from hie.fhir.service import FhirService
    from hie.hub.runtime import open_hub
    from hie.registries.loader import KIND_TYPES, KindArg, load_file

    if kind not in (*KIND_TYPES, "auto"):
        typer.echo(f"--kind must be one of {', '.join(KIND_TYPES)}, auto", err=True)
        raise typer.Exit(2)
    settings = _settings()
    hub = open_hub(settings)
    try:
        hub.store.migrate()
        svc = FhirService(hub.store, settings)
        err = Console(stderr=True)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=err, transient=True) as progress:
            tasks: dict[str, TaskID] = {}

            def advance(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = progress.add_task(phase, total=total)
                progress.update(tasks[phase], completed=done, total=total)

            report = load_file(svc, file, cast(KindArg, kind), skip_bad, dry_run, progress=advance)
    finally:
        hub.close()
    for p in report.problems:
        label = "skipped" if report.skipped else "bad"
        typer.echo(f"{file}:{p.line}: {label}: {p.reason}", err=True)
    if as_json:
        json.dump(report.as_json(), sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        typer.echo(report.summary())
    raise typer.Exit(report.exit_code)


# --- terminology: reference data (НСИ) ------------------------------------------------------

terminology_app = typer.Typer(
    help="Reference data (НСИ): code systems, value sets and concept maps.",
    no_args_is_help=True,
)
app.add_typer(terminology_app, name="terminology")


@terminology_app.command("load")
def terminology_load(
    paths: Annotated[
        list[str] | None,
        typer.Argument(help="FHIR JSON files (a Bundle or one resource) and CSV files."),
    ] = None,
    builtin: Annotated[
        bool, typer.Option("--builtin", help="Load the reference data the hub ships.")
    ] = False,
    system: Annotated[str | None, typer.Option(help="CSV: the code system's URL.")] = None,
    version: Annotated[str | None, typer.Option(help="CSV: the code system's version.")] = None,
    name: Annotated[str | None, typer.Option(help="CSV: the code system's name.")] = None,
    title: Annotated[str | None, typer.Option(help="CSV: the code system's title.")] = None,
) -> None:
    """Validate and load dictionaries: FHIR JSON (CodeSystem, ValueSet, ConceptMap) and CSV
    with the columns code,display[,parent][,designation_ru] (one code system per CSV file).

    Every problem is reported as FILE:LINE: reason and nothing is loaded unless every file is
    good. Loading is idempotent: a resource with an id is PUT by id, one without goes to the
    stored resource with the same url and version, and unchanged ones are left alone.
    """
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

    from hie.fhir.service import FhirService
    from hie.hub.runtime import open_hub
    from hie.lab_exchange.alerts import load_builtin_limits
    from hie.registries.terminology import LoadError, LoadReport, load_builtin, load_files

    files = [Path(p) for p in paths or []]
    if not files and not builtin:
        typer.echo("name files to load, or --builtin", err=True)
        raise typer.Exit(2)
    if sum(f.suffix.lower() == ".csv" for f in files) > 1:
        typer.echo("load one CSV file at a time (--system names its code system)", err=True)
        raise typer.Exit(2)
    settings = _settings()
    hub = open_hub(settings)
    reports: list[LoadReport] = []
    try:
        hub.store.migrate()
        svc = FhirService(hub.store, settings)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            tasks: dict[str, TaskID] = {}

            def advance(stage: str, done: int, total: int | None) -> None:
                if stage not in tasks:
                    tasks[stage] = progress.add_task(stage, total=total)
                progress.update(tasks[stage], completed=done, total=total)

            if builtin:
                reports.append(load_builtin(svc, advance))
                limits = load_builtin_limits(svc)
                typer.echo(
                    f"critical limits: {len(limits.created)} created, {len(limits.updated)} "
                    f"updated, {len(limits.unchanged)} unchanged, {len(limits.kept)} kept as "
                    "operators changed them",
                    err=True,
                )
            if files:
                reports.append(
                    load_files(
                        svc,
                        files,
                        csv_system=system,
                        csv_name=name,
                        csv_version=version,
                        csv_title=title,
                        progress=advance,
                    )
                )
    except LoadError as exc:
        for problem in exc.problems:
            typer.echo(str(problem), err=True)
        typer.echo(f"{len(exc.problems)} problem(s); nothing loaded", err=True)
        raise typer.Exit(1) from None
    finally:
        hub.close()
    created = sum(len(r.created) for r in reports)
    updated = sum(len(r.updated) for r in reports)
    unchanged = sum(len(r.unchanged) for r in reports)
    typer.echo(f"terminology: {created} created, {updated} updated, {unchanged} unchanged")


# --- messages: the rejected-message store -----------------------------------------------------

messages_app = typer.Typer(
    help="Messages the listeners rejected or failed on, kept with their raw bytes for replay.",
    no_args_is_help=True,
)
app.add_typer(messages_app, name="messages")


def _shown_time(value: object) -> str:
    """A stored UTC time as the hub displays times: Europe/Moscow, with its offset."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    if not isinstance(value, datetime):
        return "-"
    return value.astimezone(ZoneInfo("Europe/Moscow")).isoformat(sep=" ", timespec="seconds")


def _readable(raw: bytes) -> tuple[str, str]:
    """A kept message as text for a terminal, and the encoding it was read with: segment
    separators (CR, HL7 v2.5.1 §2.5.2) become new lines; other control bytes are shown as
    ``\\xNN`` so nothing the sender sent is hidden or moves the cursor."""
    try:
        text, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        # the region's legacy systems send Windows-1251 (MSH-18 "CP1251" and the like)
        text, encoding = raw.decode("cp1251", errors="replace"), "windows-1251"
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    shown = "".join(c if c in "\n\t" or c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return shown, encoding


@messages_app.command("list")
def messages_list(
    status: Annotated[
        str | None, typer.Option(help="open, replayed or discarded (default: all).")
    ] = None,
    channel: Annotated[str | None, typer.Option(help="mllp, dicom, stow, fhir, …")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
) -> None:
    """List kept messages, newest first.

    One line each: id, received, channel, sender, kind, code, size, status and reason,
    columns separated by at least two spaces.
    """
    from hie.hub.errors import InvalidRequest
    from hie.hub.rejected import open_rejected_store

    settings = _settings()
    store = open_rejected_store(settings.database_url)
    try:
        store.migrate()
        rows = store.list(status=status, channel=channel, limit=limit)
    except InvalidRequest as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from None
    finally:
        store.close()
    if not rows:
        typer.echo("no kept messages", err=True)
        return
    table = [("ID", "RECEIVED", "CHANNEL", "SENDER", "KIND", "CODE", "SIZE", "STATUS", "REASON")]
    for m in rows:
        table.append(
            (
                str(m.id),
                _shown_time(m.received),
                m.channel,
                m.sender or "-",
                m.kind,
                m.code or "-",
                str(m.size),
                m.status,
                " ".join(m.reason.split()) or "-",  # one line per message
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    for r in table:
        typer.echo("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]))


@messages_app.command("show")
def messages_show(
    ident: Annotated[int, typer.Argument(metavar="ID", help="The message's id (messages list).")],
    raw: Annotated[
        bool, typer.Option("--raw", help="Write the message's exact bytes to stdout, nothing else.")
    ] = False,
) -> None:
    """Show one kept message and what is known about it.

    The message is printed with one segment per line; with --raw only its bytes, exactly as
    received, are written.
    """
    from hie.hub.rejected import open_rejected_store

    settings = _settings()
    store = open_rejected_store(settings.database_url)
    try:
        store.migrate()
        msg = store.get(ident)
    finally:
        store.close()
    if msg is None or msg.raw is None:
        typer.echo(f"no kept message {ident}", err=True)
        raise typer.Exit(1)
    if raw:
        out = typer.get_binary_stream("stdout")
        out.write(msg.raw)
        out.flush()
        return
    fields = [
        ("id", str(msg.id)),
        ("received", _shown_time(msg.received)),
        ("channel", msg.channel),
        ("sender", msg.sender or "-"),
        ("peer", msg.peer or "-"),
        ("kind", msg.kind),
        ("code", msg.code or "-"),
        ("reason", msg.reason or "-"),
        ("control id", msg.control_id or "-"),
        ("size", f"{msg.size} bytes"),
        ("status", msg.status),
    ]
    if msg.replayed_at is not None:
        fields += [("replayed", _shown_time(msg.replayed_at))]
        fields += [("outcome", msg.replay_outcome or "-")]
    if msg.discarded_at is not None:
        fields += [("discarded", _shown_time(msg.discarded_at))]
        fields += [("why", msg.discard_reason or "-")]
    for name, value in fields:
        typer.echo(f"{name + ':':<12}{value}")
    text, encoding = _readable(msg.raw)
    kept = f"{len(msg.raw)} bytes" + (f" of {msg.size}" if len(msg.raw) != msg.size else "")
    typer.echo(f"\n--- message ({kept}, shown as {encoding}) ---")
    typer.echo(text.rstrip("\n"))


@messages_app.command("replay")
def messages_replay(
    ids: Annotated[list[int] | None, typer.Argument(help="Kept message ids.")] = None,
    all_open: Annotated[
        bool,
        typer.Option("--all", help="Every open replayable message (HL7 and DICOM), oldest first."),
    ] = False,
) -> None:
    """Run kept messages through their intake again, after their cause was fixed (the sender
    registered, a code list loaded, an MO's patient identifier system registered).

    An HL7 message goes through the MLLP intake and prints its acknowledgement code (AA, AE,
    AR); a DICOM instance is stored as the MO that sent it and prints its C-STORE status:
    0000 stored, 0000 duplicate (the same bytes were stored meanwhile), or the failure status
    and why. What succeeds is marked replayed; what fails again stays open. Exit 1 if any
    still fails.
    """
    from hie.adapters.hl7_listener import Hl7Listener, replay
    from hie.adapters.hl7_listener import replayable as hl7_replayable
    from hie.fhir.service import FhirService
    from hie.hub.errors import HieError, NotFound
    from hie.hub.runtime import open_hub
    from hie.pacs import replay as dicom_replay
    from hie.pacs.storage import StorageService
    from hie.registries.patient_index import attach_mpi

    settings = _settings()
    hub = open_hub(settings)
    handler: Hl7Listener | None = None
    storage: StorageService | None = None
    try:
        wanted = list(ids or [])
        if all_open:
            found = hub.rejected.list(status="open", limit=100_000)
            wanted += [
                m.id for m in reversed(found) if hl7_replayable(m) or dicom_replay.replayable(m)
            ]
        if not wanted:
            typer.echo("nothing to replay (give ids or --all)", err=True)
            raise typer.Exit(2)
        svc = FhirService(hub.store, settings, trail=hub.audit)
        mpi = attach_mpi(svc)
        failed = stored = 0
        for ident in wanted:
            try:
                kept = hub.rejected.get(ident)
                if kept is None:
                    raise NotFound(f"no kept message {ident}")
                if kept.channel == dicom_replay.CHANNEL:
                    if storage is None:
                        storage = StorageService(svc, hub.blobs, hub.rejected)
                    done = dicom_replay.replay_instance(storage, kept)
                    shown, ok = done.text, done.refused is None
                    stored += done.outcome == "stored"
                else:
                    if handler is None:
                        assert mpi is not None, "HIE_MPI_ENABLED is off"
                        handler = Hl7Listener(svc, mpi, hub.rejected, workers=1)
                    out = replay(handler, ident)
                    why = "; ".join(p.message for p in out.errors)
                    shown, ok = f"{out.code}{' — ' + why if why else ''}", out.code == "AA"
            except HieError as err:
                typer.echo(f"{ident}: {err.message}", err=True)
                failed += 1
                continue
            typer.echo(f"{ident}: {shown}")
            failed += not ok
        if storage is not None and stored:
            storage.refresh_summaries()  # the ImagingStudy counts, as after an association
    finally:
        if handler is not None:
            handler.close()
        if storage is not None:
            storage.close()
        hub.close()
    if failed:
        raise typer.Exit(1)


viewer_app = typer.Typer(
    help="The radiologists' web viewer (OHIF) at /viewer.", no_args_is_help=True
)
app.add_typer(viewer_app, name="viewer")


@viewer_app.command("fetch")
def viewer_fetch(
    dest: Annotated[
        Path | None,
        typer.Option(help="Directory to unpack into (default: $HIE_DATA_DIR/viewer)."),
    ] = None,
    registry: Annotated[str, typer.Option(help="The npm registry.")] = "https://registry.npmjs.org",
    force: Annotated[bool, typer.Option(help="Download again even if unpacked.")] = False,
) -> None:
    """Download the OHIF Viewer's built assets (npm @ohif/app) at install time, check the
    registry's sha512 integrity and unpack them where `hie serve` serves /viewer from.
    Exit 1 (nothing changed) when the registry cannot be reached."""
    from hie.pacs.viewer_assets import ViewerAssetsError, fetch

    target = dest if dest is not None else _settings().data_dir / "viewer"
    try:
        got = fetch(target, registry=registry, force=force, progress=lambda m: typer.echo(m))
    except ViewerAssetsError as exc:
        typer.echo(f"viewer assets not fetched: {exc.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{got.package}@{got.version} ready in {got.path}")


if __name__ == "__main__":  # pragma: no cover
    app()
