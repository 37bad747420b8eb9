"""Local fake provider servers (pytest-httpserver) speaking each real contract (contracts/PROVIDERS.md).

Each fake validates what a real provider validates, answers with the documented success and error
bodies, and records every request (``fake.requests``) so tests check the request field by field.
``fake.script(status, body, headers)`` queues a canned answer for the next request (429, 500 ...).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
import socket
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from werkzeug import Request, Response


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    query: dict[str, str]
    form: dict[str, list[str]] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


class Fake:
    def __init__(self, httpserver) -> None:
        self.server = httpserver
        self.requests: list[Seen] = []
        self._script: deque[Response] = deque()
        self._ids = itertools.count(1)
        httpserver.expect_request(re.compile(".*")).respond_with_handler(self._handle)

    @property
    def url(self) -> str:
        return self.server.url_for("").rstrip("/")

    def script(self, status: int, body: Any = None, headers: dict | None = None) -> None:
        data = json.dumps(body) if body is not None and not isinstance(body, bytes | str) else body
        self._script.append(
            Response(data or b"", status=status, headers=headers or {}, content_type="application/json")
        )

    def _handle(self, request: Request) -> Response:
        body = request.get_data()
        form = {}
        if (request.content_type or "").startswith("application/x-www-form-urlencoded"):
            form = parse_qs(body.decode(), keep_blank_values=True)
        seen = Seen(
            request.method,
            request.path,
            {k.lower(): v for k, v in request.headers.items()},
            body,
            dict(request.args),
            form,
        )
        self.requests.append(seen)
        if self._script and self.scriptable(seen):
            return self._script.popleft()
        return self.answer(seen)

    def scriptable(self, seen: Seen) -> bool:
        return True

    def answer(self, seen: Seen) -> Response:  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def json_response(status: int, body: Any, headers: dict | None = None) -> Response:
        return Response(
            json.dumps(body), status=status, headers=headers or {}, content_type="application/json"
        )


# --- SendGrid v3 Mail Send -------------------------------------------------------------------------


class FakeSendGrid(Fake):
    api_key = "SG.test-key-0123456789"

    def answer(self, seen: Seen) -> Response:
        def error(status: int, message: str, field_: str | None = None) -> Response:
            return self.json_response(
                status, {"errors": [{"message": message, "field": field_, "help": None}]}
            )

        if seen.path != "/v3/mail/send" or seen.method != "POST":
            return error(404, "not found")
        if seen.headers.get("authorization") != f"Bearer {self.api_key}":
            return error(401, "The provided authorization grant is invalid, expired, or revoked")
        if not seen.headers.get("content-type", "").startswith("application/json"):
            return error(415, "Content-Type should be application/json.")
        body = seen.json()
        personalizations = body.get("personalizations") or []
        if not 1 <= len(personalizations) <= 1000:
            return error(
                400, "The personalization block is limited to 1000 personalizations per API request."
            )
        if "from" not in body or "email" not in body["from"]:
            return error(400, "The from object must be provided for every email send.", "from")
        if not body.get("content") and not body.get("template_id"):
            return error(
                400, "Unless a valid template_id is provided, the content parameter is required.", "content"
            )
        if len(body.get("categories") or []) > 10:
            return error(400, "You may not have more than 10 categories per request.", "categories")
        seen_addresses: set[str] = set()
        recipients = 0
        for index, p in enumerate(personalizations):
            for kind in ("to", "cc", "bcc"):
                for address in p.get(kind) or []:
                    recipients += 1
                    email = address.get("email", "")
                    if "@" not in email:
                        return error(
                            400, "Does not contain a valid address.", f"personalizations.{index}.to.0.email"
                        )
                    if email.lower() in seen_addresses:
                        return error(400, "Each unique email address should only be included once.")
                    seen_addresses.add(email.lower())
            if not all(isinstance(v, str) for v in (p.get("custom_args") or {}).values()):
                return error(
                    400, "custom_args values must be strings", f"personalizations.{index}.custom_args"
                )
        if recipients > 1000:
            return error(400, "There is a limit of 1000 total recipients (to + cc + bcc) per request.")
        sandbox = (((body.get("mail_settings") or {}).get("sandbox_mode") or {}).get("enable")) is True
        message_id = f"msg{next(self._ids):06d}SGfake"
        return Response(b"", status=200 if sandbox else 202, headers={"X-Message-Id": message_id})


# --- Twilio Messages -------------------------------------------------------------------------------


class FakeTwilio(Fake):
    account_sid = "AC" + "0" * 32
    auth_token = "twilio-auth-token-secret"

    def answer(self, seen: Seen) -> Response:
        def error(status: int, code: int, message: str) -> Response:
            more = f"https://www.twilio.com/docs/errors/{code}"
            return self.json_response(
                status, {"code": code, "message": message, "more_info": more, "status": status}
            )

        expected = f"/2010-04-01/Accounts/{self.account_sid}/Messages.json"
        if seen.path != expected or seen.method != "POST":
            return error(404, 20404, "The requested resource was not found")
        auth = "Basic " + base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if seen.headers.get("authorization") != auth:
            return error(401, 20003, "Authentication Error - invalid username")
        to = (seen.form.get("To") or [""])[0]
        if not seen.form.get("From") and not seen.form.get("MessagingServiceSid"):
            return error(400, 21603, "A 'From' or 'MessagingServiceSid' parameter is required")
        body = (seen.form.get("Body") or [""])[0]
        if to == "+15005550001" or not re.match(r"^\+[1-9]\d{6,14}$", to):
            return error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if to == "+15005550004":
            return error(400, 21610, "Attempt to send to unsubscribed recipient")
        if to == "+15005550003":
            return error(400, 21408, "Permission to send an SMS has not been enabled for the region")
        sid = f"SM{next(self._ids):032x}"
        return self.json_response(
            201,
            {
                "sid": sid,
                "account_sid": self.account_sid,
                "to": to,
                "from": (seen.form.get("From") or [None])[0],
                "messaging_service_sid": (seen.form.get("MessagingServiceSid") or [None])[0],
                "body": body,
                "status": "queued",
                "num_segments": "1",
                "direction": "outbound-api",
                "error_code": None,
                "date_created": "Tue, 02 Jun 2026 10:00:00 +0000",
            },
        )


# --- Meta custom audience users --------------------------------------------------------------------


class FakeMeta(Fake):
    access_token = "EAAB-meta-system-user-token"
    version = "v25.0"

    def answer(self, seen: Seen) -> Response:
        def error(code: int, message: str, subcode: int | None = None, status: int = 400) -> Response:
            err = {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "AbC123"}
            if subcode:
                err["error_subcode"] = subcode
            return self.json_response(status, {"error": err})

        match = re.fullmatch(rf"/{self.version}/(\d+)/users", seen.path)
        if not match:
            return error(100, "Unsupported post request.")
        params = {**{k: v[0] for k, v in seen.form.items()}, **seen.query}  # query and body both count
        if params.get("access_token") != self.access_token:
            return error(190, "Invalid OAuth access token.")
        try:
            payload = json.loads(params["payload"])
            session = json.loads(params["session"])
        except (KeyError, ValueError):
            return error(100, "(#100) Data is missing or does not match schema")
        schema, data = payload.get("schema"), payload.get("data")
        if not isinstance(schema, list) or not isinstance(data, list) or not data:
            return error(100, "(#100) Data is missing or does not match schema")
        if len(data) > 10_000:
            return error(100, "(#100) Too many users in one request (max 10000)")
        if not (isinstance(session.get("session_id"), int) and session["session_id"] > 0):
            return error(100, "(#100) session_id must be a positive integer")
        invalid = 0
        for row in data:
            if len(row) != len(schema):
                return error(100, "(#100) Data is missing or does not match schema")
            if not any(row) or any(v and not re.fullmatch(r"[0-9a-f]{64}", v) for v in row):
                invalid += 1
        self.last_action = "remove" if params.get("method") == "DELETE" or seen.method == "DELETE" else "add"
        return self.json_response(
            200,
            {
                "audience_id": match.group(1),
                "session_id": str(session["session_id"]),
                "num_received": len(data),
                "num_invalid_entries": invalid,
                "invalid_entry_samples": {},
            },
        )


# --- FCM HTTP v1 and the OAuth token endpoint ------------------------------------------------------


class FakeFcm(Fake):
    project_id = "shop-test"
    client_email = "omni@shop-test.iam.gserviceaccount.com"

    def __init__(self, httpserver) -> None:
        super().__init__(httpserver)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.issued: list[str] = []
        self.unregistered = {"dead-token"}

    def credentials(self) -> dict:
        from cryptography.hazmat.primitives import serialization

        pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": "kid-1",
            "private_key": pem,
            "client_email": self.client_email,
            "token_uri": self.url + "/token",
        }

    def scriptable(self, seen: Seen) -> bool:
        return seen.path != "/token"  # canned answers are for the messages endpoint

    def _check_jwt(self, assertion: str) -> bool:
        try:
            head, claims, signature = assertion.split(".")
            self.key.public_key().verify(
                base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)),
                f"{head}.{claims}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
            payload = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
        except Exception:  # noqa: BLE001
            return False
        return (
            payload.get("iss") == self.client_email
            and payload.get("scope") == "https://www.googleapis.com/auth/firebase.messaging"
            and payload.get("aud") == self.url + "/token"
        )

    def answer(self, seen: Seen) -> Response:
        if seen.path == "/token":
            form = {k: v[0] for k, v in seen.form.items()}
            if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" or not self._check_jwt(
                form.get("assertion", "")
            ):
                return self.json_response(400, {"error": "invalid_grant", "error_description": "Invalid JWT"})
            token = f"ya29.fake-access-token-{next(self._ids)}"
            self.issued.append(token)
            return self.json_response(
                200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}
            )

        def error(status: int, canonical: str, code: str | None, message: str) -> Response:
            details = (
                [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]
                if code
                else []
            )
            return self.json_response(
                status,
                {"error": {"code": status, "message": message, "status": canonical, "details": details}},
            )

        if seen.path != f"/v1/projects/{self.project_id}/messages:send" or seen.method != "POST":
            return error(404, "NOT_FOUND", None, "Requested entity was not found.")
        auth = seen.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.issued[-1:]:
            return error(401, "UNAUTHENTICATED", None, "Request had invalid authentication credentials.")
        message = seen.json().get("message") or {}
        if sum(1 for k in ("token", "topic", "condition") if k in message) != 1:
            return error(
                400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "exactly one of token, topic, condition"
            )
        if not all(isinstance(v, str) for v in (message.get("data") or {}).values()):
            return error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "data values must be strings")
        if message.get("token") in self.unregistered:
            return error(404, "NOT_FOUND", "UNREGISTERED", "Requested entity was not found.")
        return self.json_response(
            200, {"name": f"projects/{self.project_id}/messages/0:{next(self._ids)}%abc"}
        )


# --- webhook receiver ------------------------------------------------------------------------------


class FakeWebhook(Fake):
    secret = "whsec-test-secret-value"

    def answer(self, seen: Seen) -> Response:
        timestamp = seen.headers.get("x-omni-timestamp", "")
        expected = (
            "v1="
            + hmac.new(self.secret.encode(), f"{timestamp}.".encode() + seen.body, hashlib.sha256).hexdigest()
        )
        if not hmac.compare_digest(expected, seen.headers.get("x-omni-signature", "")):
            return self.json_response(401, {"error": "bad signature"})
        return self.json_response(200, {"id": f"wh-{next(self._ids)}"})


# --- network failures ------------------------------------------------------------------------------


def refused_url() -> str:
    """A URL on a local port nothing listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


