"""The single entry point: ``hie …`` (Typer).

Every command builds its settings from ``HIE_*`` variables; nothing is read at import time.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from hie.hub import logging as hlog
from hie.hub.settings import Settings, load_settings

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
    """Run the HTTP API and the outbox worker (MLLP and DICOM listeners come later).

    With ``HIE_HTTP_WORKERS`` > 1 the HTTP API runs in that many processes (validation is
    CPU-bound and Python has one core per process); this process keeps the outbox worker.
    """
    import os

    import uvicorn

    from hie.fhir.app import create_app
    from hie.fhir.indexing import SearchIndexer
    from hie.hub.runtime import open_hub

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
    if settings.http_port == 0:
        typer.echo("HIE_HTTP_PORT=0: HTTP listener disabled", err=True)
        return
    options: dict[str, object] = {
        "host": settings.http_host,
        "port": settings.http_port,
        "log_config": None,
        "access_log": False,
        "loop": "uvloop",
        "http": "httptools",
        "timeout_graceful_shutdown": 10,
    }
    if workers == 1:
        uvicorn.run(create_app(settings, hub), **options)  # type: ignore[arg-type]
        return
    if settings.worker:
        hub.add_consumers([SearchIndexer(hub.store, lambda: hub.search_index)])
        hub.start_worker()
    os.environ["HIE_WORKER"] = "false"  # the worker processes must not start their own
    try:
        uvicorn.run(
            "hie.fhir.app:app_from_env",
            factory=True,
            workers=workers,
            **options,  # type: ignore[arg-type]
        )
    finally:
        hub.close()


@app.command()
def worker(
    once: Annotated[bool, typer.Option(help="Drain what is pending, then exit.")] = False,
) -> None:
    """Run only the outbox worker (scale-out deployments run several hubs and one worker set)."""
    import signal
    import threading

    from hie.fhir.indexing import SearchIndexer
    from hie.hub.runtime import open_hub

    settings = _settings()
    hub = open_hub(settings)
    hub.add_consumers([SearchIndexer(hub.store, lambda: hub.search_index)])
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
    seed: Annotated[int, typer.Option(help="Generator seed (same seed, same city).")] = 2026,
    if_empty: Annotated[bool, typer.Option(help="Do nothing if the hub has patients.")] = False,
) -> None:
    """Load a synthetic city: MOs with endpoints, practitioners, patients and their records."""
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
    svc = FhirService(hub.store, settings)
    with Progress() as progress:
        task = progress.add_task("demo patients", total=patients)
        sent = load_demo(
            lambda b: svc.transaction(b, settings.public_base + "/fhir"),
            patients=patients,
            resources_per_patient=per_patient,
            seed=seed,
            progress=lambda n: progress.advance(task, n),
        )
    hub.close()
    typer.echo(f"loaded {sent} demo resources", err=True)


@search_app.command("reindex")
def search_reindex() -> None:
    """Rebuild the full-text index from the resource store (run while `hie serve` is stopped)."""
    import orjson
    from rich.progress import Progress

    from hie.fhir.indexing import FULLTEXT_TYPES, SearchIndexer, to_doc
    from hie.hub.runtime import open_hub

    settings = _settings()
    hub = open_hub(settings)
    idx = hub.search_index
    idx.clear()
    with Progress() as progress:
        for rtype in sorted(FULLTEXT_TYPES):
            task = progress.add_task(rtype, total=None)
            batch = []
            for stored in hub.store.iter_current(rtype):
                batch.append(to_doc(orjson.loads(stored.content or b"{}")))
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


if __name__ == "__main__":  # pragma: no cover
    app()
