"""Credentials resolved before a connector is built: the environment, else a Prefect Secret block."""

from __future__ import annotations

import logging

import pytest

from connectors import ConnectorConfigError, get_connector
from flows.secrets import resolve_secrets
from omni.core.settings import Settings

SENDGRID = {"email_connector": "sendgrid", "email_from": "shop@example.org"}


@pytest.fixture
def blocks(prefect_harness):
    """The Prefect API, without the block afterwards (later tests expect a missing key to fail)."""
    yield
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            document = client.read_block_document_by_name("omni-sendgrid-api-key", block_type_slug="secret")
        except Exception:  # noqa: BLE001 - nothing saved
            return
        client.delete_block_document(document.id)


def save_block(value: str) -> None:
    from prefect.blocks.system import Secret

    Secret(value=value).save("omni-sendgrid-api-key", overwrite=True)


def test_sendgrid_key_from_a_prefect_secret_block(blocks, caplog):
    settings = Settings(**SENDGRID, sendgrid_api_key=None)
    with pytest.raises(ConnectorConfigError) as excinfo:
        get_connector("email", resolve_secrets(settings))
    assert "OMNI_SENDGRID_API_KEY" in str(excinfo.value) and "'omni-sendgrid-api-key'" in str(excinfo.value)

    save_block("SG.from-a-block")
    resolved = resolve_secrets(settings)
    assert resolved is not settings and settings.sendgrid_api_key is None  # a copy
    connector = get_connector("email", resolved)
    assert connector.api_key.get_secret_value() == "SG.from-a-block"
    assert "SG.from-a-block" not in repr(connector)
    logging.getLogger("anything").warning("key SG.from-a-block")  # registered for redaction
    assert "SG.from-a-block" not in caplog.text


def test_connectors_take_the_resolved_settings(blocks):
    save_block("SG.from-a-block")
    # A connector looks nothing up: settings that were not resolved lack the key.
    with pytest.raises(ConnectorConfigError, match="OMNI_SENDGRID_API_KEY"):
        get_connector("email", Settings(**SENDGRID, sendgrid_api_key=None))


def test_the_environment_wins_over_a_block(blocks):
    save_block("SG.from-a-block")
    settings = Settings(**SENDGRID, sendgrid_api_key="SG.env")
    assert get_connector("email", resolve_secrets(settings)).api_key.get_secret_value() == "SG.env"


def test_only_the_configured_providers_credentials_are_resolved(blocks):
    save_block("SG.from-a-block")
    assert resolve_secrets(Settings(sendgrid_api_key=None)).sendgrid_api_key is None  # email: the outbox


def test_no_lookup_without_a_prefect_api(blocks):
    # Outside a flow run and without PREFECT_API_URL (a plain CLI command) no block is looked up, so no
    # temporary Prefect server is started just to find a credential.
    from prefect.settings import PREFECT_API_URL, temporary_settings

    save_block("SG.from-a-block")
    with temporary_settings(updates={PREFECT_API_URL: None}):
        settings = resolve_secrets(Settings(**SENDGRID, sendgrid_api_key=None))
    assert settings.sendgrid_api_key is None


def test_block_is_gone_after_the_tests_above(blocks):
    settings = Settings(**SENDGRID, sendgrid_api_key=None)
    with pytest.raises(ConnectorConfigError):
        get_connector("email", resolve_secrets(settings))
