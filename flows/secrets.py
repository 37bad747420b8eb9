"""Connector credentials, resolved before a connector is built.

A credential comes from the environment (``OMNI_SENDGRID_API_KEY`` ...) or, when the environment does not
set it, from the Prefect Secret block named after the variable (``omni-sendgrid-api-key``). Connectors
never look anything up: the flows and the CLI call :func:`resolve_secrets` and hand the result down.
"""

from __future__ import annotations

from pydantic import SecretStr

from connectors import configured_secrets, register_secret
from omni.core.settings import Settings, secret_block_name


def resolve_secrets(settings: Settings) -> Settings:
    """A copy of ``settings`` with the credentials of the configured connectors filled: the environment's
    (or the given) value first, else the Prefect Secret block's. Every credential is registered for
    redaction. One still missing is left empty: building its connector names what to set."""
    found: dict[str, SecretStr] = {}
    for name in configured_secrets(settings):
        value = getattr(settings, name)
        if value is None or not value.get_secret_value().strip():
            value = load_secret_block(name)
            if value is None:
                continue
            found[name] = value
        register_secret(value)
    return settings.model_copy(update=found)


def load_secret_block(name: str) -> SecretStr | None:
    """The value of the Prefect Secret block for the setting ``name``, or None.

    Looked up only where a Prefect API is at hand (``PREFECT_API_URL`` set, or inside a flow run), so a
    CLI command never starts a temporary Prefect server just to find a credential.
    """
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value() and FlowRunContext.get() is None:
        return None
    from prefect.blocks.system import Secret

    try:
        block = Secret.load(secret_block_name(name))
    except ValueError:  # no block of that name
        return None
    value = block.get()
    return SecretStr(value) if isinstance(value, str) and value.strip() else None
