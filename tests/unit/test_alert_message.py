"""Alert wording and e-mail building: what a store manager reads, within each channel's limits."""

from __future__ import annotations

import email
import email.policy
import io
import json
import random
from email.message import EmailMessage
from typing import Any

import fastavro
import pytest
from PIL import Image
from pydantic import ValidationError

from infra.cli import setting_errors
from infra.clients.webex import MAX_MARKDOWN_BYTES, truncate_utf8
from infra.retry import Backoff, parse_retry_after
from infra.settings import REPO_ROOT, AlertSettings, Settings
from schemas.codec import MAGIC, codec, latest_versions, load_schemas
from schemas.images import image_label, image_type
from sinks.alerts.mail import OutgoingMail, build_email
from sinks.alerts.message import case_card, describe, local_time, message_id, reason_text
from sinks.alerts.sender import DeliveryError, Task, give_up_reason

T = 1_767_261_303_000  # 2026-01-01T09:55:03Z


def alert(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = dict(
        alert_id="blocked:tx-9",
        kind="BLOCKED_TRANSACTION",
        severity="high",
        event_time=T,
        store_id="S001",
        lane_id="L02",
        transaction_id="tx-9",
        amount=1234.5,
        currency="EUR",
        outcome="BLOCK",
        risk_score=92,
        reasons=["return_exceeds_sale", "model_score>=900"],
        subject_id=None,
        category=None,
        similarity=None,
        snapshot_ref=None,
        summary="Blocked return tx-9",
    )
    return values | overrides


def test_blocked_transaction_reads_what_where_when_amount_outcome_and_reasons_in_words() -> None:
    text = describe(alert(), AlertSettings(timezone="Europe/Berlin"))
    plain = text.plain()
    assert text.subject == "[Checkout Guard] Transaction blocked - store S001, lane L02"
    assert "2026-01-01 10:55:03 CET" in plain  # store local time, not UTC
    assert "1,234.50 EUR" in plain
    assert "blocked (risk 92 of 100)" in plain
    assert "refund is larger than the original sale" in plain
    assert "the fraud model's risk is very high (score 900+ of 1000)" in plain
    assert "return_exceeds_sale" not in plain
    assert "http://127.0.0.1:8050/alerts/blocked:tx-9" in plain


def test_an_amount_shows_its_currencys_smallest_unit_so_no_dinar_figure_is_rounded() -> None:
    """Every amount was shown with two decimals: a refund of 12.345 KWD read 12.35 KWD (not the indexed amount, a
    fils off), 1500 JPY read 1,500.00. The currency's minor unit (ISO 4217) now, and a digit beyond it is kept."""

    def shown(amount: float, currency: str) -> str:
        return dict(describe(alert(amount=amount, currency=currency), AlertSettings()).lines)["Amount"]

    assert shown(12.345, "KWD") == "12.345 KWD"
    assert shown(1250.5, "BHD") == "1,250.500 BHD"
    assert shown(1500, "JPY") == "1,500 JPY"
    assert shown(1234.5, "EUR") == "1,234.50 EUR"
    assert shown(0.1 + 0.2, "USD") == "0.30 USD"  # a float's noise is not a digit
    assert shown(9.999, "EUR") == "9.999 EUR"  # more digits than the currency has: kept, not rounded to 10.00
    assert shown(1500.5, "JPY") == "1,500.5 JPY"
    assert shown(12.5, "???") == "12.50 ???"


def test_a_misspelt_timezone_is_a_settings_error_not_alert_times_in_the_machines_zone() -> None:
    """``CG_ALERTS__TIMEZONE=Europe/Berln`` was taken without a word and every alert showed the machine's time
    (UTC on most servers), an hour or more off the store's clocks; now the sender does not start with it."""
    with pytest.raises(ValidationError, match="Europe/Berln"):
        AlertSettings(timezone="Europe/Berln")
    assert AlertSettings(timezone=" Europe/Berlin ").timezone == "Europe/Berlin"
    assert AlertSettings(timezone="").timezone is None  # unset: the machine's zone, as documented


def test_face_match_shows_similarity_and_watchlist_category() -> None:
    text = describe(
        alert(
            kind="WATCHLIST_MATCH",
            category="SUSPECT",
            subject_id="subj-tx-1",
            similarity=97.26,
            reasons=["watchlist_suspect"],
        ),
        AlertSettings(),
    )
    rows = dict(text.lines)
    assert rows["Face match"] == "97.2% similar to suspect subj-tx-1"  # 97.26, cut to a tenth, never rounded up
    assert rows["Why"] == "face resembles a person on the suspect watchlist"
    assert text.headline.startswith("Possible watchlist match at a checkout")
    assert "not proof" in rows["Please"], "security is asked to verify, not to act on the match"


def test_a_face_match_made_by_rekognition_says_so_beside_its_similarity() -> None:
    face = {"kind": "WATCHLIST_MATCH", "category": "SUSPECT", "subject_id": "subj-tx-1", "similarity": 99.62}
    rows = dict(describe(alert(**face, matcher="rekognition"), AlertSettings()).lines)
    assert rows["Face match"] == "99.6% similar to suspect subj-tx-1 (by Rekognition)"
    assert dict(describe(alert(**face, matcher="local"), AlertSettings()).lines)["Face match"].endswith("subj-tx-1")


def test_a_face_match_gives_the_threshold_it_was_taken_at_in_every_format_and_an_older_alert_reads_as_before() -> None:
    """Security weighs a similarity against the threshold the engine took the face at, as ``checkout <tx>`` gives it;
    the alert gave the similarity alone. Alert v6 carries the threshold; an alert written before reads as it did."""
    face = {"kind": "WATCHLIST_MATCH", "category": "SUSPECT", "subject_id": "subj-tx-1", "reasons": ["watchlist_x"]}
    local = alert(**face, similarity=68.83, matcher="local", match_threshold=50.94)
    text = describe(local, AlertSettings())
    assert dict(text.lines)["Face match"] == "68.8% similar to suspect subj-tx-1 (the match threshold is 50.9)"
    card = json.dumps(case_card(local, AlertSettings()))
    for shown in (text.plain(), text.markdown(), text.html(), card):
        assert "(the match threshold is 50.9)" in shown
    by_rekognition = alert(**face, similarity=99.62, matcher="rekognition", match_threshold=99.0)
    assert dict(describe(by_rekognition, AlertSettings()).lines)["Face match"] == (
        "99.6% similar to suspect subj-tx-1 (by Rekognition; Rekognition's match threshold is 99.0)"
    )
    # a v5 alert (before the field) decodes without it and reads as before
    v5 = next(s for s in load_schemas().values() if s.short_name == "Alert" and s.version == 5)
    body = io.BytesIO()
    fastavro.schemaless_writer(body, v5.parsed, {**local, "match_threshold": None, "transaction_kind": "SALE"})
    older = codec("Alert").decode(MAGIC + v5.fingerprint + body.getvalue())
    assert older["match_threshold"] is None and older["observation_id"] is None
    assert dict(describe(older, AlertSettings()).lines)["Face match"] == "68.8% similar to suspect subj-tx-1"
    assert "threshold" not in json.dumps(case_card(older, AlertSettings()))


@pytest.mark.parametrize(
    ("similarity", "figure"), [(99.96, "99.9%"), (99.999, "99.9%"), (100.0, "100.0%"), (68.8, "68.8%")]
)
def test_a_near_match_never_reads_as_a_perfect_one(similarity: float, figure: str) -> None:
    """99.96 read "100.0% similar", a perfect match, overstating the evidence a guard weighs: a similarity is cut to a
    tenth, so 100.0 is only ever a perfect match."""
    face = {"kind": "SUSPECT_ENTERED", "category": "SUSPECT", "subject_id": "subj-1", "similarity": similarity}
    assert dict(describe(alert(**face), AlertSettings()).lines)["Face match"].startswith(f"{figure} similar ")


@pytest.mark.parametrize(
    ("kind", "category", "headline", "who"),
    [
        ("VIP_ARRIVED", "VIP", "Possible VIP arrived", "similar to VIP subj-1"),
        ("SUSPECT_ENTERED", "SUSPECT", "Possible suspect entered the store", "similar to suspect subj-1"),
        ("VIP_ARRIVED", "STAFF", "Possible VIP arrived", "similar to STAFF subj-1"),  # one it does not know: as it came
    ],
)
def test_a_face_match_names_the_watch_list_category_as_the_headline_does(kind, category, headline, who) -> None:
    """The category was lower-cased: "Possible VIP arrived" over "99.0% similar to vip subj-1"."""
    text = describe(alert(kind=kind, category=category, subject_id="subj-1", similarity=99.0), AlertSettings())
    assert text.headline.startswith(headline)
    assert dict(text.lines)["Face match"] == f"99.0% {who}"


def test_entrance_alert_without_lane_amount_or_outcome_still_reads_well() -> None:
    text = describe(
        alert(
            kind="SUSPECT_ENTERED",
            lane_id=None,
            amount=None,
            outcome=None,
            risk_score=None,
            reasons=[],
            transaction_id=None,
            similarity=88.0,
            category="SUSPECT",
        ),
        AlertSettings(),
    )
    labels = [label for label, _ in text.lines]
    assert text.headline == "Possible suspect entered the store - store S001"
    assert dict(text.lines)["Please"].startswith("Please look, do not act")
    assert "Amount" not in labels and "Outcome" not in labels
    assert "Face match" in labels


@pytest.mark.parametrize(
    ("kind", "category", "headline"),
    [
        ("SUSPECT_AT_LANE", "SUSPECT", "Possible suspect seen at a checkout lane - store S001, lane L02"),
        ("VIP_AT_LANE", "VIP", "Possible VIP seen at a checkout lane - store S001, lane L02"),
    ],
)
def test_a_face_in_a_lanes_live_view_is_headlined_at_the_lane_not_as_entering(kind, category, headline) -> None:
    """The summary says "seen at the lane after sale ... not its buyer": the headline must not say "entered"."""
    seen = alert(
        kind=kind,
        category=category,
        transaction_id=None,
        amount=None,
        outcome=None,
        risk_score=None,
        reasons=[f"watchlist_{category.lower()}", "lane_view_after_the_sale_not_its_buyer"],
        similarity=97.0,
    )
    text = describe(seen, AlertSettings())
    assert text.headline == headline and "Please" in dict(text.lines)  # the face-match advice too


def test_a_v4_reader_reads_the_lane_kinds_as_unknown() -> None:
    """Alert v5 adds the kinds; a consumer still on v4 during an upgrade reads them as UNKNOWN, not as corrupt."""
    v4 = fastavro.parse_schema(json.loads((REPO_ROOT / "schemas/avro/alert.v4.avsc").read_text()))
    assert latest_versions()["Alert"].version >= 5
    encoded = codec("Alert").encode(alert(kind="VIP_AT_LANE", category="VIP", reasons=[]))
    writer = latest_versions()["Alert"]
    body = io.BytesIO(encoded[10:])  # single-object encoding: 2 marker bytes and the 8-byte fingerprint
    assert fastavro.schemaless_reader(body, writer.parsed, v4)["kind"] == "UNKNOWN"


def test_unknown_reason_codes_are_shown_readably_rather_than_dropped() -> None:
    assert reason_text("brand_new_rule") == "brand new rule"


def test_dashboard_link_template_takes_alert_fields() -> None:
    settings = AlertSettings(dashboard_link="https://dash.example/tx/{transaction_id}?store={store_id}")
    assert describe(alert(), settings).link == "https://dash.example/tx/tx-9?store=S001"


def test_unknown_time_zone_falls_back_to_the_machine_zone() -> None:
    assert local_time(T, "Not/AZone")[:4] == "2026"


def test_markdown_escapes_values_so_ids_do_not_turn_into_formatting() -> None:
    md = describe(alert(transaction_id="tx_*9*"), AlertSettings()).markdown()
    assert "tx\\_\\*9\\*" in md


def test_message_id_is_stable_per_alert_so_a_resend_is_recognisably_the_same_mail() -> None:
    assert message_id("blocked:tx-9") == message_id("blocked:tx-9")
    assert message_id("blocked:tx-9") != message_id("blocked:tx-10")


def as_received(mail: OutgoingMail) -> EmailMessage:
    parsed = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert not parsed.defects and all(not part.defects for part in parsed.walk())
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_email_with_snapshot_shows_it_inline_in_the_html_once() -> None:
    text = describe(alert(), AlertSettings())
    jpeg = b"\xff\xd8\xff\xe0" + b"x" * 100
    msg = as_received(build_email("blocked:tx-9", text, "cg@example.com", ["sec@example.com"], jpeg))
    assert msg["Message-ID"] == message_id("blocked:tx-9")
    assert msg.get_body(("plain",)).get_content().replace("\r\n", "\n") == text.plain()
    assert msg.get_body(("plain",)).get_content().startswith("[Checkout Guard] Transaction blocked")
    html = msg.get_body(("html",)).get_content()
    cid = html.split("cid:", 1)[1].split("'", 1)[0]
    inline = [p for p in msg.walk() if p["Content-ID"] == f"<{cid}>"]
    assert inline and inline[0].get_content() == jpeg
    images = [part for part in msg.walk() if part.get_content_type() == "image/jpeg"]
    assert len(images) == 1 and images[0].get_filename() == "snapshot.jpg"


def test_non_ascii_subject_is_encoded_and_reads_back() -> None:
    text = describe(alert(store_id="Köln-Süd"), AlertSettings())
    msg = as_received(build_email("a", text, "Kassenwächter <cg@example.com>", ["sec@example.com"], None))
    assert msg["Subject"] == "[Checkout Guard] Transaction blocked - store Köln-Süd, lane L02"
    assert msg["From"].addresses[0].display_name == "Kassenwächter"
    assert msg["From"].addresses[0].addr_spec == "cg@example.com"


def test_email_without_snapshot_has_no_image() -> None:
    msg = as_received(build_email("a", describe(alert(), AlertSettings()), "cg@example.com", ["sec@example.com"], None))
    assert not [p for p in msg.walk() if p.get_content_maintype() == "image"]


def test_webex_markdown_is_cut_at_the_byte_limit_without_breaking_a_character() -> None:
    cut = truncate_utf8("é" * 5000)
    assert len(cut.encode()) <= MAX_MARKDOWN_BYTES
    cut.encode().decode()  # still valid UTF-8
    assert truncate_utf8("short") == "short"


def test_retry_after_header_parsing() -> None:
    assert parse_retry_after("7", 1.0) == 7.0
    assert parse_retry_after(None, 1.0) == 1.0
    assert parse_retry_after("soon", 1.0) == 1.0


def test_backoff_grows_and_stays_bounded() -> None:
    backoff, rng = Backoff(0.5, 30), random.Random(1)
    assert 0.25 <= backoff.delay(0, rng) <= 0.5
    assert 15 <= backoff.delay(20, rng) <= 30


def test_give_up_on_permanent_refusal_after_max_attempts_or_past_the_deadline() -> None:
    task = Task(alert(), "webex", deadline=100.0)
    assert give_up_reason(task, DeliveryError("400 bad", retriable=False), 0, 1, 8).startswith("webex refused it")
    task.failures = 3
    assert give_up_reason(task, DeliveryError("500"), 0, 1, 8) is None
    assert "failed 3 times" in give_up_reason(task, DeliveryError("500"), 0, 1, 3)
    assert "deadline" in give_up_reason(task, DeliveryError("500"), 99.5, 1, 8)


def test_the_model_reason_reads_by_band_not_as_very_risky_at_the_lowest() -> None:
    assert reason_text("model_score>=600") == "the fraud model's risk is elevated (score 600+ of 1000)"
    assert reason_text("model_score>=800").startswith("the fraud model's risk is high")
    assert reason_text("model_score>=x") == "the fraud model's risk is elevated (score x+ of 1000)"


def test_a_blocked_sale_that_rests_partly_on_a_face_asks_for_a_look_not_a_verdict() -> None:
    rows = dict(describe(alert(reasons=["buyer_face_mismatch", "return_exceeds_sale"]), AlertSettings()).lines)
    assert "may not be the buyer's" in rows["Why"] and "not proof" in rows["Please"]
    assert "Please" not in dict(describe(alert(), AlertSettings()).lines)
    vip = describe(
        alert(kind="VIP_ARRIVED", category="VIP", similarity=99.0, reasons=["watchlist_vip"]), AlertSettings()
    )
    assert vip.headline.startswith("Possible VIP arrived") and "not proof" in dict(vip.lines)["Please"]


def test_hostile_values_stay_on_one_line_short_and_inert_in_every_format() -> None:
    hostile = alert(
        lane_id="L1\r\nBcc: leak@evil.example\n\n# URGENT <@all>",
        store_id="S" * 5000,
        transaction_id="tx-1) [pay here](http://evil.example",
        reasons=["x" * 3000] * 5,
    )
    settings = AlertSettings(dashboard_link="http://dash/tx/{transaction_id}")
    text = describe(hostile, settings)
    assert "\n" not in text.headline and "\r" not in text.subject
    assert all("\n" not in value and len(value) <= 1000 for _, value in text.lines)
    markdown = text.markdown()
    assert "\n# URGENT" not in markdown and "<@all>" not in markdown and "\\<@all\\>" in markdown
    assert (
        text.link == "http://dash/tx/tx-1%29%20%5Bpay%20here%5D%28http:%2F%2Fevil.example"
    )  # ":" is kept (alert ids hold it)
    card = json.dumps(case_card(hostile, settings))
    assert "<@all>" not in card


def test_a_case_card_of_hostile_values_stays_within_webexs_card_size_its_long_values_cut_with_a_marker() -> None:
    """Each value of 200 (the reasons 1000) characters of emoji made a card of about 21 KB, which Webex may refuse."""
    from sinks.alerts.message import CARD_CUT_MARK, MAX_CARD_BYTES, card_bytes

    emoji = "\U0001f600"
    hostile = alert(
        kind="WATCHLIST_MATCH",
        subject_id="subj-" + emoji * 600,
        category=emoji * 100,
        similarity=99.0,
        store_id=emoji * 5000,
        lane_id=emoji * 5000,
        transaction_id=emoji * 5000,
        reasons=[emoji * 3000] * 5,
        currency=emoji * 50,
        snapshot_ref="checkout/x.jpg",
    )
    card = case_card(hostile, AlertSettings(), has_reference=True)
    assert card_bytes(card) <= MAX_CARD_BYTES
    facts = {f["title"]: f["value"] for f in card["body"][1]["facts"]}
    assert facts["Why"].endswith(CARD_CUT_MARK) and len(facts["Why"]) <= 300  # 1000 characters in the message
    assert [a["data"]["verb"] for a in card["actions"] if "data" in a] == ["confirm", "dismiss"]  # the buttons stay
    plain = case_card(alert(), AlertSettings())
    assert CARD_CUT_MARK not in json.dumps(plain, ensure_ascii=False)  # an ordinary alert's card is whole


def test_no_alert_value_can_add_a_mail_header_and_a_folded_subject_uses_crlf() -> None:
    hostile = describe(
        alert(lane_id="ENT\r\nBcc: leak@evil.example", store_id="Zürich-Hauptbahnhof-" * 5), AlertSettings()
    )
    mail = build_email("blocked:tx-9", hostile, "cg@test", ["sec@test"])
    head = mail.data.split(b"\r\n\r\n", 1)[0]
    parsed = email.message_from_bytes(mail.data, policy=email.policy.default)
    assert parsed["Bcc"] is None and b"Bcc:" not in head.split(b"Subject:", 1)[0]
    assert b"\n" not in head.replace(b"\r\n", b"")  # no bare LF: strict relays refuse it
    assert "Zürich" in parsed["Subject"]


def test_a_blocked_refund_reads_as_a_refund_and_a_sale_as_a_sale() -> None:
    refund = describe(alert(transaction_kind="RETURN"), AlertSettings())
    assert refund.headline.startswith("Refund blocked") and dict(refund.lines)["Refund"] == "1,234.50 EUR"
    sale = describe(alert(transaction_kind="SALE"), AlertSettings())
    assert sale.headline.startswith("Sale blocked") and "Amount" in dict(sale.lines)


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def test_a_png_snapshot_is_mailed_as_a_png_and_a_jpeg_as_a_jpeg() -> None:
    """Every snapshot was attached as image/jpeg named snapshot.jpg: a PNG went out mislabelled."""
    text = describe(alert(), AlertSettings())
    for data, kind, name in (
        (png(), "image/png", "snapshot.png"),
        (b"\xff\xd8\xff\xe0xx", "image/jpeg", "snapshot.jpg"),
    ):
        msg = as_received(build_email("blocked:tx-9", text, "cg@example.com", ["sec@example.com"], data))
        cid = msg.get_body(("html",)).get_content().split("cid:", 1)[1].split("'", 1)[0]
        [inline] = [p for p in msg.walk() if p["Content-ID"] == f"<{cid}>"]
        assert (inline.get_content_type(), inline.get_filename(), inline.get_content()) == (kind, name, data)


def test_a_snapshot_that_is_no_known_image_is_not_labelled_as_one() -> None:
    assert image_label(b"GIF89a....", "snapshot") == ("application/octet-stream", "snapshot.bin")
    assert image_label(png(), "snapshot") == ("image/png", "snapshot.png")
    assert image_type(b"\x89PNG\r\n\x1a") is None  # cut short: not a PNG


def test_a_store_in_another_time_zone_shows_its_own_local_time_and_the_others_the_chains() -> None:
    """One ``CG_ALERTS__TIMEZONE`` for every store: a New York store's alerts read Berlin's time, six hours off."""
    settings = AlertSettings(timezone="Europe/Berlin", store_timezones={"S-NYC": "America/New_York"})
    assert "2026-01-01 04:55:03 EST" in describe(alert(store_id="S-NYC"), settings).plain()
    assert "2026-01-01 10:55:03 CET" in describe(alert(store_id="S001"), settings).plain()


def test_a_store_time_zone_that_is_no_zone_is_a_settings_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CG_ALERTS__STORE_TIMEZONES", '{"S-NYC": "America/New_York", "S-BER": "Europe/Berln"}')
    with pytest.raises(ValidationError) as refused:
        Settings()
    errors = setting_errors(refused.value)
    assert errors.startswith("CG_ALERTS__STORE_TIMEZONES: ") and "Europe/Berln" in errors and "S-BER" in errors
    monkeypatch.setenv("CG_ALERTS__STORE_TIMEZONES", '{"S-NYC": " America/New_York "}')
    assert Settings().alerts.store_timezones == {"S-NYC": "America/New_York"}


def test_a_webex_message_too_long_cuts_its_rows_with_a_note_and_keeps_the_links_and_the_case() -> None:
    """Before, the message was cut at its end: the dashboard link, the case link and how to decide the case went,
    and only "..." said something was missing."""
    from sinks.alerts.message import MARKDOWN_CUT_NOTE

    big = alert(reasons=["😀*" * 40] * 40, transaction_id="😀" * 300, store_id="😀" * 80, lane_id="😀" * 80)
    text = describe(big, AlertSettings())
    limit = 2000
    assert len(text.markdown().encode()) > limit
    cut = text.markdown(limit)
    assert len(cut.encode()) <= limit
    cut.encode().decode()  # still valid UTF-8
    assert MARKDOWN_CUT_NOTE in cut and cut.startswith(f"**{text.headline.split(' - ')[0]}")
    assert f"[Open in the dashboard]({text.link})" in cut and f"[decide it]({text.case_link})" in cut
    assert f"`confirm {text.case_id}`" in cut and "- **What:** " in cut
    assert not cut.split(MARKDOWN_CUT_NOTE)[0].endswith("\\")  # no escape cut in half
    assert text.markdown(len(text.markdown().encode())) == text.markdown()  # one that fits is whole
    assert len(text.markdown(300).encode()) <= 300  # links and case alone too long: the end is cut


def test_the_sender_posts_a_long_alert_within_webexs_limit_with_its_links() -> None:
    from infra.clients.webex import MAX_MARKDOWN_BYTES
    from sinks.alerts.sender import WebexChannel

    posted: list[str] = []

    class Client:
        def me(self) -> dict[str, Any]:
            return {"id": "bot", "displayName": "Checkout Guard"}

        def send_message(self, room: str, markdown: str, attachment: Any = None) -> dict[str, Any]:
            posted.append(markdown)
            return {"id": "m1"}

    settings = Settings(webex={"room_id": "room", "bot_token": "t"}, alerts={"webex_cards": False})  # type: ignore[arg-type]
    e = "😀"  # 4 bytes a character: every value at its longest shown is over Webex's limit in all
    big = alert(
        kind="WATCHLIST_MATCH",
        reasons=[e * 40] * 40,
        **{k: e * 300 for k in ("transaction_id", "store_id", "lane_id", "subject_id", "outcome", "category")},
        severity=e * 20,
        currency=e * 10,
        similarity=99.5,
    )
    assert len(describe(big, settings.alerts).markdown().encode()) > MAX_MARKDOWN_BYTES - 200
    channel = WebexChannel(settings, Client(), has_reference=lambda s: False)  # type: ignore[arg-type]
    channel.send(big, None, maybe_sent=False)
    [markdown] = posted
    text = describe(big, settings.alerts)
    assert len(markdown.encode()) <= MAX_MARKDOWN_BYTES
    assert f"[Open in the dashboard]({text.link})" in markdown and "alert `blocked:tx-9`" in markdown
    assert markdown.split("\n\n_alert `")[0].endswith(f"`dismiss {text.case_id} <reason>`")  # the case whole


def test_every_reason_the_job_may_give_reads_in_words_not_as_its_code() -> None:
    """A rule set weighs its indicators and the job adds its own codes to watch-list alerts: ``unknown_currency`` (20
    points in the default rule set) read "unknown currency", a lane sighting "lane view after the sale not its
    buyer"."""
    from jobs.scoring.rules import KNOWN_INDICATORS
    from jobs.scoring.scorer import LANE_VIEW_REASON, LATE_FACE_REASON
    from sinks.alerts.message import REASON_WORDS

    codes = sorted(KNOWN_INDICATORS | {LANE_VIEW_REASON, LATE_FACE_REASON, "watchlist_suspect", "watchlist_vip"})
    assert [code for code in codes if code not in REASON_WORDS] == []
    lane = describe(alert(kind="SUSPECT_AT_LANE", reasons=["watchlist_suspect", LANE_VIEW_REASON]), AlertSettings())
    assert "seen in the lane's live view after the sale, so not its buyer" in dict(lane.lines)["Why"]


def test_a_drift_alert_reads_all_stores_and_its_drifting_figures_by_their_plain_names() -> None:
    """A drift alert read "Fraud model drift - store all" and "Why: score; amount log", the internal names; every
    feature of the model has a plain name (held to the model's list), and no accusing reason wording."""
    from jobs.model.drift import SCORE, drift_alert
    from jobs.model.fraud_model import FEATURE_NAMES
    from sinks.alerts.message import FEATURE_WORDS

    assert [name for name in (SCORE, *FEATURE_NAMES) if name not in FEATURE_WORDS] == []
    report = {
        "model_version": "gbm-1",
        "hour_start": T,
        "rows": 500,
        "score_psi": 0.4,
        "feature_psi": {"amount_log": 0.3, "velocity_exceeded": 0.27, "new_column_x": 0.26},
        "worst_feature": "amount_log",
        "worst_psi": 0.3,
        "alert": True,
    }
    text = describe(drift_alert(report), AlertSettings())  # type: ignore[arg-type]
    rows = dict(text.lines)
    assert text.headline == "Fraud model drift - all stores" and rows["Where"] == "all stores"
    assert rows["Why"] == (
        "drifted from the model's training data: the model's risk score; transaction amount; customers over the "
        "velocity limit; new column x"  # one it has no name for: its name with spaces
    )
    assert dict(describe(alert(store_id="all"), AlertSettings()).lines)["Where"] == "store all, lane L02"  # a store


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("similarity", float("nan")),
        ("similarity", 250.0),
        ("match_threshold", float("inf")),
        ("amount", float("-inf")),
        ("amount", 1.7976931348623157e308),
    ],
)
def test_an_alert_whose_amount_or_similarity_no_message_can_show_is_refused_before_any_channel(field, value) -> None:
    """Sent as it was, a NaN similarity read "nan% similar" and 1e308 an amount of 400 digits, by mail and Webex."""
    from schemas.errors import InvalidRecord
    from sinks.alerts.sender import decode_alert

    valid = alert(similarity=91.5, match_threshold=50.9, subject_id="subj-a", category="SUSPECT")
    assert decode_alert(codec("Alert").encode(valid), AlertSettings())["similarity"] == 91.5
    with pytest.raises(InvalidRecord) as err:
        decode_alert(codec("Alert").encode({**valid, field: value}), AlertSettings())
    assert err.value.kind == "invalid_field" and field in err.value.reason and str(value) not in err.value.reason
