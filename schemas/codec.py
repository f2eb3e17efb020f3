"""One codec for every topic: Avro single-object encoding, no registry needed.

Why single-object encoding: each message carries its schema identity (``C3 01`` + the 8-byte
CRC-64-AVRO fingerprint of the writer schema, little-endian) so any consumer can resolve old
and new versions without a schema registry, which the embedded stack cannot get from our package
registries. A production deployment with a registry can swap this module for the Confluent wire
format behind the same ``encode``/``decode`` seam.

Schemas live beside this file as ``avro/<snake_name>.v<N>.avsc``; the highest version of a record
is what we write and the reader schema we resolve into.

Two libraries, by measurement: fastavro parses the schemas and computes their fingerprints (and the
compatibility tests use it as a second implementation); cavro encodes and decodes the records,
because every transaction is decoded and its decision encoded in the scoring job's one Python
thread, and cavro does each in about half of fastavro's time (the bytes are identical). Like
Avro's own Java decoder, it does not look past the end of the record: trailing bytes are ignored.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import cavro
from fastavro import parse_schema
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas.errors import UNKNOWN_SCHEMA, InvalidRecord

AVRO_DIR = Path(__file__).resolve().parent / "avro"
MAGIC = b"\xc3\x01"
HEADER_LEN = 10
_FILE_RE = re.compile(r"^(?P<stem>[a-z_]+)\.v(?P<version>\d+)\.avsc$")


class DecodeError(InvalidRecord):
    """A message that cannot be decoded: an :class:`InvalidRecord` whose ``kind`` names the failure."""


@dataclass(frozen=True)
class SchemaVersion:
    name: str
    """Avro full name, e.g. ``checkoutguard.v1.PosTransaction``; the short name is the record type."""
    short_name: str
    version: int
    fingerprint: bytes
    parsed: dict
    path: Path
    text: str


def _fingerprint(parsed: dict) -> bytes:
    value = int(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"), 16)
    return value.to_bytes(8, "little")


@lru_cache(maxsize=1)
def load_schemas(avro_dir: Path = AVRO_DIR) -> dict[bytes, SchemaVersion]:
    """Every schema version on disk, by fingerprint."""
    out: dict[bytes, SchemaVersion] = {}
    for path in sorted(avro_dir.glob("*.avsc")):
        m = _FILE_RE.match(path.name)
        if not m:
            raise ValueError(f"schema file name must be <name>.v<N>.avsc: {path.name}")
        raw = json.loads(path.read_text())
        parsed = parse_schema(raw)
        assert isinstance(parsed, dict), f"{path.name}: a record schema parses to a dict"
        sv = SchemaVersion(
            name=f"{raw.get('namespace', '')}.{raw['name']}".lstrip("."),
            short_name=raw["name"],
            version=int(m["version"]),
            fingerprint=_fingerprint(parsed),
            parsed=parsed,
            path=path,
            text=path.read_text(),
        )
        out[sv.fingerprint] = sv
    return out


@lru_cache(maxsize=1)
def latest_versions() -> dict[str, SchemaVersion]:
    """Highest version of each record type, by short name (``PosTransaction``)."""
    latest: dict[str, SchemaVersion] = {}
    for sv in load_schemas().values():
        cur = latest.get(sv.short_name)
        if cur is None or sv.version > cur.version:
            latest[sv.short_name] = sv
    return latest


_CAVRO_OPTIONS = cavro.DEFAULT_OPTIONS.replace(record_decodes_to_dict=True)


class Codec:
    """Encode/decode one record type (dicts in Avro shape) with its latest schema as reader."""

    def __init__(self, record_type: str) -> None:
        try:
            self.schema = latest_versions()[record_type]
        except KeyError:
            raise ValueError(f"no schema for record type {record_type!r}") from None
        self.record_type = record_type
        self._header = MAGIC + self.schema.fingerprint
        self._known = load_schemas()
        self._writer = cavro.Schema(self.schema.text, options=_CAVRO_OPTIONS)
        self._readers: dict[bytes, cavro.Schema] = {self.schema.fingerprint: self._writer}

    def encode(self, record: Mapping[str, Any]) -> bytes:
        return self._header + self._writer.binary_encode(record)

    def decode(self, data: bytes | None) -> dict[str, Any]:
        """Decode or raise :class:`DecodeError` with a kind fit for a dead letter."""
        if not data:
            raise DecodeError("empty", "empty message")
        if len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise DecodeError("not_avro", "not an Avro single-object message (missing C3 01 header)")
        fingerprint = bytes(data[2:HEADER_LEN])
        reader = self._readers.get(fingerprint)
        if reader is None:
            reader = self._reader_for(fingerprint)
        try:
            return reader.binary_decode(bytes(data[HEADER_LEN:]))
        except Exception as exc:  # cavro raises EOFError, ValueError, ... on corrupt bodies
            raise DecodeError("corrupt", f"cannot decode {self.record_type} body: {exc}") from exc

    def _reader_for(self, fingerprint: bytes) -> cavro.Schema:
        """The latest schema resolved against an older (or newer) writer version of the same record."""
        writer = self._known.get(fingerprint)
        if writer is None:
            raise DecodeError(UNKNOWN_SCHEMA, f"unknown schema fingerprint {fingerprint.hex()}")
        if writer.short_name != self.record_type:
            raise DecodeError("wrong_type", f"expected {self.record_type}, got {writer.short_name}")
        reader = self._readers[fingerprint] = self._writer.reader_for_writer(
            cavro.Schema(writer.text, options=_CAVRO_OPTIONS)
        )
        return reader


class Projection:
    """Decode only ``fields`` of one record type, from any of its schema versions: the rest of the body (an
    embedding, say) is skipped, never decoded or held. For readers that need a few fields of many records."""

    def __init__(self, record_type: str, fields: tuple[str, ...]) -> None:
        latest = codec(record_type).schema
        kept = [f for f in latest.parsed["fields"] if f["name"] in fields]
        if len(kept) != len(fields):
            raise ValueError(f"{record_type} has no field {sorted(set(fields) - {f['name'] for f in kept})}")
        namespace, _, name = latest.parsed["name"].rpartition(".")
        reader = cavro.Schema(
            json.dumps({"type": "record", "name": name, "namespace": namespace, "fields": kept}), options=_CAVRO_OPTIONS
        )
        self.record_type = record_type
        self._readers = {
            version.fingerprint: reader.reader_for_writer(cavro.Schema(version.text, options=_CAVRO_OPTIONS))
            for version in load_schemas().values()
            if version.short_name == record_type
        }

    def decode(self, data: bytes | None) -> dict[str, Any]:
        """The projected fields, or :class:`DecodeError` (empty, not Avro, another record type, corrupt)."""
        if not data or len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise DecodeError("not_avro", "not an Avro single-object message")
        reader = self._readers.get(bytes(data[2:HEADER_LEN]))
        if reader is None:
            raise DecodeError(UNKNOWN_SCHEMA, f"not a {self.record_type} schema this code knows")
        try:
            return reader.binary_decode(bytes(data[HEADER_LEN:]))
        except Exception as exc:  # cavro raises EOFError, ValueError, ... on corrupt bodies
            raise DecodeError("corrupt", f"cannot decode {self.record_type} body: {exc}") from exc


@cache
def codec(record_type: str) -> Codec:
    """The shared codec of a record type."""
    return Codec(record_type)


def json_safe(value: Any) -> Any:
    """NaN and infinities as null, through dicts, lists and tuples: JSON cannot carry them (``json.dumps``
    would write ``NaN``; OpenSearch refuses it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
