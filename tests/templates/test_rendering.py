"""Rendering the flagship templates for real customers of the store, and the sandbox's guarantees."""

from __future__ import annotations

import pytest
from pydantic import SecretStr
from template_kit import NOW, SETTINGS, seed

from omni.core.settings import Settings
from profiles.db import session_scope
from sequences.contexts import messages_of, render, render_many
from sequences.unsubscribe import (
    InvalidToken,
    ensure_unsubscribe_secret,
    make_token,
    unsubscribe_secret,
    verify_token,
)
from templates.rendering import RenderError, list_templates, render_context
from templates.sms import sms_segments

FLAGSHIP = ["email/abandoned_cart", "email/pickup_ready", "push/pickup_reminder", "sms/pickup_reminder"]


def test_flagship_templates_are_listed():
    names = [t.name for t in list_templates()]
    assert set(FLAGSHIP) <= set(names)  # the flagship journey's; campaigns ship more
    parts = {t.name: t.parts for t in list_templates()}
    assert parts["email/abandoned_cart"] == ("subject", "html", "txt")
    assert parts["push/pickup_reminder"] == ("title", "body")


def test_abandoned_cart_email_for_a_real_customer(engine, customer_id):
    with session_scope(engine) as session:
        r = render(session, "email/abandoned_cart", customer_id, now=NOW, settings=SETTINGS)
    assert r.recipients == ["u-ana@example.org"]
    assert r.subject == "Ana, you left 3 items in your cart"
    assert "Tee x 2: $39.00" in r.text and "Socks: $5.00" in r.text and "Total: $44.00" in r.text
    assert "Tee &times; 2" in r.html and "$44.00" in r.html
    assert "Omni SoHo" in r.html and "Open today: 09:00-20:00" in r.html  # Tuesday in New York
    assert "utm_source=omni&amp;utm_medium=email&amp;utm_campaign=abandoned_cart" in r.html
    assert r.unsubscribe_url.startswith("http://localhost:8000/unsubscribe?token=")
    assert r.unsubscribe_url.replace("&", "&amp;") in r.html or r.unsubscribe_url in r.html
    [message] = messages_of(r, "enrollment:1:cart_email")
    assert message.to == "u-ana@example.org" and message.unsubscribe_url == r.unsubscribe_url


def test_pickup_messages_for_a_real_customer(engine, customer_id):
    with session_scope(engine) as session:
        email = render(session, "email/pickup_ready", customer_id, now=NOW, settings=SETTINGS)
        sms = render(session, "sms/pickup_reminder", customer_id, now=NOW, settings=SETTINGS)
        push = render(session, "push/pickup_reminder", customer_id, now=NOW, settings=SETTINGS)
    assert email.subject == "Your order o-u-ana is ready for pickup at Omni SoHo"
    assert "Tuesday: 09:00-20:00" in email.text
    assert sms.text == (
        "Omni Shop: Ana, your order o-u-ana is ready for pickup at Omni SoHo (open today 09:00-20:00). "
        "Reply STOP to opt out."
    )
    assert sms.recipients == ["+14155550100"] and sms.sms_segments == 1 and sms.warnings == []
    assert push.title == "Your order is ready for pickup"
    assert push.text == "Order o-u-ana at Omni SoHo, open today 09:00-20:00."
    assert push.recipients == ["fcm-token-1"]


def test_missing_data_fails_loudly_per_customer(engine):
    ana = seed(engine)
    bob = seed(engine, user_id="u-bob", first_name=None, token=None, phone="+14155550199")
    with session_scope(engine) as session:
        outcomes = render_many(
            session, "push/pickup_reminder", [ana, bob, 999_999], now=NOW, settings=SETTINGS
        )
    assert outcomes[ana].title
    assert isinstance(outcomes[bob], RenderError) and "no device token" in str(outcomes[bob])
    assert isinstance(outcomes[999_999], RenderError) and "no such customer" in str(outcomes[999_999])


def test_no_open_cart_is_a_clear_error(engine):
    from profiles.ingest import ingest_payloads

    ingest_payloads(
        engine,
        [
            {
                "type": "identify",
                "userId": "u-c",
                "messageId": "c1",
                "timestamp": "2026-06-01T00:00:00Z",
                "traits": {"email": "c@example.org", "first_name": "Cy"},
            }
        ],
        now=NOW,
    )
    from profiles.lookup import resolve_customer_key

    with session_scope(engine) as session:
        customer = resolve_customer_key(session, "u-c")
        with pytest.raises(
            RenderError, match=r"cannot render email/abandoned_cart for customer \d+: .*'cart' is undefined"
        ):
            render(session, "email/abandoned_cart", customer, now=NOW, settings=SETTINGS)


