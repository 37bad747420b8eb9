"""Credentials from a Prefect Secret block when the environment does not set them."""

from __future__ import annotations

import pytest

from connectors import ConnectorConfigError, get_connector
from omni.core.settings import Settings


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


def test_sendgrid_key_from_a_prefect_secret_block(blocks):
    from prefect.blocks.system import Secret

    settings = Settings(email_connector="sendgrid", email_from="shop@example.org", sendgrid_api_key=None)
    with pytest.raises(ConnectorConfigError) as excinfo:
        get_connector("email", settings)
    assert "OMNI_SENDGRID_API_KEY" in str(excinfo.value) and "'omni-sendgrid-api-key'" in str(excinfo.value)

    Secret(value="SG.from-a-block").save("omni-sendgrid-api-key", overwrite=True)
    connector = get_connector("email", settings)
    assert connector.api_key.get_secret_value() == "SG.from-a-block"
    assert "SG.from-a-block" not in repr(connector)


def test_the_environment_wins_over_a_block(blocks):
    from prefect.blocks.system import Secret

    Secret(value="SG.from-a-block").save("omni-sendgrid-api-key", overwrite=True)
    settings = Settings(email_connector="sendgrid", email_from="shop@example.org", sendgrid_api_key="SG.env")
    assert get_connector("email", settings).api_key.get_secret_value() == "SG.env"


def test_block_is_gone_after_the_tests_above(blocks):
    settings = Settings(email_connector="sendgrid", email_from="shop@example.org", sendgrid_api_key=None)
    with pytest.raises(ConnectorConfigError):
        get_connector("email", settings)
