"""The case service opens a case only for an alert whose store id has the shape the pipeline writes it in (cut, it
would file the case under another store); it keeps an alert's category as a label and its snapshot ref only when the
image store could have written it: each is copied into the case, its index, its page (and a LEARN command)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from infra.clients.image_store import LocalImageStore
from infra.settings import CasesSettings, Settings
from jobs.cases.service import CaseCore
from jobs.faces.stage import checkout_image_key, inspection_image_key
from jobs.scoring.validation import parse_transaction
from schemas.errors import InvalidRecord
from schemas.records import ALL_STORES, Case, DeadLetter, PosTransaction
from schemas.topics import CASES, DEAD_LETTERS
from tests.unit.test_case_service import NOW, alert_src

HOSTILE = {
    "huge": "s" * 200_000,
    "control": "x\x1b[2J\x00",
    "rtl_override": "\u202eexe.gpj",
    "empty": "",
}
"""Values none of these identifiers may have: the refusal names the field and the length, never the value."""


@pytest.fixture
def core() -> CaseCore:
    core = CaseCore(Settings(cases=CasesSettings(expire_after_s=600)))
    core.marked_at = NOW  # no compaction marker due
    return core


def refused(outs: list, field: str) -> DeadLetter:
    """The one dead letter of an alert that opened no case; its reason names ``field`` and none of the value."""
    assert [o.topic for o in outs] == [DEAD_LETTERS], [o.topic.name for o in outs]
    letter = DeadLetter.decode(outs[0].value)
    assert letter.error_kind == "invalid_id" and letter.reason.startswith(f"{field} is not "), letter.reason
    assert "\x1b" not in letter.reason and "\u202e" not in letter.reason and "sss" not in letter.reason
    return letter


def opened(outs: list) -> Case:
    (out,) = (o for o in outs if o.topic == CASES)
    return Case.decode(out.value)


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_an_alert_whose_store_id_is_no_store_name_opens_no_case(core, value) -> None:
    """A 200 000-character store id was copied whole into the case, its index and its page."""
    refused(core.on_alert(alert_src(store_id=value), NOW), "store_id")
    assert core.book.cases == {}


@pytest.mark.parametrize("store", ["store-001", "S01", "berlin_mitte-3", ALL_STORES])
def test_an_alert_of_any_store_the_scoring_job_takes_opens_its_case_under_that_store(core, store) -> None:
    assert opened(core.on_alert(alert_src(store_id=store), NOW)).store_id == store


def test_a_store_id_the_case_service_refuses_is_one_the_scoring_job_refuses_too() -> None:
    """One rule for a store id (``schemas.identifiers.NAME_RE``): no sale of a store named so is scored, so no alert of
    it is made; the case service refuses what only a hostile or broken writer could send."""
    sale = PosTransaction("tx-1", NOW - 1000, "Berlin Mitte #3", "lane-01", "SALE", 10.0, "EUR", "card")
    with pytest.raises(InvalidRecord, match="store_id"):
        parse_transaction(sale.encode(), NOW, 1 << 20)


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("s" * 200_000, "s" * 128),
        ("x\x1b[2J\x00", "x[2J"),
        ("\u202eexe.gpj", "exe.gpj"),
        ("", None),
        ("S" * 129, "S" * 128),
        ("line\nbreak\ttab", "line break tab"),
    ],
    ids=["huge", "control", "rtl_override", "empty", "over_128", "breaks"],
)
def test_an_alert_whose_category_is_no_label_opens_its_case_with_the_label_cleaned(core, value, kept) -> None:
    """A 200 000-character category or a terminal escape was copied whole onto the case page; refused, the
    watch-list hit would have no case."""
    assert opened(core.on_alert(alert_src(category=value), NOW)).category == kept


@pytest.mark.parametrize("category", ["SUSPECT", "VIP", "Home & Garden"])
def test_an_alert_with_a_category_label_opens_its_case_with_it(core, category) -> None:
    assert opened(core.on_alert(alert_src(category=category), NOW)).category == category


@pytest.mark.parametrize(
    "value",
    [
        *HOSTILE.values(),
        "file:checkout/" + "x" * 256,
        "file:checkout/tx-1.jpg x",  # two words: the LEARN command would be refused after the verdict
        "file:checkout/../../etc/passwd",
        "file:faces/tx-1.jpg",
        "/var/images/checkout/tx-1.jpg",
        "https://evil.test/checkout/tx-1.jpg",
        "s3:///checkout/tx-1.jpg",
    ],
    ids=[*HOSTILE.keys(), "key_over_255", "space", "dot_dot", "unknown_kind", "path", "url", "no_bucket"],
)
def test_an_alert_whose_snapshot_ref_is_no_image_ref_opens_its_case_without_it(core, value, caplog) -> None:
    """Its case would show, learn from and forget an image no store holds; a control character or a direction
    override in it was copied onto the case page as it came. The case still opens (a block or a watch-list hit
    without its case is worse than one without its photo); the log names the alert, never the ref."""
    case = opened(core.on_alert(alert_src(snapshot_ref=value), NOW))
    assert case.snapshot_ref is None
    assert "no image ref" in caplog.text and (not value or value not in caplog.text)


def test_an_alert_with_a_snapshot_the_image_store_wrote_opens_its_case_with_it(core, tmp_path: Path) -> None:
    """The refs the face stage's image store writes, locally or in S3 (checkout, lane inspection, entrance)."""
    store = LocalImageStore(tmp_path)
    refs = [
        store.put("checkout", checkout_image_key("tx-1"), b"jpeg"),
        store.put("checkout", checkout_image_key("tx+1.b@x", of_the_sale=False), b"jpeg"),
        store.put("checkout", inspection_image_key("tx-1"), b"jpeg"),
        store.put("entrance", "Q2MV-ABCD-1234:7:1800000000000", b"jpeg"),
        f"s3://{Settings().faces.checkout_bucket}/checkout/tx-1",
        "s3://Old_Bucket.2017/entrance/Q2MV-ABCD-1234:7:1",
    ]
    for n, ref in enumerate(refs):
        case = opened(core.on_alert(alert_src(alert_id=f"watchlist:tx-{n}:subj-a", snapshot_ref=ref), NOW))
        assert case.snapshot_ref == ref


def test_an_alert_of_a_kind_the_schema_does_not_name_opens_no_case(core) -> None:
    """``kind`` is an Avro enum: a symbol past its list does not decode, so it needs no check of its own."""
    src = alert_src(alert_id="drift:1", kind="MODEL_DRIFT", snapshot_ref=None)
    value = bytearray(src.value or b"")
    at = value.index(b"drift:1") + len("drift:1")  # the kind's index follows the alert id
    assert value[at] == 8, "MODEL_DRIFT: index 4, zig-zag encoded"
    value[at] = 126  # index 63: no kind
    outs = core.on_alert(dataclasses.replace(src, value=bytes(value)), NOW)
    assert [o.topic for o in outs] == [DEAD_LETTERS] and core.book.cases == {}
