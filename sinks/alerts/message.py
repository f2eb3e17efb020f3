"""What an alert says to a store manager: one pure function per channel format, no I/O.

A manager reads it on a phone between two customers, so it leads with *what* happened and *where*
(store, lane), then *when* in the store's local time, the amount, the outcome and the reasons in plain
words, the face similarity for watchlist matches (with the threshold it was matched at), and a link to the
dashboard for the rest. Reason codes the wording table does not know are shown as they are (a new rule must not
make an alert unreadable).

Every alert opens a case (``jobs.cases``, its id :func:`~schemas.records.case_id_for` the alert id): each
format names it and links its page (``CG_ALERTS__CASE_LINK``), where a person confirms or dismisses it; the
Webex card (:func:`case_card`) shows the live snapshot beside the enrolled reference image with Confirm and
Dismiss buttons, which the bot turns into the same signed commands as ``confirm <case>`` / ``dismiss <case>``.
"""

from __future__ import annotations

import hashlib
import json
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from infra.settings import AlertSettings
from infra.signed_links import image_link
from schemas.money import money
from schemas.records import ALL_STORES, FACE_ALERT_KINDS, OUTCOME_WORDS, REKOGNITION_MATCHER, case_id_for
from schemas.similarity import category_words, similarity_text, threshold_text

REASON_WORDS: dict[str, str] = {
    "return_exceeds_sale": "refund is larger than the original sale",
    "return_unknown_receipt": "the receipt is not one we issued",
    "return_currency_mismatch": "refund in another currency than the sale",
    "customer_mismatch": "returned by someone other than the buyer",
    "buyer_face_mismatch": "the returner's face may not be the buyer's",
    "velocity_exceeded": "too many transactions by this customer in a short time",
    "return_without_receipt": "return without a receipt",
    "amount_above_norm": "amount far above this customer's usual",
    "suspicious_timing": "return at another store soon after the purchase",
    "no_photo_verification": "no face photo could be taken at the lane",
    "high_value_item": "high-value item",
    "cross_store_return": "returned at a different store than bought",
    "store_return_burst": "unusual burst of returns at this store",
    "new_store_for_customer": "customer's first visit to this store",
    "watchlist_suspect": "face resembles a person on the suspect watchlist",
    "watchlist_vip": "face resembles a VIP on the watchlist",
    "unknown_currency": "paid in a currency code we do not know",
    "first_seen": "a customer never seen before",
    "lane_view_after_the_sale_not_its_buyer": "seen in the lane's live view after the sale, so not its buyer",
    "face_seen_after_the_sale_was_decided": "the face came only after the sale was decided without it",
}
"""Every reason a rule set may weigh (``jobs.scoring.rules.KNOWN_INDICATORS``) or the scoring job gives a watch-list
alert, in words (a test holds them to it): "unknown currency", "lane view after the sale not its buyer" left the
guard to guess."""
_WINDOWS = {"1h": "the last hour", "24h": "the last 24 hours", "7d": "the last 7 days"}
FEATURE_WORDS: dict[str, str] = {
    "score": "the model's risk score",
    "amount_log": "transaction amount",
    "item_count": "number of items",
    "line_count": "number of receipt lines",
    "max_unit_price_log": "highest item price",
    "is_return": "share of returns",
    "has_receipt_ref": "returns with a receipt",
    "has_card": "card payments",
    "has_email": "transactions with an e-mail address",
    "has_customer_id": "transactions with a customer id",
    "velocity": "transactions per customer in a short time",
    "velocity_exceeded": "customers over the velocity limit",
    "amount_zscore": "amount against the customer's usual",
    "amount_above_norm": "amounts far above the customer's usual",
    "first_seen": "customers never seen before",
    "new_store_for_customer": "customers' first visits to a store",
    "seconds_since_sale": "time from a sale to its return",
    "cross_store_return": "returns at another store than bought",
    "customer_mismatch": "returns by someone other than the buyer",
    "suspicious_timing": "returns at another store soon after the purchase",
    "return_without_receipt": "returns without a receipt",
    "return_unknown_receipt": "returns of receipts we did not issue",
    "return_exceeds_sale": "refunds larger than their sale",
    "store_returns_in_window": "returns per store in a short time",
    "store_return_burst": "bursts of returns at a store",
    "high_value_item": "high-value items",
    "cust_tx_before": "customer's earlier transactions",
    "cust_age_days": "days since the customer was first seen",
    "cust_since_prev_s": "time since the customer's previous transaction",
    "cust_amount_ratio": "amount against the customer's mean sale",
    **{f"cust_count_{w}": f"customer's transactions in {words}" for w, words in _WINDOWS.items()},
    **{f"cust_sum_{w}": f"customer's spending in {words}" for w, words in _WINDOWS.items()},
    "link_identities": "identities (card, e-mail, ...) per transaction",
    "link_new": "identities seen for the first time",
    "link_tx_before_max": "earlier transactions of the busiest linked identity",
    "link_since_prev_s_min": "shortest time since a linked identity's previous transaction",
    **{f"link_count_{w}_max": f"busiest linked identity's transactions in {words}" for w, words in _WINDOWS.items()},
    "link_sum_24h_max": "busiest linked identity's spending in the last 24 hours",
    "product_category": "product category",
    "payment_method": "payment method",
    "billing_country": "billing country",
}
"""A drift alert's reasons, the score and the model's features whose distribution moved, by their plain names (a
test holds them to the model's features): "Why: score; amount log" gave the columns' internal names. Not
:data:`REASON_WORDS`: a drifting ``velocity_exceeded`` is a change in how often the flag is set, not "too many
transactions by this customer"."""
FACE_REASONS = frozenset({"watchlist_suspect", "watchlist_vip", "buyer_face_mismatch"})
"""Reasons that rest on a face comparison: an alert with one carries the advice below."""
MODEL_BANDS: tuple[tuple[int, str], ...] = ((900, "very high"), (800, "high"), (0, "elevated"))
"""How the fraud model's band reads (``model_score>=600`` is the default rule set's lowest band, about 10 %
of legitimate sales: "elevated", not "very risky")."""
MODEL_REASON_PREFIX = "model_score>="