def test_a_missing_first_name_never_renders_blank(tmp_path):
    (tmp_path / "sms").mkdir()
    (tmp_path / "sms" / "hello.txt.j2").write_text("Hi {{ customer.first_name }}!")
    with pytest.raises(RenderError, match="first_name"):
        render_context("sms/hello", {"customer": {"id": 1}}, directory=tmp_path)
    assert (
        render_context("sms/hello", {"customer": {"id": 1, "first_name": "Ana"}}, directory=tmp_path).text
        == "Hi Ana!"
    )


def test_customer_data_is_html_escaped(engine):
    customer = seed(engine, user_id="u-x", first_name='<script>alert("x")</script>', phone="+14155550188")
    with session_scope(engine) as session:
        r = render(session, "email/abandoned_cart", customer, now=NOW, settings=SETTINGS)
    assert "<script>" not in r.html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in r.html
    assert '<script>alert("x")</script>' in r.text  # plain text is not HTML


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ customer.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{% set x = [].append.__self__ %}{{ x.__class__ }}",
    ],
)
def test_sandbox_escapes_are_blocked(tmp_path, source):
    (tmp_path / "sms").mkdir()
    (tmp_path / "sms" / "evil.txt.j2").write_text(source)
    with pytest.raises(RenderError, match="unsafe template|missing data|template error"):
        render_context("sms/evil", {"customer": {"id": 1}}, directory=tmp_path)


def test_sms_segments_and_warning(tmp_path):
    assert sms_segments("a" * 160) == 1 and sms_segments("a" * 161) == 2
    assert sms_segments("{" * 80) == 1 and sms_segments("{" * 81) == 2  # extension chars count twice
    assert sms_segments("é" * 10 + "ł") == 1 and sms_segments("ł" * 71) == 2  # UCS-2
    (tmp_path / "sms").mkdir()
    (tmp_path / "sms" / "long.txt.j2").write_text("x" * 200)
    (tmp_path / "sms" / "huge.txt.j2").write_text("x" * 1601)
    rendered = render_context("sms/long", {"customer": {"id": 1}}, directory=tmp_path)
    assert rendered.sms_segments == 2 and "2 segments" in rendered.warnings[0]
    with pytest.raises(RenderError, match="over 1600"):
        render_context("sms/huge", {"customer": {"id": 1}}, directory=tmp_path)


def test_unknown_template():
    with pytest.raises(RenderError, match="no such template"):
        render_context("email/nope", {"customer": {"id": 1}})


def test_unsubscribe_token_round_trip_and_tampering():
    token = make_token("s3cret", 42, "email")
    assert verify_token("s3cret", token) == (42, "email")
    payload, signature = token.split(".")
    forged = make_token("s3cret", 43, "email").split(".")[0] + "." + signature
    for bad in (forged, token + "x", payload, "", "a.b.c", token.replace(signature[:4], "AAAA")):
        with pytest.raises(InvalidToken):
            verify_token("s3cret", bad)
    with pytest.raises(InvalidToken):
        verify_token("other-secret", token)


def test_generated_secret_is_created_once_and_used_for_links(engine, customer_id):
    with session_scope(engine) as session:
        ensure_unsubscribe_secret(session)
    with session_scope(engine) as session:
        first = unsubscribe_secret(session, Settings()).get_secret_value()
        ensure_unsubscribe_secret(session)
        assert unsubscribe_secret(session, Settings()).get_secret_value() == first
        url = render(session, "email/abandoned_cart", customer_id, now=NOW, settings=SETTINGS).unsubscribe_url
    assert verify_token(first, url.split("token=")[1]) == (customer_id, "email")


def test_configured_secret_wins(engine, customer_id):
    settings = Settings(
        unsubscribe_secret=SecretStr("from-the-env"), unsubscribe_base_url="https://shop.example/u"
    )
    with session_scope(engine) as session:
        url = render(session, "email/abandoned_cart", customer_id, now=NOW, settings=settings).unsubscribe_url
    assert url.startswith("https://shop.example/u?token=")
    assert verify_token("from-the-env", url.split("token=")[1]) == (customer_id, "email")


