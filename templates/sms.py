"""SMS segment maths: how many segments a body is billed as (GSM 03.38 or UCS-2)."""

from __future__ import annotations

import math

# GSM 03.38: the basic set counts one septet, the extension set two; anything else means UCS-2.
GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿"
    "abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENDED = set("^{}\\[~]|€\f")
GSM7 = frozenset(GSM7_BASIC | GSM7_EXTENDED)


def sms_segments(text: str) -> int:
    """Segments an SMS body takes: GSM-7 (160 / 153 per part) or UCS-2 (70 / 67 per part)."""
    if not text:
        return 0
    chars = set(text)
    if chars <= GSM7:
        # One septet each, and one more for each character of the extension set.
        septets = len(text) + sum(text.count(ch) for ch in chars & GSM7_EXTENDED)
        return 1 if septets <= 160 else math.ceil(septets / 153)
    units = len(text.encode("utf-16-le")) // 2
    return 1 if units <= 70 else math.ceil(units / 67)