FACE_MATCH_ADVICE: dict[str, str] = {
    "WATCHLIST_MATCH": "A face match is not proof: compare the two images yourself before anyone acts.",
    "SUSPECT_ENTERED": "Please look, do not act: a face match alone is not proof of anything.",
    "VIP_ARRIVED": "A face match is not proof: greet, do not assume who it is.",
    "SUSPECT_AT_LANE": "Please look, do not act: a face match alone is not proof of anything.",
    "VIP_AT_LANE": "A face match is not proof: greet, do not assume who it is.",
}
"""What security is asked to do on a watch-list alert: verify, never act on the match alone."""
FACE_EVIDENCE_ADVICE = "A face comparison is not proof: compare the images yourself before anyone acts."
"""The same for any other alert that rests partly on a face (a blocked sale with a face reason)."""
MARKDOWN_CUT_NOTE = "\n- _Cut here: the alert is longer than a Webex message takes; the dashboard shows it whole._"
"""Ends the rows of a Webex message cut to its limit (:meth:`AlertText.markdown`)."""
FIELD_MAX = 200
"""Longest a single value is shown (a hostile or broken record must not push the rest out of a message)."""
WHY_MAX = 1000

TITLES: dict[str, str] = {
    "BLOCKED_TRANSACTION": "Transaction blocked",
    "WATCHLIST_MATCH": "Possible watchlist match at a checkout",
    "SUSPECT_ENTERED": "Possible suspect entered the store",
    "VIP_ARRIVED": "Possible VIP arrived",
    "SUSPECT_AT_LANE": "Possible suspect seen at a checkout lane",
    "VIP_AT_LANE": "Possible VIP seen at a checkout lane",
    "MODEL_DRIFT": "Fraud model drift",
}
BLOCKED_TITLES: dict[str, str] = {"SALE": "Sale blocked", "RETURN": "Refund blocked"}
"""A blocked transaction's title by its kind (``transaction_kind``, alerts since schema v3): a refund must
not read like a sale."""