ATTRIBUTE_LOOKUPS = [
    "{{ customer.first_name }} {{ customer['first_name'] }} {{ customer.get('first_name') }}",
    "{{ customer.missing is defined }} {{ customer.missing | default('none') }}",
    "{{ cart['items'] | length }} {{ cart.items is callable }} {{ cart.keys() | list | length }}",
    "{{ cart['items'][0].name }} {{ cart['items'][0]['price'] | money(cart.currency) }}",
    "{{ customer.__class__ is defined }} {{ now.year }} {{ range(3) | list }}",
    "{% set ns = namespace(total=0) %}{% for i in cart['items'] %}{% set ns.total = ns.total + i.price %}"
    "{% endfor %}{{ ns.total }} {{ cycler('a', 'b').next() }}",
]


@pytest.mark.parametrize("source", ATTRIBUTE_LOOKUPS)
def test_attribute_lookups_render_as_in_jinjas_own_sandbox(tmp_path, source):
    """The environment reads plain dicts' keys without going through an exception first, and keeps
    template globals in a plain dict: both must render exactly what Jinja's sandbox renders."""
    from datetime import datetime

    from jinja2 import FileSystemLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    from templates.filters import money
    from templates.sandbox import environment

    stock = SandboxedEnvironment(loader=FileSystemLoader(str(tmp_path)), undefined=StrictUndefined)
    stock.filters["money"] = money
    context = {
        "customer": {"id": 1, "first_name": "Ana"},
        "cart": {"items": [{"name": "Tee", "price": 19.5}], "currency": "USD"},
        "now": datetime(2026, 6, 2),
    }
    ours = environment(tmp_path).from_string(source).render(context)
    assert ours == stock.from_string(source).render(context)


def test_a_missing_key_fails_as_in_jinjas_own_sandbox(tmp_path):
    from jinja2 import StrictUndefined, UndefinedError
    from jinja2.sandbox import SandboxedEnvironment

    from templates.sandbox import environment

    source = "{{ customer.nickname }}"
    with pytest.raises(UndefinedError) as ours:
        environment(tmp_path).from_string(source).render({"customer": {"id": 1}})
    with pytest.raises(UndefinedError) as stock:
        SandboxedEnvironment(undefined=StrictUndefined).from_string(source).render({"customer": {"id": 1}})
    assert ours.value.message == stock.value.message == "'dict object' has no attribute 'nickname'"


def test_a_template_changing_the_store_does_not_change_the_next_customers_message(engine, tmp_path):
    """Store details are built once per batch: each customer still gets a copy of their own."""
    ana = seed(engine)
    bob = seed(engine, user_id="u-bob", phone="+14155550199")
    (tmp_path / "sms").mkdir()
    (tmp_path / "sms" / "meddling.txt.j2").write_text(
        "{{ store.name }} {{ store.opening_hours | length }} {{ store.hours | length }}"
        "{% set _ = store.update({'name': 'X'}) %}{% set _ = store.opening_hours.pop() %}"
        "{% set _ = store.hours.clear() %}"
    )
    with session_scope(engine) as session:
        outcomes = render_many(
            session, "sms/meddling", [ana, bob], now=NOW, settings=Settings(templates_dir=tmp_path)
        )
    assert [outcomes[c].text for c in (ana, bob)] == ["Omni SoHo 7 4", "Omni SoHo 7 4"]


def test_the_open_cart_is_used_not_an_earlier_converted_one(engine):
    from profiles.ingest import ingest_payloads

    customer = seed(engine, user_id="u-dee", phone="+14155550177")
    ingest_payloads(
        engine,
        [
            {
                "type": "track",
                "userId": "u-dee",
                "event": "Order Completed",
                "messageId": "dee-buy",
                "timestamp": "2026-06-01T12:00:00Z",
                "properties": {"order_id": "o-dee-2", "total": 44.0},
            },
            {
                "type": "track",
                "userId": "u-dee",
                "event": "Product Added",
                "messageId": "dee-add",
                "timestamp": "2026-06-01T13:00:00Z",
                "properties": {"product_id": "p3", "name": "Cap", "price": 12, "quantity": 1},
            },
        ],
        now=NOW,
    )
    with session_scope(engine) as session:
        r = render(session, "email/abandoned_cart", customer, now=NOW, settings=SETTINGS)
    assert r.subject == "Ana, you left 1 item in your cart"
    assert "- Cap: $12.00" in r.text and "Tee" not in r.text


def test_sms_segments_count_extension_characters_twice():
    assert sms_segments("€" + "a" * 158) == 1 and sms_segments("€" + "a" * 159) == 2
    assert sms_segments("\f" * 80) == 1 and sms_segments("^a" * 54) == 2  # 162 septets
    assert sms_segments("€" * 80) == 1 and sms_segments("€" * 80 + "a") == 2
    assert sms_segments("a" * 153 * 3) == 3 and sms_segments("a" * (153 * 3 + 1)) == 4
