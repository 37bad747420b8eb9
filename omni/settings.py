"""Omni's settings: one pydantic-settings object, read from the environment (prefix ``OMNI_``).

Explicit arguments (``--database-url`` on the CLI, parameters in Python) always win over the
environment; the environment wins over the defaults here.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def normalize_database_url(url: str) -> str:
    """Pick psycopg 3 for PostgreSQL URLs given without a driver (``postgresql://``, ``postgres://``)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OMNI_", extra="ignore")

    database_url: str = Field(
        default="sqlite:///omni.db",
        description="SQLAlchemy URL of the profile store. SQLite (relative to the working directory) "
        "by default; PostgreSQL in production, e.g. postgresql://user@host/db.",
    )
    default_timezone: str = Field(
        default="UTC", description="IANA timezone for customers with none of their own or their store's."
    )
    default_phone_region: str = Field(
        default="US", description="ISO country used to read phone numbers written without a +country code."
    )
    audiences_dir: Path | None = Field(
        default=None, description="Folder of audience definitions (*.yaml); default: the built-in audiences/."
    )
    sequences_dir: Path | None = Field(
        default=None, description="Folder of sequence definitions (*.yaml); default: the built-in sequences/."
    )
    campaigns_dir: Path | None = Field(
        default=None, description="Folder of campaign definitions (*.yaml); default: ./campaigns."
    )
    templates_dir: Path | None = Field(
        default=None, description="Folder of message templates by channel; default: the built-in templates/."
    )
    ingest_batch_size: int = Field(
        default=5000, ge=1, le=100_000, description="Payloads committed per transaction when ingesting."
    )

    @field_validator("database_url")
    @classmethod
    def _normalize(cls, value: str) -> str:
        return normalize_database_url(value)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