@contextmanager
def silent_server() -> Iterator[str]:
    """A local port that accepts connections (the kernel's backlog) but never answers: a read timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# --- ambiguous answers: the request reached the server, the answer did not reach the client ---------


class RawServer:
    """A bare HTTP/1.1 server on a local port that reads each request in full (headers and
    ``Content-Length`` body), records it, then, by ``mode``:

    - ``"drop"``: closes the socket without answering (the connection dropped after the request was read);
    - ``"reset"``: resets the connection (TCP RST) without answering;
    - ``"late"``: answers ``late_status`` only after ``delay`` seconds (after the client's timeout);
    - ``"redirect"``: answers ``302`` with ``Location: <location>``.

    ``requests`` holds ``(request line, headers dict, body)`` per request read.
    """

    def __init__(
        self,
        mode: str = "drop",
        *,
        delay: float = 0.5,
        late_status: int = 200,
        late_body: bytes = b"{}",
        location: str = "",
    ) -> None:
        self.mode, self.delay, self.late_status, self.late_body = mode, delay, late_status, late_body
        self.location = location
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> tuple[str, dict[str, str], bytes] | None:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return lines[0], headers, body

    def _handle(self, conn: socket.socket) -> None:
        import struct
        import time

        try:
            request = self._read(conn)
            if request is None:
                return
            self.requests.append(request)
            if self.mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif self.mode == "late":
                time.sleep(self.delay)
                conn.sendall(
                    f"HTTP/1.1 {self.late_status} OK\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(self.late_body)}\r\nConnection: close\r\n\r\n".encode()
                    + self.late_body
                )
            elif self.mode == "redirect":
                conn.sendall(
                    f"HTTP/1.1 302 Found\r\nLocation: {self.location}\r\nContent-Length: 0\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
        except OSError:
            pass
        finally:
            conn.close()

    def seen(self, at_least: int = 1, timeout: float = 3.0) -> int:
        """The number of requests read, once at least ``at_least`` were (or ``timeout`` passed): the
        client may give up before this server's thread has read what the kernel already holds."""
        import time

        deadline = time.monotonic() + timeout
        while len(self.requests) < at_least and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        return len(self.requests)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
