"""Migration 0004 creates exactly the DICOM index tables :mod:`hie.pacs.schema` describes, on
SQLite and PostgreSQL, and downgrades cleanly."""

from __future__ import annotations

from sqlalchemy import create_engine, inspect

from hie.hub.store import open_resource_store
from hie.hub.store.migrate import current, upgrade
from hie.hub.store.sql import SqlResourceStore
from hie.pacs import schema


def _engine_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def test_migration_matches_the_pacs_tables(store_url: str) -> None:
    store = open_resource_store(store_url)
    assert isinstance(store, SqlResourceStore)
    try:
        store.migrate()
        assert current(store.engine) is not None
        insp = inspect(store.engine)
        for table in schema.TABLES:
            cols = {c["name"]: c for c in insp.get_columns(table.name)}
            assert set(cols) == {c.name for c in table.columns}, table.name
            for col in table.columns:
                assert cols[col.name]["nullable"] == col.nullable, (table.name, col.name)
                length = getattr(col.type, "length", None)
                if length is not None:
                    assert getattr(cols[col.name]["type"], "length", None) == length
            indexes = {i["name"]: i["column_names"] for i in insp.get_indexes(table.name)}
            for ix in table.indexes:
                assert indexes.get(ix.name) == [c.name for c in ix.columns], ix.name
            uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints(table.name)}
            uniques |= {
                tuple(i["column_names"]) for i in insp.get_indexes(table.name) if i["unique"]
            }
            for col in table.columns:
                if col.unique:
                    assert (col.name,) in uniques, (table.name, col.name)
        # down to 0003 and up again
        upgrade_engine = create_engine(_engine_url(store_url))
        try:
            from alembic import command

            from hie.hub.store.migrate import _config

            cfg = _config()
            with upgrade_engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.downgrade(cfg, "0003")
            assert not set(inspect(upgrade_engine).get_table_names()) & {
                t.name for t in schema.TABLES
            }
            upgrade(upgrade_engine)
            assert {t.name for t in schema.TABLES} <= set(inspect(upgrade_engine).get_table_names())
        finally:
            upgrade_engine.dispose()
    finally:
        store.close()
