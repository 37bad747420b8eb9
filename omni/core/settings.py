"""Omni's settings: one pydantic-settings object, read from the environment (prefix ``OMNI_``).

Explicit arguments (``--database-url`` on the CLI, parameters in Python) always win over the
environment; the environment wins over the defaults here.
"""

from __future__ import annotations

from datetime import time
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def normalize_database_url(url: str) -> str:
    """Pick psycopg 3 for PostgreSQL URLs given without a driver (``postgresql://``, ``postgres://``)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Settings(BaseSettings):
    # populate_by_name: a setting read from a second variable (validation_alias) is still passed by
    # its name in Python: Settings(delivery_attempts=3).
    model_config = SettingsConfigDict(env_prefix="OMNI_", extra="ignore", populate_by_name=True)

    home: Path | None = Field(
        default=None,
        description="Where deployment runs work (a worker's flow runs change to it): the folder with the "
        "SQLite store and campaigns/. Required on a worker; the CLI uses the working directory.",
    )
    artifact_prefix: str = Field(
        default="",
        pattern=r"^([a-z0-9]+(-[a-z0-9]+)*)?$",
        description="Prefix of the flows' Prefect artifact keys (e.g. demo: demo-sequences-tick), so a "
        "trial run never adds versions to the production keys. Lowercase letters, digits, dashes.",
    )
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
    ingest_max_future_hours: float = Field(
        default=24,
        description="A payload dated more than this many hours after its receipt is rejected; 0: no limit.",
    )
    ingest_batch_size: int = Field(
        default=5000, ge=1, le=100_000, description="Payloads validated, resolved and stored per batch."
    )
    ingest_transaction_size: int = Field(
        default=50_000,
        ge=1,
        le=1_000_000,
        description="Payloads per transaction when ingesting (whole batches; at least one batch).",
    )
    ingest_parse_workers: int = Field(
        default=1,
        ge=0,
        le=32,
        description="Processes that parse and validate JSON lines while the store is written; 0: in-process.",
    )

    # --- Sequences and campaigns: the rules every marketing message obeys.
    quiet_hours_start: time = Field(
        default=time(21, 0), description="Start of quiet hours in the customer's timezone (HH:MM)."
    )
    quiet_hours_end: time = Field(default=time(9, 0), description="End of quiet hours (HH:MM).")
    frequency_cap: int = Field(
        default=2, ge=1, description="Marketing messages per customer, across channels, per frequency window."
    )
    frequency_window_hours: float = Field(default=24, gt=0, description="The rolling frequency-cap window.")
    sequence_batch_size: int = Field(
        default=1000, ge=1, le=100_000, description="Enrollments or deliveries handled per batch in a tick."
    )
    # Delivery attempts across ticks; the tries within one send are connectors.RetryPolicy.attempts_per_send.
    delivery_attempts: int = Field(
        default=5,
        ge=1,
        validation_alias=AliasChoices("OMNI_DELIVERY_ATTEMPTS", "OMNI_MAX_SEND_ATTEMPTS"),
        description="Ticks a retryable delivery is tried on before it is marked failed "
        "(OMNI_MAX_SEND_ATTEMPTS, its former name, is still read).",
    )

    # --- Channel connectors (see docs/connectors.md). Each channel's provider, `outbox` by default.
    email_connector: str = Field(default="outbox", description="Email provider: outbox, sendgrid or webhook.")
    sms_connector: str = Field(default="outbox", description="SMS provider: outbox, twilio_sms or webhook.")
    push_connector: str = Field(default="outbox", description="Push provider: outbox, fcm_push or webhook.")
    ads_connector: str = Field(default="outbox", description="Ad audiences: outbox or meta_audience.")
    webhook_connector: str = Field(
        default="outbox", description="Operational webhooks (store clienteling / POS): outbox or webhook."
    )
    connector_timeout: float = Field(
        default=10.0, gt=0, le=300, description="Seconds before a provider request times out."
    )
    email_from: str = Field(
        default="Omni <noreply@example.com>", description='Sender of emails: "Name <address>" or an address.'
    )
    email_reply_to: str | None = Field(default=None, description="Optional Reply-To address of emails.")
    # SendGrid v3 Mail Send
    sendgrid_api_key: SecretStr | None = Field(default=None, description="SendGrid API key (mail.send).")
    sendgrid_base_url: str = Field(
        default="https://api.sendgrid.com", description="SendGrid API host (EU: https://api.eu.sendgrid.com)."
    )
    sendgrid_sandbox: bool = Field(default=False, description="Validate only: SendGrid sends nothing.")
    sendgrid_asm_group_id: int | None = Field(default=None, description="SendGrid unsubscribe group.")
    # Meta custom audiences
    meta_access_token: SecretStr | None = Field(
        default=None, description="Meta system-user token with ads_management."
    )
    meta_ad_account_id: str | None = Field(default=None, description="Meta ad account id (act_...).")
    meta_base_url: str = Field(default="https://graph.facebook.com", description="Meta Graph API host.")
    meta_api_version: str = Field(default="v25.0", description="Meta Graph API version.")
    meta_audiences: dict[str, str] = Field(
        default_factory=dict,
        description='Omni audience -> Meta custom audience id, JSON: {"cart_retargeting": "2385..."}.',
    )
    # Twilio Programmable Messaging
    twilio_account_sid: str | None = Field(default=None, description="Twilio Account SID (AC...).")
    twilio_auth_token: SecretStr | None = Field(default=None, description="Twilio auth token.")
    twilio_from: str | None = Field(
        default=None, description="Sender: E.164 number, alphanumeric id, or Messaging Service SID (MG...)."
    )
    twilio_base_url: str = Field(default="https://api.twilio.com", description="Twilio REST API host.")
    twilio_status_callback_url: str | None = Field(
        default=None,
        description="StatusCallback URL for SMS (e.g. `<OMNI_PUBLIC_URL>/webhooks/twilio/status`); each "
        "message's callback adds `delivery_id=<its delivery>` to it.",
    )
    # Firebase Cloud Messaging HTTP v1
    fcm_project_id: str | None = Field(default=None, description="Firebase project id.")
    fcm_credentials_file: Path | None = Field(default=None, description="Service-account JSON key file.")
    fcm_base_url: str = Field(default="https://fcm.googleapis.com", description="FCM API host.")
    # Signed JSON webhooks
    webhook_url: str | None = Field(default=None, description="URL the webhook connector POSTs to.")
    webhook_secret: SecretStr | None = Field(default=None, description="HMAC-SHA256 key signing webhooks.")
    # Templates and links
    unsubscribe_secret: SecretStr | None = Field(
        default=None,
        description="HMAC key of unsubscribe links; default: a random secret `omni init` keeps in the store.",
    )
    unsubscribe_base_url: str = Field(
        default="http://localhost:8000/unsubscribe",
        description="Where unsubscribe links point (?token=...); default: the server's own /unsubscribe.",
    )
    site_url: str = Field(default="https://shop.example.com", description="Shop URL for links in messages.")
    brand_name: str = Field(default="Omni Shop", description="Brand name shown in messages.")
    # omni serve
    server_host: str = Field(default="127.0.0.1", description="Address `omni serve` listens on.")
    server_port: int = Field(default=8000, ge=1, le=65535, description="Port `omni serve` listens on.")
    server_workers: int = Field(default=1, ge=1, description="Worker processes of `omni serve`.")
    public_url: str | None = Field(
        default=None,
        description="The URL clients and providers reach `omni serve` at (behind a proxy); default: "
        "http://<host>:<port>.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to call the tracking API (analytics.js); none by default.",
    )
    intake_max_inflight: int = Field(
        default=128,
        ge=1,
        description="Tracking requests being received or committed at once per server process; more get 429.",
    )
    intake_max_backlog: int = Field(
        default=10_000, ge=1, description="Accepted tracking requests not yet ingested; more get 429."
    )
    intake_max_lag_seconds: float = Field(
        default=0.5,
        ge=0,
        description="429 while the queue holds more than this many seconds of the intake processor's work, "
        "or its oldest request has waited twice as long (0: no limit).",
    )
    intake_claim_rows: int = Field(
        default=1000, ge=1, description="Tracking requests the intake processor ingests per transaction ..."
    )
    intake_claim_kb: int = Field(
        default=1024,
        ge=1,
        description="... and at most about this many KB of their bodies (SQLite; at least one request).",
    )
    intake_claim_kb_postgresql: int = Field(
        default=256, ge=1, description="The same on PostgreSQL (smaller: its transactions are slower)."
    )
    # --- Provider feedback (omni serve: /webhooks/...): see the README's "Deliverability" section.
    sendgrid_webhook_public_key: SecretStr | None = Field(
        default=None,
        description="Verification key of SendGrid's signed Event Webhook, as its console shows it (base64 "
        "DER public key); unset: /webhooks/sendgrid refuses every post (503).",
    )
    webhook_max_age_seconds: int = Field(
        default=300,
        ge=1,
        description="A signed SendGrid post whose timestamp is further than this from now is refused "
        "(replays); Twilio posts carry no timestamp (their events are processed once).",
    )

    @property
    def server_url(self) -> str:
        """Where `omni serve` is reached: ``public_url``, else ``http://<host>:<port>`` (``localhost`` for
        a loopback or wildcard host)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.server_host
        if host in ("", "0.0.0.0", "::", "127.0.0.1", "::1"):
            host = "localhost"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.server_port}"

    @model_validator(mode="after")
    def _unsubscribe_default(self) -> Settings:
        # OMNI_UNSUBSCRIBE_BASE_URL, when not set, is the server's own page.
        if "unsubscribe_base_url" not in self.model_fields_set:
            # Through __dict__: a derived value, not one the user set (model_fields_set stays as given).
            self.__dict__["unsubscribe_base_url"] = f"{self.server_url}/unsubscribe"
        return self

    # --- Reports (omni report, the build-report flow): see the README's "Reports" section.
    report_period_days: float = Field(
        default=90, gt=0, description="Reporting period: the last this many days up to now (--since/--until)."
    )
    report_window_days: float = Field(
        default=7, gt=0, description="Attribution window: an order this long after a message or entry counts."
    )
    report_min_control: int = Field(
        default=100,
        ge=1,
        description='Smallest held-out group whose lift is judged (else "too few to tell").',
    )
    report_recent_contact_days: float = Field(
        default=7, gt=0, description="FCR: a contact this soon after one on another channel follows it."
    )
    support_contact_event: str = Field(
        default="Support Contact", description="Event of one service contact (properties: the ticket id)."
    )
    support_resolved_event: str = Field(
        default="Support Ticket Resolved", description="Event of a resolved service ticket (the ticket id)."
    )
    support_ticket_property: str = Field(
        default="ticket_id", description="Property of both support events that holds the ticket id."
    )
    report_dir: Path = Field(
        default=Path("omni-reports"),
        description="Folder of the HTML reports (build-report flow, the demo); omni serve shows the newest "
        "at /reports/latest.",
    )
    # --- The global control group (profiles/control.py): see the README's "Global control group".
    global_control_share: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Share of all customers held out of every marketing sequence and campaign; 0: off.",
    )
    global_control_salt: str = Field(
        default="", description="Chooses the global control group; a new salt draws a new, independent group."
    )

    @field_validator("database_url")
    @classmethod
    def _normalize(cls, value: str) -> str:
        return normalize_database_url(value)


def secret_block_name(field: str) -> str:
    """The Prefect Secret block that may hold the credential setting ``field`` when the environment does
    not set it (``sendgrid_api_key``: ``OMNI_SENDGRID_API_KEY`` -> ``omni-sendgrid-api-key``)."""
    return f"omni-{field.replace('_', '-')}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
