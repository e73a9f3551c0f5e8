"""The service's records as of the first release with migrations: API keys, the
ledger (requests and their credit), the audit log, jobs, valuations, payout
policies, per-key spend, requests in flight and worker heartbeats.

Also brings a database made before migrations existed (every store's service.db up
to then: the same tables, some of these columns missing) to this revision: tables
already there are kept and only the missing columns are added.

Revision ID: 0001
Revises:
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Time = sa.Double  # seconds since the epoch (time.time())


def tables() -> list[sa.Table]:
    meta = sa.MetaData()
    col = sa.Column
    return [
        sa.Table("secrets", meta, col("name", sa.Text, primary_key=True),
                 col("value", sa.LargeBinary, nullable=False)),
        # scheme: 'hmac' (HMAC-SHA-256 with the server's secret), NULL: scrypt with the
        # row's salt (keys made before; upgraded to hmac at their next successful check)
        sa.Table("keys", meta, col("key_id", sa.Text, primary_key=True),
                 col("user", sa.Text, nullable=False), col("role", sa.Text, nullable=False),
                 col("license", sa.Text, nullable=False), col("salt", sa.LargeBinary, nullable=False),
                 col("key_hash", sa.LargeBinary, nullable=False), col("created_at", Time, nullable=False),
                 col("expires_at", Time), col("revoked_at", Time), col("contributor_id", sa.Text),
                 col("scheme", sa.Text)),
        sa.Table("requests", meta, col("request_id", sa.Text, primary_key=True),
                 col("user", sa.Text, nullable=False), col("created_at", Time, nullable=False),
                 col("params", sa.Text, nullable=False), col("contributors", sa.Text, nullable=False),
                 col("attribution", sa.Text, nullable=False),
                 sa.Index("requests_by_user", "user", "created_at")),
        sa.Table("credit", meta,
                 col("request_id", sa.Text, sa.ForeignKey("requests.request_id"), primary_key=True),
                 col("contributor_id", sa.Text, primary_key=True),
                 col("samples", sa.BigInteger, nullable=False), col("mass", sa.Double, nullable=False),
                 sa.Index("credit_by_contributor", "contributor_id")),
        sa.Table("audit", meta, col("id", sa.Integer, primary_key=True, autoincrement=True),
                 col("at", Time, nullable=False), col("actor", sa.Text, nullable=False),
                 col("action", sa.Text, nullable=False), col("contributor_id", sa.Text, nullable=False),
                 col("details", sa.Text, nullable=False), sqlite_autoincrement=True),
        sa.Table("jobs", meta, col("job_id", sa.Text, primary_key=True),
                 col("kind", sa.Text, nullable=False), col("actor", sa.Text, nullable=False),
                 col("params", sa.Text, nullable=False), col("status", sa.Text, nullable=False),
                 col("created_at", Time, nullable=False), col("finished_at", Time),
                 col("result", sa.Text), col("error", sa.Text), col("plan", sa.Text)),
        # kind: 'primary' (the run's most exact Shapley values, credit's `shapley`) or
        # 'other'; params: a method's parameters as canonical JSON, NULL for none
        sa.Table("valuations", meta, col("id", sa.Integer, primary_key=True, autoincrement=True),
                 col("at", Time, nullable=False), col("property", sa.Text, nullable=False),
                 col("method", sa.Text, nullable=False), col("values_json", sa.Text, nullable=False),
                 col("kind", sa.Text), col("params", sa.Text), sqlite_autoincrement=True),
        sa.Table("payout_policy", meta, col("id", sa.Integer, primary_key=True, autoincrement=True),
                 col("at", Time, nullable=False), col("actor", sa.Text, nullable=False),
                 col("property", sa.Text, nullable=False), col("method", sa.Text, nullable=False),
                 col("params", sa.Text), sqlite_autoincrement=True),
        sa.Table("spend", meta, col("key_id", sa.Text, nullable=False), col("at", Time, nullable=False),
                 col("cost", sa.BigInteger, nullable=False),
                 sa.Index("spend_by_key", "key_id", "at")),
        sa.Table("inflight", meta, col("worker", sa.Text, primary_key=True),
                 col("seq", sa.BigInteger, primary_key=True, autoincrement=False),
                 col("generation", sa.BigInteger, nullable=False),
                 col("started_at", Time, nullable=False)),
        sa.Table("workers", meta, col("worker", sa.Text, primary_key=True),
                 col("started_at", Time, nullable=False), col("heartbeat_at", Time, nullable=False)),
    ]


def upgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    for table in tables():
        if table.name not in existing:
            table.create(bind)
            continue
        have = {c["name"] for c in sa.inspect(bind).get_columns(table.name)}
        for column in table.columns:
            if column.name not in have:  # a pre-migrations database: added in place
                op.add_column(table.name, sa.Column(column.name, column.type))
        indexes = {i["name"] for i in sa.inspect(bind).get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(bind)
