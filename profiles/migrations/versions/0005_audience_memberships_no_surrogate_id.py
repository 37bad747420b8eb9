"""audience memberships: drop the surrogate ``id`` (and with it the primary key)

Nothing looks a membership row up by its id: every read names the audience (the current members:
``uq_audience_memberships_open``), and a build closes the rows it finds through that index, by
their physical address, in the same statement. On PostgreSQL the id cost more than the row itself: a
``nextval`` and an entry in the primary key's index for every member written. Writing 213,870 members
in one ``INSERT ... SELECT`` took 5.1-6.7 us per row with it, 2.7-4.4 us without (the row alone:
1.2-1.8 us). The table keeps no primary key; the one-open-row index stays as it was. On PostgreSQL
its replica identity becomes FULL, so a logical replication publication of the table (which needs
one to publish updates) still carries the builds' ``exited_at`` updates.

On SQLite the table is copied without the column (Alembic's batch mode); SQLite still numbers rows by
its implicit rowid, so nothing changes there but the schema.

Downgrade adds the column back as it was (a 64-bit auto-incremented primary key), numbering the
existing rows in the order of their stays: (entered_at, audience, customer_id, exited_at).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 18:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLE = "audience_memberships"
STAY_ORDER = "entered_at, audience, customer_id, exited_at"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        with op.batch_alter_table(TABLE) as batch_op:
            batch_op.drop_column("id")
        return
    # Drops the primary key constraint and the sequence the column owns.
    op.drop_column(TABLE, "id")
    op.execute(f"ALTER TABLE {TABLE} REPLICA IDENTITY FULL")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        # The copy's id is an INTEGER PRIMARY KEY (the rowid): the rows are numbered as they are
        # copied, so copy them in the order of their stays.
        op.execute(
            f"CREATE TEMPORARY TABLE omni_memberships_0005 AS SELECT * FROM {TABLE} ORDER BY {STAY_ORDER}"
        )
        op.execute(f"DELETE FROM {TABLE}")
        with op.batch_alter_table(TABLE, recreate="always") as batch_op:
            batch_op.add_column(
                sa.Column("id", sa.Integer(), nullable=False, primary_key=True, autoincrement=True),
                insert_before="audience",
            )
        op.execute(
            f"INSERT INTO {TABLE} (audience, customer_id, entered_at, exited_at) "
            f"SELECT audience, customer_id, entered_at, exited_at FROM omni_memberships_0005 ORDER BY rowid"
        )
        op.execute("DROP TABLE omni_memberships_0005")
        return
    op.execute(f"ALTER TABLE {TABLE} REPLICA IDENTITY DEFAULT")
    op.execute(f"CREATE SEQUENCE {TABLE}_id_seq")
    op.execute(f"ALTER TABLE {TABLE} ADD COLUMN id bigint")
    op.execute(
        f"UPDATE {TABLE} AS m SET id = n.id FROM (SELECT o.tid, nextval('{TABLE}_id_seq') AS id "
        f"FROM (SELECT ctid AS tid FROM {TABLE} ORDER BY {STAY_ORDER}) AS o) AS n WHERE m.ctid = n.tid"
    )
    op.execute(f"ALTER TABLE {TABLE} ALTER COLUMN id SET DEFAULT nextval('{TABLE}_id_seq')")
    op.execute(f"ALTER TABLE {TABLE} ALTER COLUMN id SET NOT NULL")
    op.execute(f"ALTER SEQUENCE {TABLE}_id_seq OWNED BY {TABLE}.id")
    op.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT {TABLE}_pkey PRIMARY KEY (id)")
