"""Persistence: the PostgreSQL run store (schema, queries, migrations)."""