def category_text(category: object) -> str:
    """A watch-list category in words (:func:`schemas.similarity.category_words`), cut to 32 characters."""
    return category_words(shown(category, 32))


def feature_text(name: str) -> str:
    """A drift alert's reason (the score or a feature) by its plain name; one not in :data:`FEATURE_WORDS` with
    spaces for its underscores."""
    return FEATURE_WORDS.get(name, name.replace("_", " "))


def reason_text(code: str) -> str:
    """One reason code in plain words."""
    if code.startswith(MODEL_REASON_PREFIX):
        band = code[len(MODEL_REASON_PREFIX) :]
        level = next((words for floor, words in MODEL_BANDS if band.isdigit() and int(band) >= floor), "elevated")
        return f"the fraud model's risk is {level} (score {band}+ of 1000)"
    return REASON_WORDS.get(code, code.replace("_", " "))


def shown(value: object, limit: int = FIELD_MAX) -> str:
    """A value as a message shows it: on one line (control characters, line breaks included, become spaces:
    no value can start a heading or a mail header of its own) and at most ``limit`` characters."""
    text = " ".join("".join(" " if unicodedata.category(c)[0] == "C" else c for c in str(value)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def local_time(event_time_ms: int, timezone: str | None) -> str:
    """``2026-11-22 10:15:03 CET`` in the configured zone (the machine's when none or unknown)."""
    zone = None
    if timezone:
        try:
            zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            zone = None
    moment = datetime.fromtimestamp(event_time_ms / 1000, tz=zone).astimezone(zone)
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def store_time(time_ms: object, store_id: object, settings: AlertSettings) -> str | None:
    """A time (epoch ms) of a store's alert or case as the alert messages give it: :func:`local_time` in the store's
    zone (``CG_ALERTS__STORE_TIMEZONES``, else ``CG_ALERTS__TIMEZONE``), so the dashboard's pages say what the message
    a guard came from says. None without a time or for one no date holds (a page shows that as it came)."""
    if not time_ms or not isinstance(time_ms, int | float | str) or isinstance(time_ms, bool):
        return None
    try:
        return local_time(int(time_ms), settings.zone_of(store_id))
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def dashboard_url(alert: dict[str, Any], settings: AlertSettings) -> str:
    """The configured link template filled with the alert's ids (missing ones become empty)."""
    values = {
        k: "" if v is None else quote(str(v), safe=LINK_SAFE)
        for k, v in alert.items()
        if isinstance(v, str | int | float | type(None))
    }
    try:
        return settings.dashboard_link.format(**values)
    except (KeyError, IndexError, ValueError):
        return settings.dashboard_link


LINK_SAFE = ":@-._~,"
"""What a value filled into a link keeps as it is; the rest is percent-encoded (a value cannot end the link
or add a query)."""


def case_url(case_id: str, settings: AlertSettings) -> str:
    """The case page of ``case_id`` (the configured template; the template itself when it is broken)."""
    try:
        return settings.case_link.format(case_id=case_id)
    except (KeyError, IndexError, ValueError):
        return settings.case_link


CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"


NO_REFERENCE = "No reference image"
"""What the card's reference column says when the subject has none (an image pointing at nothing shows broken)."""


MAX_CARD_BYTES = 16_000
"""Most bytes a case card's JSON takes (measured with every non-ASCII character escaped, the largest way to send it):
well within what Webex takes for a card. Hostile values (1000-character reasons of emoji) made it about 21 KB."""
CARD_VALUE_MAX = 300
"""Longest a value (a fact, the headline) is shown on the card at first; the message above it has the rows whole."""
CARD_CUT_MARK = " … (cut)"
"""Ends a value cut to fit the card."""


def card_bytes(card: dict[str, Any]) -> int:
    """A card's size as :data:`MAX_CARD_BYTES` counts it."""
    return len(json.dumps(card, separators=(",", ":")).encode())


def _card_value(text: str, limit: int) -> str:
    """``text`` as the card shows it: at most ``limit`` characters, a longer one cut with :data:`CARD_CUT_MARK`."""
    return _md(text if len(text) <= limit else text[: max(0, limit - len(CARD_CUT_MARK))] + CARD_CUT_MARK)


def case_card(
    alert: dict[str, Any], settings: AlertSettings, now_s: float | None = None, *, has_reference: bool = False
) -> dict[str, Any]:
    """:func:`build_case_card` within :data:`MAX_CARD_BYTES`: its values cut to :data:`CARD_VALUE_MAX` characters,
    then shorter until the card fits (before, hostile values made a card Webex could refuse, and a refused card was
    only a warning)."""
    limit = CARD_VALUE_MAX
    while True:
        card = build_case_card(alert, settings, now_s, has_reference=has_reference, value_max=limit)
        if card_bytes(card) <= MAX_CARD_BYTES or limit <= 40:
            return card
        limit //= 2


def build_case_card(
    alert: dict[str, Any],
    settings: AlertSettings,
    now_s: float | None = None,
    *,
    has_reference: bool = False,
    value_max: int = CARD_VALUE_MAX,
) -> dict[str, Any]:
    """The adaptive card of an alert's case: headline, facts, the two images (face kinds), Confirm and
    Dismiss buttons (``Action.Submit`` with ``{"verb", "case_id"}``, what the bot reads from the
    attachment action) and a link to the case page. Images are URLs below the case page that Webex fetches
    itself, so they are signed to expire ``image_link_ttl_s`` after ``now_s`` (default: now) when
    ``image_link_key`` is set (:mod:`infra.signed_links`). The reference image only when ``has_reference`` (the
    image store holds one for the subject): otherwise the column says :data:`NO_REFERENCE`."""
    text = describe(alert, settings)
    case_id = case_id_for(str(alert.get("alert_id") or ""))
    link = case_url(case_id, settings)
    key = settings.image_link_key.get_secret_value() if settings.image_link_key else None
    signed_at = time.time() if now_s is None else now_s
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": _card_value(text.headline, value_max),
            "weight": "Bolder",
            "size": "Medium",
            "wrap": True,
        },
        {
            "type": "FactSet",
            "facts": [{"title": label, "value": _card_value(value, value_max)} for label, value in text.lines],
        },
    ]
    if alert.get("kind") in FACE_ALERT_KINDS:
        columns: list[tuple[str, str | None]] = [("Live snapshot", "live")] if alert.get("snapshot_ref") else []
        columns += [("Enrolled reference", "reference" if has_reference else None)] if alert.get("subject_id") else []
        body.append(
            {
                "type": "ColumnSet",
                "columns": [
                    {
                        "type": "Column",
                        "width": "stretch",
                        "items": [
                            {"type": "TextBlock", "text": title, "size": "Small", "isSubtle": True},
                            {
                                "type": "Image",
                                "url": image_link(link, case_id, which, key, signed_at, settings.image_link_ttl_s),
                                "altText": title,
                                "size": "Large",
                            }
                            if which
                            else {"type": "TextBlock", "text": NO_REFERENCE, "wrap": True, "isSubtle": True},
                        ],
                    }
                    for title, which in columns
                ],
            }
        )
    body.append({"type": "TextBlock", "text": f"Case {case_id}", "size": "Small", "isSubtle": True})
    return {
        "type": "AdaptiveCard",
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "version": "1.3",
        "body": body,
        "actions": [
            {"type": "Action.Submit", "title": "Confirm", "data": {"verb": "confirm", "case_id": case_id}},
            {"type": "Action.Submit", "title": "Dismiss", "data": {"verb": "dismiss", "case_id": case_id}},
            {"type": "Action.OpenUrl", "title": "Open the case", "url": link},
        ],
    }


