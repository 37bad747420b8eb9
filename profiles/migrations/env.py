"""Alembic environment of the profile store.

Run through ``omni init`` (``profiles.db.upgrade_schema``), which hands over the engine; running the
``alembic`` command directly uses the ``sqlalchemy.url`` of its ini file.
"""

from alembic import context

from profiles import models  # noqa: F401  (registers the tables on the metadata)
from profiles.db import create_store_engine

target_metadata = models.metadata
config = context.config


def run_migrations() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        url = config.get_main_option("sqlalchemy.url")
        if not url:
            raise RuntimeError("no database: run `omni init`, or set sqlalchemy.url in alembic.ini")
        engine = create_store_engine(url)
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
