"""Alembic's environment: migrations run on the connection `service.db` hands over,
inside the transaction it holds (BEGIN IMMEDIATE on SQLite, an advisory lock on
Postgres), so two processes opening one database never migrate it at once."""

from alembic import context

connection = context.config.attributes["connection"]
# batch mode: SQLite's ALTER TABLE cannot drop or change columns; Alembic copies the table
context.configure(connection=connection, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