def message_id(alert_id: str, domain: str = "checkout-guard") -> str:
    """A Message-ID derived from the alert id: a resend after a crash carries the same one, so mail
    clients that de-duplicate by Message-ID show it once."""
    return f"<alert-{hashlib.sha256(alert_id.encode()).hexdigest()[:32]}@{domain}>"


@dataclass(frozen=True)
class AlertText:
    headline: str
    """``Transaction blocked - store S001, lane L02``: what and where, first thing read."""
    lines: tuple[tuple[str, str], ...]
    """(label, value) rows in reading order."""
    link: str
    footer: str
    case_id: str = ""
    case_link: str = ""
    """The alert's case and its page (where a person confirms or dismisses it)."""

    @property
    def subject(self) -> str:
        return f"[Checkout Guard] {self.headline}"

    def plain(self) -> str:
        width = max(len(label) for label, _ in self.lines) if self.lines else 0
        rows = "\n".join(f"{label + ':':<{width + 1}} {value}" for label, value in self.lines)
        case = f"Case {self.case_id}, confirm or dismiss it here: {self.case_link}\n\n" if self.case_id else ""
        return f"{self.subject}\n\n{rows}\n\nDetails: {self.link}\n\n{case}{self.footer}\n"

    def markdown(self, max_bytes: int | None = None) -> str:
        """The Webex message; within ``max_bytes`` UTF-8 bytes when given: past them the rows are cut, last first,
        and :data:`MARKDOWN_CUT_NOTE` says so, while the headline, the dashboard link and the case stay whole (a cut
        of the end, as before, took the links and the way to decide the case); only when those alone are too long
        is the end cut."""
        head = f"**{_md(self.headline)}**\n\n"
        rows = [f"- **{label}:** {_md(value)}" for label, value in self.lines]
        case = (
            f"\n\nCase `{self.case_id}`: [decide it]({self.case_link}), or write to the bot (@mention it in a "
            f"group space) `confirm {self.case_id}` / `dismiss {self.case_id} <reason>`"
            if self.case_id
            else ""
        )
        tail = f"\n\n[Open in the dashboard]({self.link}){case}"
        whole = head + "\n".join(rows) + tail
        if max_bytes is None or len(whole.encode()) <= max_bytes:
            return whole
        room = max_bytes - len((head + tail + MARKDOWN_CUT_NOTE).encode())
        kept: list[str] = []
        for row in rows:
            size = len(row.encode()) + (1 if kept else 0)  # the line break before it
            if size <= room:
                kept.append(row)
                room -= size
                continue
            label_end = row.index(":** ") + 4
            cut = row.encode()[: max(0, room - (1 if kept else 0) - len("…".encode()))].decode(errors="ignore")
            if len(cut) > label_end:  # some of the value fits: it ends the rows, not inside an escape
                cut = cut[:-1] if (len(cut) - len(cut.rstrip("\\"))) % 2 else cut
                kept.append(cut + "…")
            break
        cut_rows = head + "\n".join(kept) + MARKDOWN_CUT_NOTE + tail
        if len(cut_rows.encode()) <= max_bytes:
            return cut_rows
        # A link longer than the whole limit (a template filled with a very long id): only the end can go, as before.
        return whole.encode()[: max(0, max_bytes - len("…".encode()))].decode(errors="ignore") + "…"

    def html(self, image_cid: str | None = None) -> str:
        rows = "".join(
            f"<tr><th align='left'>{_html(label)}</th><td>{_html(value)}</td></tr>" for label, value in self.lines
        )
        image = f"<p><img src='cid:{image_cid}' alt='snapshot' style='max-width:480px'></p>" if image_cid else ""
        case = (
            f"<p>Case {_html(self.case_id)}: <a href='{_html(self.case_link)}'>confirm or dismiss it</a></p>"
            if self.case_id
            else ""
        )
        return (
            f"<html><body><h2>{_html(self.subject)}</h2><table cellpadding='4'>{rows}</table>{image}"
            f"<p><a href='{_html(self.link)}'>Open in the dashboard</a></p>{case}"
            f"<p style='color:#777'>{_html(self.footer)}</p></body></html>"
        )


