"""``checkout <tx>`` from the Webex bot: snapshot that checkout's lane camera now, compare the face.

Seed 000's core gesture. The transaction's store, lane and time come from the scored transaction
(OpenSearch); the lane camera's footage *at the transaction time* is fetched through the Meraki
snapshot API (the same client the face stage uses), analysed by the face engine, and compared with
the current watchlist, read to its end from the compacted topic. With the Rekognition backend the usable
faces are searched in the collection instead (as the face stage does) and the watchlist only names the subject's
category. The reply says what was found, and by which engine with the Rekognition backend; the image is kept in
the image store like any checkout snapshot (and purged with them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from infra.clock import now_ms
from infra.settings import Settings
from schemas.codec import codec
from schemas.errors import CheckoutGuardError, InvalidRecord
from schemas.similarity import category_words, similarity_text, threshold_text
from schemas.topics import WATCHLIST

log = logging.getLogger("checkout_guard.checkout_inspect")

Lookup = Callable[[str], dict[str, Any] | None]

FACE_MATCH_CAVEAT = "A face match is a lead, not proof: compare the faces yourself before anyone acts."
"""Ends every ``checkout <tx>`` reply that names a watch-listed match (as an alert's "Please" line does): security
reads the bot's answer, not only the alert, and a subject id with a similarity read as a verdict."""


def match_caveat(threshold: float | None = None, by_rekognition: bool = False) -> str:
    """What follows a match's similarity in a reply: the threshold it was matched at (on the engine's own 0-100
    scale: 68.8 is a clear local match, 99.1 a bare Rekognition one), then :data:`FACE_MATCH_CAVEAT`."""
    at = f" ({threshold_text(threshold, by_rekognition)})" if threshold is not None else ""
    return f"{at}. {FACE_MATCH_CAVEAT}"


def opensearch_lookup(settings: Settings, client: Any, kind: str = "transactions") -> Lookup:
    """The scored transaction by id (store, lane, event time, outcome, face result), or with ``kind="cases"``
    the case, or ``None`` if not indexed; read with ``client`` (an OpenSearch client; its owner closes it).
    Errors propagate."""
    from schemas.indices import index_name

    index = index_name(settings.opensearch.index_prefix, kind)

    def lookup(tx_id: str) -> dict[str, Any] | None:
        hits = client.search(index=index, body={"query": {"ids": {"values": [tx_id]}}, "size": 1})["hits"]["hits"]
        return hits[0]["_source"] if hits else None

    return lookup


def load_watchlist(settings: Settings):
    """The watchlist as it is now: the compacted topic read to its end."""
    from infra.clients.control_topics import read_control_topics
    from jobs.scoring.watchlist import Watchlist

    watchlist = Watchlist(settings)
    entries = codec("WatchlistEntry")

    def apply(_topic: str, key: bytes | None, value: bytes | None) -> None:
        if value is None:
            watchlist.remove((key or b"").decode())
            return
        try:
            watchlist.upsert(entries.decode(value))
        except InvalidRecord as err:  # one unusable entry (e.g. of another embedder) must not hide the others
            log.warning("watchlist entry %s left out: %s", (key or b"").decode(errors="replace")[:80], err.reason)

    read_control_topics(settings, apply, specs=(WATCHLIST,))
    return watchlist


class CheckoutInspector:
    """Callable ``tx_id -> reply text``; every part injectable so tests can use local servers.
    :meth:`close` closes the clients it built itself (camera API, OpenSearch); injected parts stay the caller's."""

    def __init__(
        self,
        settings: Settings,
        lookup: Lookup | None = None,
        snapshot=None,
        engine=None,
        watchlist_loader: Callable[[], Any] | None = None,
        store=None,
        collection=None,
    ) -> None:
        """``collection``: the Rekognition collection to search (built on first use with the Rekognition
        backend)."""
        self.settings = settings
        self._collection = collection
        self._lookup = lookup
        self._snapshot = snapshot
        self._engine = engine
        self._watchlist_loader = watchlist_loader or (lambda: load_watchlist(settings))
        self._store = store
        self._owned: list[Any] = []

    def close(self) -> None:
        owned, self._owned = self._owned, []
        for client in owned:
            client.close()

    def __enter__(self) -> CheckoutInspector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _parts(self):
        """Built on first use: the bot should start even when the camera API or models are slow."""
        if self._lookup is None:
            from infra.clients.opensearch import make_client

            opensearch = make_client(self.settings.opensearch, timeout_s=5)
            self._owned.append(opensearch)
            self._lookup = opensearch_lookup(self.settings, opensearch)
        if self._snapshot is None:
            from infra.clients.meraki import MerakiClient

            camera = MerakiClient.from_settings(self.settings)
            self._owned.append(camera)
            self._snapshot = camera.snapshot
        if self._engine is None:
            from jobs.faces.engine import FaceEngine

            self._engine = FaceEngine(self.settings.faces)
        if self._store is None:
            from infra.clients.image_store import ImageStore

            self._store = ImageStore.from_settings(self.settings)
        if self._collection is None:
            from jobs.faces.stage import collection_of

            self._collection = collection_of(self.settings)
        return self._lookup, self._snapshot, self._engine, self._store

    def __call__(self, tx_id: str) -> str:
        from infra.clients.meraki import SnapshotError, camera_for_lane
        from jobs.faces.stage import inspection_image_key

        if not tx_id:
            return "Which transaction? Write `checkout <transaction id>`."
        lookup, snapshot, engine, store = self._parts()
        try:
            doc = lookup(tx_id)
        except Exception as exc:  # noqa: BLE001 - OpenSearch down: say so instead of failing the reply
            return f"I cannot look up `{tx_id}` right now ({type(exc).__name__})."
        if doc is None:
            return f"I do not know transaction `{tx_id}` (not decided yet, or a typo?)."
        missing = _missing(doc)
        if missing:  # a document of another writer, or damaged: a KeyError here left the bot's reply unsent
            return (
                f"Transaction `{tx_id}` is indexed without its {', '.join(missing)}: I cannot tell which camera to ask."
            )
        try:
            serial = camera_for_lane(self.settings, doc["store_id"], doc["lane_id"])
        except InvalidRecord as exc:  # a document from before ids were checked at the edge
            return f"Transaction `{tx_id}` has no camera I may ask: {exc.reason}."
        where = f"store {doc['store_id']} lane {doc['lane_id']}"
        try:
            shot = snapshot(serial, timestamp_ms=doc["event_time"])
        except SnapshotError as exc:
            return f"Transaction `{tx_id}` at {where}: no snapshot from camera {serial} ({exc.kind})."
        # A live view is no picture of the sale: kept where no enrollment (``fraud <tx>``) finds it.
        try:
            store.put("checkout", inspection_image_key(tx_id, not shot.fell_back_to_now), shot.image)
        except Exception as exc:  # noqa: BLE001 - the image store away: the comparison is still the answer
            log.warning("the checkout %s picture was not kept (%s)", tx_id, type(exc).__name__)
            unkept = f" The picture was not kept (image store: {type(exc).__name__})."
        else:
            unkept = ""
        return self._compared(tx_id, where, shot, engine) + unkept

    def _compared(self, tx_id: str, where: str, shot: Any, engine: Any) -> str:
        """The reply once the snapshot is there: its faces, compared with the watchlist (or searched in Rekognition)."""
        try:
            faces = engine.analyse(shot.image, max_embedded=1)  # only the largest face is compared locally
        except Exception as exc:  # noqa: BLE001 - a bad image is an answer, not a crash
            return f"Transaction `{tx_id}` at {where}: the snapshot could not be analysed ({type(exc).__name__})."
        usable = [f for f in faces if f.passed]
        if not usable:
            why = faces[0].reject_reason if faces else "no face in the frame"
            return f"Transaction `{tx_id}` at {where}: fresh snapshot taken, no usable face ({why})."
        face = max(usable, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
        try:
            match = self._match(shot.image, usable, face)
        except _SearchFailed as exc:
            return f"Transaction `{tx_id}` at {where}: a face was seen; Rekognition unavailable ({exc})."
        except Exception as exc:  # noqa: BLE001 - Kafka down: still report the face
            return f"Transaction `{tx_id}` at {where}: a face was seen; watchlist unavailable ({type(exc).__name__})."
        when = "(footage of the transaction time)" if not shot.fell_back_to_now else "(live view: no footage stored)"
        if match is None:
            return (
                f"Transaction `{tx_id}` at {where}: fresh snapshot {when}; a face (quality {face.quality:.2f}) "
                "that matches nobody on the watchlist."
            )
        rekognition = self._collection is not None
        faces = self.settings.faces
        similar = f"({similarity_text(match.similarity)}% similar{' by Rekognition' if rekognition else ''})"
        caveat = match_caveat(faces.rekognition_match_threshold if rekognition else faces.match_threshold, rekognition)
        if shot.fell_back_to_now:  # whoever stands at the lane now: not the buyer of that sale
            return (
                f"Transaction `{tx_id}` at {where}: no footage of the sale, so a live view; the face at the lane now "
                f"matches **{category_words(match.category)}** `{match.subject_id}` {similar}. "
                f"This is not the buyer's picture{caveat}"
            )
        return (
            f"Transaction `{tx_id}` at {where}: fresh snapshot {when}; the face matches "
            f"**{category_words(match.category)}** `{match.subject_id}` {similar}{caveat}"
        )

    def _match(self, image: bytes, usable: list, face: Any) -> Any:
        """The watchlist match of the snapshot: the largest face's embedding searched locally, or with the
        Rekognition backend every usable face searched in the collection (the subject named from the watchlist:
        one it no longer holds is no match). Raises :class:`_SearchFailed` when Rekognition failed."""
        now = now_ms()  # an entry lapsed by now names nobody (the watchlist service may not have removed it yet)
        if self._collection is None:
            return self._watchlist_loader().search(face.embedding, now)
        from jobs.faces.rekognition import search_faces
        from jobs.scoring.watchlist import Match

        found = search_faces(self._collection, image, usable)
        if found.match is None:
            if found.failed is not None:
                raise _SearchFailed(found.failed)
            return None
        category = self._watchlist_loader().category(found.match.subject_id, now)
        return Match(found.match.subject_id, category, found.match.similarity) if category else None


def _missing(doc: Any) -> list[str]:
    """The fields a snapshot needs that the indexed transaction lacks (or has of another type)."""
    if not isinstance(doc, dict):
        return ["store_id", "lane_id", "event_time"]
    wanted = {"store_id": str, "lane_id": str, "event_time": int}
    return [
        name for name, kind in wanted.items() if not isinstance(doc.get(name), kind) or isinstance(doc.get(name), bool)
    ]


class _SearchFailed(CheckoutGuardError):
    """Rekognition could not search the snapshot (its error code)."""
