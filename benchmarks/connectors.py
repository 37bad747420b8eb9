"""Benchmark: emails through the ``sendgrid`` connector to a local fake SendGrid (stdlib http.server).

Sends N personalised emails (default 100,000; each with its own subject, HTML and text parts and
unsubscribe header) batched (1000 personalizations per request, the shared ``send_batch`` loop), then
the same kind of messages one request per message (default the first 5,000; ``--per-message N``), and
prints messages/s and requests made for both, and the ratios.

    .venv/bin/python benchmarks/connectors.py [--messages 100000] [--per-message 5000] [--json]

Targets (issue 4): ≥ 5,000 messages/s batched and ≥ 50× fewer requests than one request per message.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connectors import Message, RetryPolicy, send_batch  # noqa: E402
from connectors.sendgrid_email import SendGridEmail  # noqa: E402

API_KEY = "SG.benchmark-key"


class FakeSendGrid(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests = 0
    personalizations = 0
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ok = self.path == "/v3/mail/send" and self.headers.get("Authorization") == f"Bearer {API_KEY}"
        count = len(json.loads(body).get("personalizations") or []) if ok else 0
        with FakeSendGrid.lock:
            FakeSendGrid.requests += 1
            FakeSendGrid.personalizations += count
            number = FakeSendGrid.requests
        if not ok or not 1 <= count <= 1000:
            payload = b'{"errors":[{"message":"bad request","field":null,"help":null}]}'
            self.send_response(401 if not ok else 400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        self.send_response(202)
        self.send_header("X-Message-Id", f"bench{number:08d}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


def messages(count: int, start: int = 0) -> list[Message]:
    html = (
        "<!DOCTYPE html><html><body><p>Hi {name},</p><p>You left these in your cart:</p><table>"
        + "".join(f"<tr><td>Item {i}</td><td>$19.50</td></tr>" for i in range(8))
        + "</table><p><a href='https://shop.example.com/cart?utm_source=omni'>Complete your order</a></p>"
        "<p><a href='https://shop.example.com/u?token={token}'>Unsubscribe</a></p></body></html>"
    )
    return [
        Message(
            delivery_id=f"enrollment:{i}:cart_email",
            channel="email",
            to=f"customer{i}@example.org",
            customer_id=i,
            template="email/abandoned_cart",
            subject=f"Customer {i}, you left 8 items in your cart",
            html=html.format(name=f"Customer {i}", token=f"tok{i}"),
            text=f"Hi Customer {i}, you left 8 items in your cart: https://shop.example.com/cart",
            unsubscribe_url=f"https://shop.example.com/u?token=tok{i}",
            categories=("email_abandoned_cart",),
        )
        for i in range(start, start + count)
    ]


def run(count: int, per_message: int) -> dict:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSendGrid)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    connector = SendGridEmail(api_key=API_KEY, email_from="Omni Shop <news@shop.example>", base_url=url)
    try:
        batch = messages(count)
        started = time.perf_counter()
        report = send_batch(connector, batch, policy=RetryPolicy(attempts_per_send=1))
        batched_seconds = time.perf_counter() - started
        batched_requests = FakeSendGrid.requests
        assert len(report.sent) == count, report.counts()

        single = messages(per_message, start=count)
        FakeSendGrid.requests = 0
        started = time.perf_counter()
        for message in single:
            [result] = connector.send([message])
            assert result.status.value == "sent", result.reason
        single_seconds = time.perf_counter() - started
        single_requests = FakeSendGrid.requests
    finally:
        server.shutdown()
        server.server_close()
    batched_rate = count / batched_seconds
    single_rate = per_message / single_seconds
    return {
        "messages": count,
        "batched": {
            "seconds": round(batched_seconds, 2),
            "messages_per_s": round(batched_rate),
            "requests": batched_requests,
        },
        "one_request_per_message": {
            "messages": per_message,
            "seconds": round(single_seconds, 2),
            "messages_per_s": round(single_rate),
            "requests": single_requests,
            "requests_for_all": count,
        },
        "speedup": round(batched_rate / single_rate, 1),
        "fewer_requests": round(count / batched_requests, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--per-message", type=int, default=5_000, help="messages sent one request each")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = run(args.messages, args.per_message)
    if args.json:
        print(json.dumps(figures))
        return
    b, s = figures["batched"], figures["one_request_per_message"]
    print(f"sendgrid connector, {figures['messages']:,} personalised emails to a local fake SendGrid")
    print(
        f"  batched (1000 per request):  {b['messages_per_s']:>8,} messages/s  {b['requests']:>7,} requests"
        f"  {b['seconds']} s"
    )
    print(
        f"  one request per message:     {s['messages_per_s']:>8,} messages/s  {s['requests']:>7,} requests"
        f" for {s['messages']:,} ({s['requests_for_all']:,} for all)  {s['seconds']} s"
    )
    print(f"  batched is {figures['speedup']}x faster with {figures['fewer_requests']}x fewer requests")


if __name__ == "__main__":
    main()