def describe(alert: dict[str, Any], settings: AlertSettings) -> AlertText:
    """The words of an alert (an Alert Avro dict) for every channel."""
    kind = shown(alert.get("kind") or "", 64)
    store, lane = shown(alert.get("store_id") or "?", 64), alert.get("lane_id")
    where = f"store {store}, lane {shown(lane, 64)}" if lane else f"store {store}"
    if kind == "MODEL_DRIFT" and alert.get("store_id") == ALL_STORES and not lane:
        where = "all stores"
    title = TITLES.get(kind, kind.replace("_", " ").capitalize() or "Alert")
    tx_kind = str(alert.get("transaction_kind") or "").upper()
    if kind == "BLOCKED_TRANSACTION":
        title = BLOCKED_TITLES.get(tx_kind, title)
    lines: list[tuple[str, str]] = [
        ("What", title),
        ("Where", where),
        ("When", local_time(int(alert.get("event_time") or 0), settings.zone_of(alert.get("store_id")))),
    ]
    if alert.get("amount") is not None:
        currency = str(alert.get("currency") or "")
        lines.append(
            (
                "Refund" if tx_kind == "RETURN" else "Amount",
                f"{money(alert['amount'], currency)} {shown(currency, 8)}".strip(),
            )
        )
    if alert.get("transaction_id"):
        lines.append(("Transaction", shown(alert["transaction_id"])))
    if alert.get("outcome"):
        outcome = OUTCOME_WORDS.get(alert["outcome"], shown(alert["outcome"], 32).lower())
        risk = f" (risk {alert['risk_score']} of 100)" if alert.get("risk_score") is not None else ""
        lines.append(("Outcome", outcome + risk))
    codes = [str(r) for r in alert.get("reasons") or ()]
    if codes and kind == "MODEL_DRIFT":
        moved = "; ".join(feature_text(r) for r in codes)
        lines.append(("Why", shown(f"drifted from the model's training data: {moved}", WHY_MAX)))
    elif codes:
        lines.append(("Why", shown("; ".join(reason_text(r) for r in codes), WHY_MAX)))
    if alert.get("similarity") is not None:
        who = f" {category_text(alert['category'])}" if alert.get("category") else ""
        subject_id = f" {shown(alert['subject_id'])}" if alert.get("subject_id") else ""
        rekognition = alert.get("matcher") == REKOGNITION_MATCHER
        notes = ["by Rekognition"] if rekognition else []
        if alert.get("match_threshold") is not None:  # Alert v6: what the match was taken at, to weigh it against
            notes.append(threshold_text(alert["match_threshold"], rekognition))
        by = f" ({'; '.join(notes)})" if notes else ""
        lines.append(("Face match", f"{similarity_text(alert['similarity'])}% similar to{who}{subject_id}{by}"))
    if kind in FACE_MATCH_ADVICE:
        lines.append(("Please", FACE_MATCH_ADVICE[kind]))
    elif alert.get("similarity") is not None or FACE_REASONS.intersection(codes):
        lines.append(("Please", FACE_EVIDENCE_ADVICE))
    footer = f"Alert {shown(alert.get('alert_id', ''))}, severity {shown(alert.get('severity') or 'n/a', 16)}."
    case_id = case_id_for(str(alert["alert_id"])) if alert.get("alert_id") else ""
    return AlertText(
        headline=f"{title} - {where}",
        lines=tuple(lines),
        link=dashboard_url(alert, settings),
        footer=footer,
        case_id=case_id,
        case_link=case_url(case_id, settings) if case_id else "",
    )


def _md(text: str) -> str:
    """Escape characters Webex markdown would interpret inside a value (``<`` and ``>``: a mention such as
    ``<@all>``, or HTML); values are on one line already (:func:`shown`)."""
    for ch in ("\\", "*", "_", "`", "[", "]", "<", ">", "~", "|"):
        text = text.replace(ch, "\\" + ch)
    return text


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#39;")
