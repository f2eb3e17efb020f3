"""The batch frames between the JVM and the Python scoring step (``jobs/flink/frames.py``)."""

from jobs.flink.frames import OutputBatch, pack_records, unpack_outputs, unpack_records


def test_record_batches_round_trip_null_keys_empty_values_big_offsets_and_the_redrive_header():
    records = [
        (b"store-1/lane-1", b"\xc3\x01payload", "transactions", 0, 42, 1_700_000_000_000, None),
        (None, b"", "face_observations", 3, 2**40, 0, b""),
        (b"k", None, "transactions", 1, 0, -1, b"transactions:decide:t1@0:42"),
    ]
    got = list(unpack_records(pack_records(records)))
    assert got == records
    assert got[2].redriven == b"transactions:decide:t1@0:42"


def test_a_record_packed_without_headers_unpacks_with_none():
    got = list(unpack_records(pack_records([(b"k", b"v", "transactions", 0, 1, 2)])))
    assert got == [(b"k", b"v", "transactions", 0, 1, 2, None)]


def test_an_empty_batch_has_no_records():
    assert list(unpack_records(b"")) == []
    assert OutputBatch().to_bytes() == b""


def test_output_batches_keep_order_topic_key_and_value():
    out = OutputBatch()
    out.add("processed_transactions", b"t1", b"v1")
    out.add("dead_letters", b"transactions:0:1", None)
    out.add("alerts", None, b"")
    assert out.count == 3
    assert list(unpack_outputs(out.to_bytes())) == [
        ("processed_transactions", b"t1", b"v1"),
        ("dead_letters", b"transactions:0:1", None),
        ("alerts", None, b""),
    ]
