"""One spelling per contract: the dead-letter builder, the exception family, the scorer's output dicts."""

from __future__ import annotations

import ast
import builtins
import hashlib
from dataclasses import fields
from typing import Any

import pytest

from infra.settings import REPO_ROOT, Settings
from jobs.scoring.rules import Decision, FaceResult
from jobs.scoring.scorer import Scorer, ScoringState
from schemas.codec import DecodeError, codec, latest_versions
from schemas.errors import CheckoutGuardError, InvalidRecord
from schemas.records import (
    MAX_DEAD_LETTER_KEY,
    MAX_DEAD_LETTER_PAYLOAD,
    MAX_DEAD_LETTER_REASON,
    Alert,
    AlertAvro,
    DeadLetter,
    ScoredTransaction,
    ScoredTransactionAvro,
    dead_letter,
)
from tests.builders import T0, sale

# --------------------------------------------------------------------------------------------------
# Dead letters


def _letter(offset: int = 7, failed_at: int = 1, **kw: Any) -> DeadLetter:
    args: dict[str, Any] = {
        "topic": "cg.transactions",
        "partition": 2,
        "offset": offset,
        "key": b"k",
        "value": b"\x00bad",
        "error": InvalidRecord("not_avro", "missing C3 01 header"),
        "stage": "scoring-job",
        "failed_at": failed_at,
    }
    return dead_letter(**{**args, **kw})


def test_dead_letter_id_is_stable_for_the_same_offset() -> None:
    first, replayed = _letter(failed_at=1), _letter(failed_at=2)
    assert first.dead_letter_id == replayed.dead_letter_id == "cg.transactions:2:7"
    assert _letter(offset=8).dead_letter_id != first.dead_letter_id


def test_dead_letter_carries_kind_reason_stage_and_the_payload() -> None:
    letter = DeadLetter.decode(_letter().encode())
    assert (letter.error_kind, letter.reason, letter.stage) == ("not_avro", "missing C3 01 header", "scoring-job")
    assert (letter.source_topic, letter.partition, letter.offset) == ("cg.transactions", 2, 7)
    assert letter.payload == b"\x00bad" and letter.key == b"k" and letter.failed_at == 1


def test_dead_letter_of_an_empty_record_and_with_its_own_id() -> None:
    assert _letter(value=None, key=None).payload == b""
    assert _letter(dead_letter_id="mqtt:/t:abc").dead_letter_id == "mqtt:/t:abc"


NEAR_BROKER_LIMIT = 1_048_500
"""Accepted by the broker (1 MiB default), so its dead letter must fit the producers' 1 MiB limit."""


def test_dead_letter_of_an_input_near_the_broker_limit_fits_well_under_1_mib_with_its_size_and_hash() -> None:
    value = bytes(range(256)) * (NEAR_BROKER_LIMIT // 256) + b"x" * (NEAR_BROKER_LIMIT % 256)
    assert len(value) == NEAR_BROKER_LIMIT
    letter = _letter(value=value)
    encoded = letter.encode()
    assert len(encoded) < MAX_DEAD_LETTER_PAYLOAD + 8 * 1024 < (1 << 20) // 8
    back = DeadLetter.decode(encoded)
    assert back.payload == value[:MAX_DEAD_LETTER_PAYLOAD] and back.payload_truncated
    assert back.payload_size == NEAR_BROKER_LIMIT
    assert back.payload_sha256 == hashlib.sha256(value).hexdigest()


def test_dead_letter_payload_cap_is_a_parameter_and_a_small_payload_stays_whole() -> None:
    small = _letter(value=b"0123456789")
    assert (small.payload, small.payload_size, small.payload_truncated) == (b"0123456789", 10, False)
    assert small.payload_sha256 == hashlib.sha256(b"0123456789").hexdigest()
    cut = _letter(value=b"0123456789", max_payload_bytes=4)
    assert (cut.payload, cut.payload_size, cut.payload_truncated) == (b"0123", 10, True)


def test_dead_letter_caps_key_reason_and_names_and_a_long_id_stays_unique_and_stable() -> None:
    letter = _letter(
        key=b"k" * 100_000,
        error=InvalidRecord("x" * 5000, "why " * 100_000),
        stage="s" * 5000,
        dead_letter_id="mqtt:" + "t" * 100_000 + ":1",
    )
    assert len(letter.key or b"") == MAX_DEAD_LETTER_KEY
    assert len(letter.reason.encode()) <= MAX_DEAD_LETTER_REASON and letter.reason.startswith("why why")
    assert "cut" in letter.reason
    assert len(letter.error_kind) <= 1024 and len(letter.stage) <= 1024 and len(letter.dead_letter_id) <= 1024
    other = _letter(dead_letter_id="mqtt:" + "t" * 100_000 + ":2")
    again = _letter(dead_letter_id="mqtt:" + "t" * 100_000 + ":1")
    assert other.dead_letter_id != letter.dead_letter_id == again.dead_letter_id
    assert len(letter.encode()) < 16 * 1024


V1_DEAD_LETTER = bytes.fromhex(
    "c301915570e405d5edb72663672e7472616e73616374696f6e733a323a371e63672e7472616e73616374696f6e73040e02026b"
    "0800626164106e6f745f6176726f286d697373696e67204333203031206865616465721673636f72696e672d6a6f6202"
)
"""A dead letter as the job wrote it before payloads were capped (``dead_letter.v1.avsc``, its fingerprint)."""


def test_dead_letter_written_before_the_cap_still_decodes_with_its_size_and_hash() -> None:
    assert V1_DEAD_LETTER[2:10] != latest_versions()["DeadLetter"].fingerprint  # really the older version
    letter = DeadLetter.decode(V1_DEAD_LETTER)
    assert (letter.dead_letter_id, letter.error_kind, letter.payload, letter.key) == (
        "cg.transactions:2:7",
        "not_avro",
        b"\x00bad",
        b"k",
    )
    assert (letter.payload_size, letter.payload_truncated) == (4, False)
    assert letter.payload_sha256 == hashlib.sha256(b"\x00bad").hexdigest()
    raw = codec("DeadLetter").decode(V1_DEAD_LETTER)  # the plain dict: the schema's defaults
    assert (raw["payload_size"], raw["payload_sha256"], raw["payload_truncated"]) == (-1, "", False)


def test_a_decode_error_is_an_invalid_record_fit_for_a_dead_letter() -> None:
    with pytest.raises(InvalidRecord) as err:
        codec("PosTransaction").decode(b"garbage")
    assert isinstance(err.value, DecodeError) and isinstance(err.value, ValueError)
    assert _letter(error=err.value).error_kind == "not_avro"


# --------------------------------------------------------------------------------------------------
# Exception family

_BUILTIN_EXCEPTIONS = {
    name for name, obj in vars(builtins).items() if isinstance(obj, type) and issubclass(obj, BaseException)
}


def test_every_project_exception_derives_from_checkout_guard_error() -> None:
    """Statically: a class with a builtin exception base also names a project exception base."""
    offenders = []
    for package in ("schemas", "infra", "producers", "jobs", "sinks"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.ClassDef):
                    continue
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if bases & _BUILTIN_EXCEPTIONS and bases <= _BUILTIN_EXCEPTIONS and node.name != "CheckoutGuardError":
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name}")
    assert offenders == []


