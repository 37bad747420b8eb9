"""FCM HTTP v1 (and its OAuth token endpoint) against a fake server speaking the contract."""

from __future__ import annotations

import json

import pytest
from connector_contract import ConnectorContract
from connector_fakes import FakeFcm

from connectors import ConnectorConfigError, Message, Status
from connectors.fcm_push import FcmPush


def push(i: int, token: str | None = None) -> Message:
    return Message(
        delivery_id=f"p{i}",
        channel="push",
        to=token or f"fGx1-token-{i}:APA91b",
        customer_id=i,
        title="Your order is ready for pickup",
        text=f"Order o-{i} at Omni SoHo",
        data={"deeplink": f"shop://orders/o-{i}"},
    )


class TestFcmPush(ConnectorContract):
    provider = "fcm_push"
    fake_class = FakeFcm
    batch_limit = 1
    channel = "push"
    missing_setting = ({"push_connector": "fcm_push", "fcm_project_id": "p"}, "OMNI_FCM_CREDENTIALS_FILE")

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path):
        self.tmp_path = tmp_path

    def make_connector(self, fake, base_url=None, timeout=5.0):
        path = self.tmp_path / "service-account.json"
        path.write_text(json.dumps(fake.credentials()))
        return FcmPush(
            project_id=fake.project_id, credentials=path, base_url=base_url or fake.url, timeout=timeout
        )

    def message(self, index: int) -> Message:
        return push(index)

    def secrets(self, fake) -> list[str]:
        key_body = fake.credentials()["private_key"].splitlines()[1]
        return [key_body, *fake.issued] if fake.issued else [key_body]

    def throttled(self, fake, retry_after: int) -> None:
        fake.script(
            429,
            {
                "error": {
                    "code": 429,
                    "message": "Quota exceeded",
                    "status": "RESOURCE_EXHAUSTED",
                    "details": [
                        {
                            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                            "errorCode": "QUOTA_EXCEEDED",
                        }
                    ],
                }
            },
            {"Retry-After": str(retry_after)},
        )

    def permanent(self, fake) -> None:
        fake.script(
            400,
            {
                "error": {
                    "code": 400,
                    "message": "Invalid TTL",
                    "status": "INVALID_ARGUMENT",
                    "details": [
                        {
                            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                            "errorCode": "INVALID_ARGUMENT",
                        },
                        {
                            "@type": "type.googleapis.com/google.rpc.BadRequest",
                            "fieldViolations": [{"field": "message.android.ttl", "description": "bad"}],
                        },
                    ],
                }
            },
        )

    def warm(self, connector) -> None:
        timeout, connector.http.timeout = connector.http.timeout, 5.0
        connector.credentials.token()
        connector.http.timeout = timeout

    def revoked(self, fake) -> None:
        fake.script(
            403,
            {
                "error": {
                    "code": 403,
                    "message": "Permission 'cloudmessaging.messages.create' denied",
                    "status": "PERMISSION_DENIED",
                    "details": [],
                }
            },
        )

    def provider_requests(self, fake):
        return [r for r in fake.requests if r.path != "/token"]

    def test_oauth_then_message_field_by_field(self, fake, connector):
        [result] = connector.send([push(1)])
        assert result.status is Status.SENT
        assert result.provider_id.startswith(f"projects/{fake.project_id}/messages/")
        token_request, send_request = fake.requests
        assert token_request.path == "/token"
        assert send_request.path == f"/v1/projects/{fake.project_id}/messages:send"
        assert send_request.headers["authorization"] == f"Bearer {fake.issued[0]}"
        message = send_request.json()["message"]
        assert message["token"] == "fGx1-token-1:APA91b"
        assert message["notification"] == {
            "title": "Your order is ready for pickup",
            "body": "Order o-1 at Omni SoHo",
        }
        assert message["data"] == {"deeplink": "shop://orders/o-1", "omni_delivery_id": "p1"}

    def test_token_is_cached(self, fake, connector):
        connector.send([push(1)])
        connector.send([push(2)])
        assert [r.path for r in fake.requests].count("/token") == 1

    def test_unauthenticated_refreshes_the_token_once(self, fake, connector):
        connector.send([push(1)])
        fake.script(
            401, {"error": {"code": 401, "message": "expired", "status": "UNAUTHENTICATED", "details": []}}
        )
        [result] = connector.send([push(2)])
        assert result.status is Status.SENT
        assert [r.path for r in fake.requests].count("/token") == 2

    def test_unregistered_token_is_failed_and_removed(self, connector):
        [result] = connector.send([push(5, token="dead-token")])
        assert result.status is Status.FAILED and "UNREGISTERED" in result.reason
        [effect] = result.effects
        assert (effect.kind, effect.customer_id, effect.value) == ("device_token_invalid", 5, "dead-token")

    def test_invalid_token_field_removes_the_token(self, fake, connector):
        fake.script(
            400,
            {
                "error": {
                    "code": 400,
                    "message": "bad token",
                    "status": "INVALID_ARGUMENT",
                    "details": [
                        {
                            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                            "errorCode": "INVALID_ARGUMENT",
                        },
                        {
                            "@type": "type.googleapis.com/google.rpc.BadRequest",
                            "fieldViolations": [{"field": "message.token", "description": "bad"}],
                        },
                    ],
                }
            },
        )
        [result] = connector.send([push(1)])
        assert result.status is Status.FAILED and result.effects[0].kind == "device_token_invalid"

    def test_unavailable_is_retryable(self, fake, connector):
        fake.script(
            503,
            {
                "error": {
                    "code": 503,
                    "message": "down",
                    "status": "UNAVAILABLE",
                    "details": [
                        {
                            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                            "errorCode": "UNAVAILABLE",
                        }
                    ],
                }
            },
            {"Retry-After": "3"},
        )
        [result] = connector.send([push(1)])
        assert result.status is Status.RETRYABLE and result.retry_after == 3

    def test_missing_credentials_file_fails_at_construction(self, tmp_path):
        with pytest.raises(ConnectorConfigError, match="OMNI_FCM_CREDENTIALS_FILE"):
            FcmPush(project_id="p", credentials=tmp_path / "nope.json")

    def test_unauthenticated_after_a_refresh_halts(self, fake, connector):
        from connector_contract import FAST, Sleeps

        from connectors import send_batch

        unauthenticated = {"error": {"code": 401, "message": "bad", "status": "UNAUTHENTICATED"}}
        fake.script(401, unauthenticated)
        fake.script(401, unauthenticated)
        report = send_batch(connector, [push(i) for i in range(5)], policy=FAST, sleep=Sleeps())
        assert report.halted and "UNAUTHENTICATED" in report.halted
        assert len(self.provider_requests(fake)) == 2  # the send, then once with a refreshed token
        assert [r.status for r in report.results] == [Status.RETRYABLE] * 5

    def test_a_rejected_service_account_halts_without_sending(self, fake, connector):
        from connector_contract import FAST, Sleeps
        from cryptography.hazmat.primitives.asymmetric import rsa

        from connectors import send_batch

        # The token endpoint no longer knows the connector's key: invalid_grant.
        fake.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        report = send_batch(connector, [push(i) for i in range(3)], policy=FAST, sleep=Sleeps())
        assert report.halted and "invalid_grant" in report.halted
        assert self.provider_requests(fake) == []

    def test_a_token_endpoint_failure_is_never_ambiguous(self, fake, tmp_path):
        from connector_fakes import RawServer

        with RawServer("drop") as token_server:
            info = {**fake.credentials(), "token_uri": token_server.url + "/token"}
            path = tmp_path / "sa.json"
            path.write_text(json.dumps(info))
            connector = FcmPush(project_id=fake.project_id, credentials=path, base_url=fake.url, timeout=2)
            [result] = connector.send([push(1)])
        assert result.status is Status.RETRYABLE and not result.ambiguous
        assert "OAuth token" in result.reason
        assert self.provider_requests(fake) == []
