"""The schema: migrations create exactly what the models describe, and `init` is idempotent."""

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from profiles.db import current_revision, head_revision, upgrade_schema
from profiles.models import metadata


def test_migrations_match_models(engine):
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diff == []


def test_upgrade_is_idempotent(engine):
    upgrade_schema(engine)
    upgrade_schema(engine)
    assert current_revision(engine) == head_revision()