# --------------------------------------------------------------------------------------------------
# ScoredTransaction and Alert: dataclass, TypedDict of the Avro dict, Avro schema


@pytest.mark.parametrize(("record", "shape"), [(ScoredTransaction, ScoredTransactionAvro), (Alert, AlertAvro)])
def test_typed_dict_keys_equal_the_dataclass_and_the_avro_schema(record: type, shape: type) -> None:
    avro = [f["name"] for f in latest_versions()[record.AVRO_NAME].parsed["fields"]]
    dataclass_fields = [f.name for f in fields(record)]
    assert set(shape.__annotations__) == set(dataclass_fields) == set(avro)
    assert shape.__required_keys__ == frozenset(avro)  # the codec writes every field


class _Recorder:
    """Stands in for a codec: keeps each dict the scorer encodes, and encodes it for real."""

    def __init__(self, record_type: str) -> None:
        self.codec, self.seen = codec(record_type), []

    def encode(self, record: dict[str, Any]) -> bytes:
        self.seen.append(record)
        return self.codec.encode(record)


def test_the_scorer_writes_exactly_the_typed_dict_keys() -> None:
    scorer = Scorer(Settings(), clock=lambda: T0 / 1000 + 60)
    scorer._scored, scorer._alert = _Recorder("ScoredTransaction"), _Recorder("Alert")  # type: ignore[assignment]
    env = scorer.parse(sale("t1", amount=40).encode(), None, "transactions", 0, 1, T0)
    env, _ = scorer.observe(env, ScoringState())  # type: ignore[arg-type]
    scorer.decide_batch([env], faces=[FaceResult("MATCHED", "subj-t0", "SUSPECT", 91.5)])
    blocked = Decision("BLOCK", 100, ("watchlist_suspect", "customer_mismatch"))
    scorer._alert.encode(scorer.blocked_alert(env[0], blocked, FaceResult("MATCHED", "subj-t0", "SUSPECT", 91.5)))
    scorer.entrance(
        {"observation_id": "entrance:cam:1", "event_time": T0, "store_id": "store-001"},
        FaceResult("MATCHED", "subj-t0", "VIP", 90.0),
    )
    assert [set(r) for r in scorer._scored.seen] == [set(ScoredTransactionAvro.__annotations__)]
    kinds = {a["kind"] for a in scorer._alert.seen}
    assert kinds == {"BLOCKED_TRANSACTION", "WATCHLIST_MATCH", "VIP_ARRIVED"}
    assert all(set(a) == set(AlertAvro.__annotations__) for a in scorer._alert.seen)


def test_checkout_guard_error_is_the_base_of_invalid_record() -> None:
    assert issubclass(InvalidRecord, CheckoutGuardError) and issubclass(DecodeError, CheckoutGuardError)


def test_a_dead_letter_whose_key_was_cut_is_marked_truncated_so_it_is_never_re_driven() -> None:
    from schemas.errors import InvalidRecord
    from schemas.records import MAX_DEAD_LETTER_KEY, dead_letter

    letter = dead_letter(
        topic="t",
        partition=0,
        offset=1,
        key=b"k" * (MAX_DEAD_LETTER_KEY + 1),
        value=b"small",
        error=InvalidRecord("invalid", "x"),
        stage="s",
        failed_at=1,
    )
    assert letter.payload == b"small" and len(letter.key or b"") == MAX_DEAD_LETTER_KEY
    assert letter.payload_truncated
