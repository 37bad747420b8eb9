"""Alembic environment of the profile store.

Run through ``omni init`` (``profiles.db.upgrade_schema``), which hands over the engine; running the
``alembic`` command directly uses ``OMNI_DATABASE_URL``.
"""

from alembic import context

from profiles import models  # noqa: F401  (registers the tables on the metadata)
from profiles.db import create_store_engine

target_metadata = models.metadata
config = context.config


def run_migrations() -> None:
    engine = config.attributes.get("engine") or create_store_engine()
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",  # ALTER TABLE support on SQLite
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations()
