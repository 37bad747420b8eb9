"""Meta custom audiences (/{audience_id}/users) against a fake server speaking its contract."""

from __future__ import annotations

import json

import pytest
from connector_contract import ConnectorContract
from connector_fakes import FakeMeta

from connectors import AudienceMember, ConnectorConfigError, Message, Status
from connectors.meta_audience import SCHEMA, MetaCustomAudience, hashed_row, normalize_phone

AUDIENCE_ID = "23850000000000001"


def member(i: int, **kwargs) -> AudienceMember:
    values = {
        "customer_id": i,
        "email": f" Customer{i}@Example.org ",
        "phone": f"+1555987{i:04d}",
        "first_name": "Mary-Ann",
        "last_name": "O'Neil",
    }
    values.update(kwargs)
    return AudienceMember(**values)


def ad(i: int, action: str = "add") -> Message:
    return Message(
        delivery_id=f"ad{i}",
        channel="ads",
        to="cart_retargeting",
        customer_id=i,
        action=action,
        member=member(i),
    )


class TestMetaCustomAudience(ConnectorContract):
    provider = "meta_audience"
    fake_class = FakeMeta
    batch_limit = 10_000
    channel = "ads"
    missing_setting = ({"ads_connector": "meta_audience"}, "OMNI_META_ACCESS_TOKEN")

    def make_connector(self, fake, base_url=None, timeout=5.0):
        return MetaCustomAudience(
            access_token=fake.access_token,
            audiences={"cart_retargeting": AUDIENCE_ID},
            base_url=base_url or fake.url,
            timeout=timeout,
        )

    def message(self, index: int) -> Message:
        return ad(index)

    def secrets(self, fake) -> list[str]:
        return [fake.access_token]

    def throttled(self, fake, retry_after: int) -> None:
        fake.script(
            429,
            {"error": {"message": "(#17) User request limit reached", "code": 17, "fbtrace_id": "x"}},
            {"Retry-After": str(retry_after)},
        )

    def permanent(self, fake) -> None:
        fake.script(
            400,
            {
                "error": {
                    "message": "(#100) Data is missing or does not match schema",
                    "type": "OAuthException",
                    "code": 100,
                    "fbtrace_id": "AbC123",
                }
            },
        )

    def revoked(self, fake) -> None:
        fake.script(
            400,
            {
                "error": {
                    "message": "Error validating access token: Session has expired",
                    "type": "OAuthException",
                    "code": 190,
                    "error_subcode": 463,
                    "fbtrace_id": "x",
                }
            },
        )

    def test_timeout_is_retryable_and_ambiguous(self, fake):
        # Overrides the contract: audience adds and removes are idempotent, so a timeout is never ambiguous.
        from connector_fakes import silent_server

        with silent_server() as url:
            [result] = self.make_connector(fake, base_url=url, timeout=0.05).send([ad(1)])
        assert result.status is Status.RETRYABLE and not result.ambiguous

    def test_hashing_matches_metas_check_values(self):
        row = hashed_row(AudienceMember(email=" Mary@Example.com ", phone="+1 (555) 987-6543"))
        assert row[0] == "f1904cf1a9d73a55fa5de0ac823c4403ded71afd4c3248d00bdcd0866552bb79"
        assert row[1] == "1ef970831d7963307784fa8688e8fce101a15685d62aa765fed23f3a2c576a4e"
        assert row[2:] == ["", ""]
        assert normalize_phone("+44 020 7946 0018") == "4402079460018"

    def test_add_request_field_by_field_with_no_raw_pii(self, fake, connector):
        results = connector.send([ad(1), ad(2)])
        assert [r.status for r in results] == [Status.SENT, Status.SENT]
        [seen] = fake.requests
        assert seen.method == "POST" and seen.path == f"/v25.0/{AUDIENCE_ID}/users"
        assert "access_token" not in seen.query  # never in a URL
        form = {k: v[0] for k, v in seen.form.items()}
        assert form["access_token"] == fake.access_token and "method" not in form
        payload, session = json.loads(form["payload"]), json.loads(form["session"])
        assert payload["schema"] == SCHEMA == ["EMAIL", "PHONE", "FN", "LN"]
        assert payload["data"][0] == hashed_row(member(1))
        assert all(len(v) == 64 for v in payload["data"][0])
        assert b"example.org" not in seen.body.lower() and b"5559870001" not in seen.body
        assert session["batch_seq"] == 1 and session["last_batch_flag"] is True and session["session_id"] > 0
        assert results[0].info["num_received"] == 2 and results[0].info["num_invalid_entries"] == 0

    def test_remove_uses_method_delete(self, fake, connector):
        report = connector.remove("cart_retargeting", [member(1)])
        assert report.results[0].status is Status.SENT
        assert fake.requests[0].form["method"] == ["DELETE"]
        assert fake.last_action == "remove"

    def test_num_invalid_entries_is_reported(self, fake, connector):
        report = connector.add("cart_retargeting", [member(1), AudienceMember(customer_id=2)])
        assert report.num_received == 2
        assert report.num_invalid_entries == 1

    def test_10000_rows_per_request(self, fake, connector):
        report = connector.add("cart_retargeting", [member(i) for i in range(10_001)])
        assert [len(json.loads(r.form["payload"][0])["data"]) for r in fake.requests] == [10_000, 1]
        assert report.num_received == 10_001 and report.requests == 2

    @pytest.mark.parametrize(
        ("error", "status"),
        [
            ({"code": 190, "message": "Invalid OAuth access token."}, Status.FAILED),
            ({"code": 100, "error_subcode": 1713230, "message": "flagged"}, Status.FAILED),
            ({"code": 200, "error_subcode": 1870090, "message": "terms not accepted"}, Status.FAILED),
            ({"code": 2, "message": "Service temporarily unavailable"}, Status.RETRYABLE),
            ({"code": 80004, "message": "too many calls"}, Status.RETRYABLE),
            ({"code": 613, "error_subcode": 1487742, "message": "too many calls"}, Status.RETRYABLE),
            ({"code": 99, "is_transient": True, "message": "transient"}, Status.RETRYABLE),
            ({"code": 2650, "error_subcode": 1870145, "message": "audience busy"}, Status.RETRYABLE),
            ({"code": 2650, "error_subcode": 1870147, "message": "bad seq"}, Status.FAILED),
        ],
    )
    def test_classified_by_code_not_http_status(self, fake, connector, error, status):
        fake.script(400, {"error": {**error, "type": "OAuthException", "fbtrace_id": "x"}})
        [result] = connector.send([ad(1)])
        assert result.status is status

    def test_business_use_case_wait_is_honoured(self, fake, connector):
        usage = json.dumps(
            {"123": [{"type": "ads_management", "call_count": 100, "estimated_time_to_regain_access": 3}]}
        )
        fake.script(
            400, {"error": {"code": 80004, "message": "too many calls"}}, {"X-Business-Use-Case-Usage": usage}
        )
        [result] = connector.send([ad(1)])
        assert result.status is Status.RETRYABLE and result.retry_after == 180

    def test_unmapped_audience_is_a_configuration_error(self, connector):
        with pytest.raises(ConnectorConfigError, match="OMNI_META_AUDIENCES"):
            connector.add("unknown_audience", [member(1)])

    def test_an_expired_token_halts_before_the_other_audiences(self, fake):
        from connector_contract import FAST, Sleeps

        from connectors import send_batch

        connector = MetaCustomAudience(
            access_token="EAAB-expired",
            audiences={"cart_retargeting": AUDIENCE_ID, "vip": "23850000000000002"},
            base_url=fake.url,
        )
        vip = Message(delivery_id="v1", channel="ads", to="vip", action="add", member=member(9))
        report = send_batch(connector, [ad(1), ad(2, "remove"), vip], policy=FAST, sleep=Sleeps())
        assert len(fake.requests) == 1
        assert report.halted and "190" in report.halted
        assert [r.status for r in report.results] == [Status.RETRYABLE] * 3

    def test_a_5xx_is_retried_at_least_once(self, fake, connector):
        from connector_contract import FAST, Sleeps

        from connectors import send_batch

        fake.script(500, {"error": {"message": "An unknown error occurred", "code": 1, "is_transient": True}})
        report = send_batch(connector, [ad(1)], policy=FAST, sleep=Sleeps())
        assert report.results[0].status is Status.SENT and len(fake.requests) == 2
