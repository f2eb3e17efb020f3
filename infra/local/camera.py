"""A local stand-in for a store full of Meraki MV cameras: one process, any number of camera serials.

Why: the embedded default and the tests need cameras that behave like Meraki's, awkward parts
included, and that see *real* faces, so face matching is tested for real. It serves

- the Dashboard API snapshot endpoint ``POST /api/v1/devices/{serial}/camera/generateSnapshot``
  (API key checked; ``202 {"url", "expiry"}``; ``400 No video for specified timestamp`` for timestamps
  closer to now than ``local_no_video_ms``; ``400 {"errors": [...]}`` for a body that is not a JSON object, as
  Meraki answers it, never a 5xx a client would retry, and for a ``timestamp`` without a time zone; ``429`` +
  ``Retry-After`` over ``local_rate_limit_per_s``);
- the snapshot URLs, which answer ``404`` for the first ``local_not_ready_polls`` polls, then a
  640x480 JPEG rendered from face photos of whoever stood in front of that camera at that time;
- MV Sense over MQTT to ``settings.mqtt``: ``/merakimv/<serial>/raw_detections`` (one ``oid`` per
  tracked person) and zone ``0`` counts, while people are in view;
- a control API under ``/local``: ``POST /local/visits`` schedules a shopper (enter the store, pay at a
  lane, leave), ``GET /local/ground-truth`` says who stood at which camera when (and which photo the
  camera showed), ``GET /local/people`` lists identities, ``POST``/``DELETE /local/faults`` makes a
  camera misbehave (never ready, corrupt/empty/huge image, wrong content type, 5xx, slow).

Faces: a person is a set of photos. On a fresh machine the photos of the ``face_recognition`` 1.3.0
source package (installed by ``infra/install.sh`` into ``<stack>/faces``); more folders through
``CG_CAMERAS__LOCAL_PHOTO_DIRS`` (a folder of per-person subfolders, or flat ``name<N>.jpg`` files).

Run: ``python -m infra.local.camera`` (port ``CG_CAMERAS__LOCAL_PORT``, default 8765).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import math
import os
import re
import secrets
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import httpx
import paho.mqtt.client as mqtt
import typer
from PIL import Image, ImageDraw, ImageOps
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from infra import clock
from infra.clients.meraki import API_KEY_HEADER, NO_VIDEO, camera_for_lane, camera_location, entrance_camera
from infra.logs import LOG_LEVEL_HELP, UVICORN, setup_logging
from infra.settings import Settings, get_settings

log = logging.getLogger("infra.local.camera")

FRAME_W, FRAME_H = 640, 480
CROP_PX = 300
"""Tight face crops (<= 200 px) are upscaled to this, as a face near the camera."""
PHOTO_BOX = (560, 440)
"""Larger photos (portraits) are scaled to fit this box, so their face is still 100+ px."""
ENTRANCE_DWELL_MS = 4000
LANE_LEAD_MS = 15000
"""A shopper stands at the lane from this long before paying (or from when they entered) until leaving."""
SDIST_PHOTOS = Path("faces") / "face_recognition-1.3.0" / "tests" / "test_images"
"""Where infra/install.sh unpacks the face_recognition sdist's photos, relative to the stack dir."""
FAULTS = ("never_ready", "corrupt", "empty", "huge", "wrong_type", "server_error", "slow")
_IMAGE_EXT = (".jpg", ".jpeg", ".png")
_NAME_RE = re.compile(r"^(?P<name>[A-Za-z][A-Za-z_ -]*?)[-_]?\d*$")
_TOKEN_TTL_S = 600.0


# --------------------------------------------------------------------------------------------------
# People (photo sets)


def default_photo_dirs(settings: Settings) -> list[Path]:
    dirs = [Path(settings.stack_dir) / SDIST_PHOTOS]
    dirs += [Path(p) for p in settings.cameras.local_photo_dirs.split(os.pathsep) if p.strip()]
    return [d for d in dirs if d.is_dir()]


def load_people(dirs: Iterable[Path]) -> dict[str, tuple[Path, ...]]:
    """Identity -> photos. A folder with per-person subfolders uses only those (folder name = person);
    a flat folder names people by file stem without trailing digits (``obama2.jpg`` -> ``obama``),
    skipping partial faces and unnamed files. The same name in two folders is one person."""
    people: dict[str, set[Path]] = {}
    for d in dirs:
        subdirs = sorted(p for p in d.iterdir() if p.is_dir() and any(_images(p)))
        if subdirs:
            for sub in subdirs:
                people.setdefault(sub.name, set()).update(_images(sub))
            continue
        for photo in _images(d):
            m = _NAME_RE.match(photo.stem)
            if m and "partial" not in photo.stem.lower():
                people.setdefault(m["name"], set()).add(photo)
    return {name: tuple(sorted(p)) for name, p in sorted(people.items()) if p}


def _images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXT)


# --------------------------------------------------------------------------------------------------
# The scene: scheduled visits and who is where when


@dataclass(frozen=True, slots=True)
class Visit:
    visit_id: str
    person: str
    store_id: str
    lane_id: str
    enter_ms: int
    pay_ms: int
    leave_ms: int
    oid: int


@dataclass(frozen=True, slots=True)
class Presence:
    """Ground truth: ``person`` was in front of ``serial`` during [start_ms, end_ms)."""

    visit_id: str
    person: str
    photo: str
    serial: str
    store_id: str
    lane_id: str | None
    start_ms: int
    end_ms: int
    oid: int
    pay_ms: int | None = None
    """At a lane: when they pay. The camera shows whoever is paying nearest to the frame's time in front."""


class Scene:
    """Visits and the presences they imply. Pure and thread-safe; the server and tests share it."""

    def __init__(self, settings: Settings, people: dict[str, tuple[Path, ...]]) -> None:
        self.settings = settings
        self.people = people
        self._lock = threading.Lock()
        self._visits: dict[str, Visit] = {}
        self._presences: list[Presence] = []
        self._next_oid = clock.now_ms() % 1_000_000_000 * 1000

    def add_visit(
        self,
        person: str,
        store_id: str,
        lane_id: str,
        enter_ms: int,
        pay_ms: int,
        leave_ms: int,
        visit_id: str | None = None,
    ) -> Visit:
        if person not in self.people:
            raise ValueError(f"unknown person {person!r}")
        if not store_id or not lane_id:
            raise ValueError("store_id and lane_id are required")
        if not enter_ms <= pay_ms <= leave_ms:
            raise ValueError("need enter_ms <= pay_ms <= leave_ms")
        # Before anything is registered: ids that are no names are refused (InvalidRecord, a ValueError).
        door = entrance_camera(self.settings, store_id)
        lane = camera_for_lane(self.settings, store_id, lane_id)
        with self._lock:
            if visit_id and visit_id in self._visits:
                return self._visits[visit_id]  # idempotent re-registration
            self._next_oid += 2
            visit = Visit(
                visit_id or secrets.token_hex(8), person, store_id, lane_id, enter_ms, pay_ms, leave_ms, self._next_oid
            )
            self._visits[visit.visit_id] = visit
            # A quick shopper is seen at the door and at the lane at once (the cameras overlap), so the
            # entrance always sees them and the lane camera sees them from entering until leaving.
            lane_start = max(enter_ms, pay_ms - LANE_LEAD_MS)
            self._presences.append(self._presence(visit, door, None, enter_ms, enter_ms + ENTRANCE_DWELL_MS, visit.oid))
            self._presences.append(
                self._presence(visit, lane, lane_id, lane_start, leave_ms + 1, visit.oid + 1, pay_ms)
            )
        return visit

    def _presence(
        self, v: Visit, serial: str, lane_id: str | None, start: int, end: int, oid: int, pay_ms: int | None = None
    ) -> Presence:
        photos = self.people[v.person]
        photo = photos[zlib.crc32(f"{v.visit_id}/{serial}".encode()) % len(photos)]
        return Presence(v.visit_id, v.person, str(photo), serial, v.store_id, lane_id, start, end, oid, pay_ms)

    def at(self, serial: str, t_ms: int, *, second: bool = False) -> list[Presence]:
        """Who ``serial`` sees at ``t_ms``; at a lane the one paying nearest to ``t_ms`` first (at the counter).

        ``second``: ``t_ms`` is an API timestamp, which has whole seconds and stands for that second: the one
        paying within it comes first, then the nearest to its middle. Ranked from its start, a payer one
        second before was nearer, and stood at the counter in the picture of the next sale."""
        with self._lock:
            found = [p for p in self._presences if p.serial == serial and p.start_ms <= t_ms < p.end_ms]
        centre = t_ms + 500 if second else t_ms

        def rank(p: Presence) -> tuple[bool, int, int]:
            pay = p.pay_ms or p.start_ms
            return (not (second and t_ms <= pay < t_ms + 1000), abs(pay - centre), -p.start_ms)

        return sorted(found, key=rank)

    def visible_now(self, t_ms: int) -> dict[str, list[Presence]]:
        with self._lock:
            out: dict[str, list[Presence]] = {}
            for p in self._presences:
                if p.start_ms <= t_ms < p.end_ms:
                    out.setdefault(p.serial, []).append(p)
            return out

    def ground_truth(self, serial: str | None = None, since_ms: int = 0) -> list[Presence]:
        with self._lock:
            return [p for p in self._presences if (serial is None or p.serial == serial) and p.end_ms > since_ms]


# --------------------------------------------------------------------------------------------------
# Rendering


def _background(serial: str) -> Image.Image:
    """A plausible, deterministic store backdrop per camera: wall, floor, shelves."""
    seed = zlib.crc32(serial.encode())
    wall = (150 + seed % 60, 150 + (seed >> 8) % 60, 140 + (seed >> 16) % 60)
    img = Image.new("RGB", (FRAME_W, FRAME_H), wall)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 330, FRAME_W, FRAME_H), fill=(95, 90, 85))
    for i in range(4):
        x0 = 20 + i * 160 + (seed >> i) % 20
        draw.rectangle((x0, 60, x0 + 110, 320), fill=(120, 85, 60))
        for shelf in range(4):
            y = 90 + shelf * 60
            draw.rectangle((x0 + 5, y, x0 + 105, y + 35), fill=((seed >> shelf) % 200 + 30, 120, 160 - shelf * 25))
    return img


def _photo(path: str, cache: dict[str, Image.Image]) -> Image.Image:
    img = cache.get(path)
    if img is None:
        with Image.open(path) as raw:
            img = ImageOps.exif_transpose(raw).convert("RGB")
        if img.height > 1.4 * img.width:  # a full-length photo: the lane camera frames head and shoulders
            img = img.crop((0, 0, img.width, round(img.width * 1.1)))
        scale = (
            CROP_PX / max(img.size)
            if max(img.size) <= 200
            else min(PHOTO_BOX[0] / img.width, PHOTO_BOX[1] / img.height)
        )
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS
        )
        cache[path] = img
    return img


def render(
    serial: str, t_ms: int, presences: list[Presence], cache: dict[str, Image.Image] | None = None, quality: int = 85
) -> bytes:
    """A 640x480 JPEG of ``serial`` at ``t_ms``: the first presence large and central, others behind."""
    cache = {} if cache is None else cache
    img = _background(serial)
    draw = ImageDraw.Draw(img)
    for rank, p in reversed(list(enumerate(presences[:3]))):
        photo = _photo(p.photo, cache)
        if rank:
            photo = photo.resize((photo.width // 2, photo.height // 2))
        sway = int(8 * math.sin(t_ms / 700.0 + rank))
        x = (FRAME_W - photo.width) // 2 + sway + rank * 180 * (1 if rank % 2 else -1)
        y = min(40, FRAME_H - 40 - photo.height) + rank * 30
        body = (x - 20, y + photo.height - 10, x + photo.width + 20, FRAME_H)
        draw.rectangle(body, fill=(40 + zlib.crc32(p.person.encode()) % 150, 60, 90))
        img.paste(photo, (x, y))
    stamp = datetime.fromtimestamp(t_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    draw.rectangle((0, FRAME_H - 18, FRAME_W, FRAME_H), fill=(0, 0, 0))
    draw.text((6, FRAME_H - 15), f"{serial}  {stamp}Z", fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# MV Sense over MQTT


def raw_detections_payload(t_ms: int, presences: list[Presence], frame: int) -> dict:
    objects = []
    for i, p in enumerate(presences):
        x0 = 0.3 + 0.05 * i
        objects.append(
            {
                "frame": frame,
                "oid": p.oid,
                "type": "person",
                "x0": round(x0, 3),
                "y0": 0.1,
                "x1": round(x0 + 0.4, 3),
                "y1": 0.95,
            }
        )
    return {"ts": t_ms, "objects": objects}


class MvSensePublisher:
    """Publishes what each camera sees, ``local_publish_hz`` times a second, like MV Sense does."""

    def __init__(self, settings: Settings, scene: Scene) -> None:
        self.settings, self.scene = settings, scene
        self.prefix = settings.cameras.mqtt_topic_prefix
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"local-camera-{secrets.token_hex(4)}")
        # paho hints the delays as int; it waits a float delay as given
        self._client.reconnect_delay_set(0.5, 5)  # type: ignore[arg-type]
        mq = settings.mqtt
        if mq.username:  # a broker that refuses anonymous clients (CG_MQTT__USERNAME/PASSWORD)
            self._client.username_pw_set(mq.username, mq.password.get_secret_value() if mq.password else None)
        self._counts: dict[str, int] = {}
        self._frame = 0
        self.published = 0

    def start(self) -> None:
        self._client.connect_async(self.settings.mqtt.host, self.settings.mqtt.port, keepalive=30)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, name="mv-sense", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self._client.loop_stop()
        self._client.disconnect()

    def _run(self) -> None:
        period = 1.0 / self.settings.cameras.local_publish_hz
        while not self._stop.wait(period):
            try:
                self.tick(clock.now_ms())
            except Exception:  # keep publishing whatever one tick did
                log.exception("mv sense tick failed")

    def tick(self, now_ms: int) -> None:
        if not self._client.is_connected():
            return
        self._frame += 1
        visible = self.scene.visible_now(now_ms)
        for serial in set(visible) | {s for s, n in self._counts.items() if n}:
            people = visible.get(serial, [])
            base = f"{self.prefix}/merakimv/{serial}"
            if people:
                self._publish(f"{base}/raw_detections", raw_detections_payload(now_ms, people, self._frame))
            if self._counts.get(serial) != len(people):
                self._publish(f"{base}/0", {"ts": now_ms, "counts": {"person": len(people), "vehicle": 0}})
                self._counts[serial] = len(people)

    def _publish(self, topic: str, payload: dict) -> None:
        self._client.publish(topic, json.dumps(payload), qos=1)
        self.published += 1


# --------------------------------------------------------------------------------------------------
# HTTP


class _RateLimit:
    """Token bucket over the whole "organisation", as the Dashboard API limits it."""

    def __init__(self, rate: float) -> None:
        self.rate, self.tokens, self.at = rate, rate, time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0 when allowed, else seconds until a token is free."""
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            return (1 - self.tokens) / self.rate


@dataclass
class _Pending:
    serial: str
    t_ms: int
    created: float
    fault: dict | None
    second: bool = False
    """``t_ms`` came as the API's timestamp (whole seconds), not "now": :meth:`Scene.at`."""
    polls: int = 0
    image: bytes | None = None


def _parse_ts(value: str) -> int:
    """An ISO 8601 timestamp with its time zone (``Z`` or an offset), as the Dashboard API requires; one without
    (``2026-11-22T10:15:00``) is a ``ValueError``: read here as UTC, a client sending local time passed its tests
    and asked Meraki for footage hours off, or was refused there."""
    text = value.strip().replace("Z", "+00:00")
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError("a timestamp without a time zone")
    return int(when.timestamp() * 1000)


def _same_key(given: str, expected: str) -> bool:
    """Whether the request's API key is the configured one, compared in constant time as a real server should (``!=``
    stops at the first differing character, so its timing tells a guesser how much of the key is right); as bytes, so
    a header with characters beyond ASCII is a 401, not the ``TypeError`` of comparing such strings."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


def _err(status: int, *errors: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"errors": list(errors)}, status_code=status, headers=headers)


class LocalCameraApp:
    """The Starlette app; ``scene`` and ``faults`` are public so in-process tests can use them directly."""

    def __init__(self, settings: Settings, people: dict[str, tuple[Path, ...]] | None = None) -> None:
        self.settings = settings
        self.cfg = settings.cameras
        self.scene = Scene(settings, people if people is not None else load_people(default_photo_dirs(settings)))
        self.faults: dict[str, dict] = {}
        self.snapshots_served = 0
        self._pending: dict[str, _Pending] = {}
        self._limit = _RateLimit(self.cfg.local_rate_limit_per_s)
        self._photos: dict[str, Image.Image] = {}
        self._render_lock = threading.Lock()
        self.app = Starlette(
            routes=[
                Route("/api/v1/devices/{serial}/camera/generateSnapshot", self.generate, methods=["POST"]),
                Route("/snapshots/{token}.jpg", self.image, methods=["GET"]),
                Route("/local/visits", self.visits, methods=["POST"]),
                Route("/local/ground-truth", self.truth, methods=["GET"]),
                Route("/local/people", self.list_people, methods=["GET"]),
                Route("/local/faults", self.set_fault, methods=["POST", "DELETE"]),
                Route("/local/health", lambda _r: JSONResponse({"ok": True}), methods=["GET"]),
            ]
        )

    # -- Dashboard API -----------------------------------------------------------------------------

    async def generate(self, request: Request) -> Response:
        key = request.headers.get(API_KEY_HEADER) or request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not _same_key(key, self.cfg.api_key.get_secret_value()):
            return _err(401, "Invalid API key")
        wait = self._limit.take()
        if wait:
            return _err(429, "API rate limit exceeded for organization", headers={"Retry-After": str(math.ceil(wait))})
        serial = request.path_params["serial"]
        if camera_location(self.settings, serial) is None:
            return _err(404, "Device not found")
        try:
            body = await request.json() if await request.body() else {}
        except ValueError:
            return _err(400, "Invalid JSON body")
        if not isinstance(body, dict):  # JSON, but a list, a string, a number or null: refused as Meraki does
            return _err(400, "The request body must be a JSON object")
        now_ms = clock.now_ms()
        t_ms = now_ms
        if body.get("timestamp"):
            if body.get("fullframe"):
                return _err(400, "fullframe is not supported with timestamp")
            try:
                t_ms = _parse_ts(str(body["timestamp"]))
            except ValueError:
                return _err(400, "Invalid timestamp")
            if t_ms > now_ms - self.cfg.local_no_video_ms:
                return _err(400, NO_VIDEO)
        fault = self.faults.get(serial)
        if fault and fault["fault"] == "server_error" and self._use(fault):
            return _err(500, "Internal server error")
        token = secrets.token_urlsafe(16)
        self._prune()
        self._pending[token] = _Pending(
            serial, t_ms, time.monotonic(), dict(fault) if fault else None, second=bool(body.get("timestamp"))
        )
        expiry = datetime.fromtimestamp(now_ms / 1000 + 300, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # as Meraki words it
        url = f"{request.base_url}snapshots/{token}.jpg"
        return JSONResponse({"url": url, "expiry": f"Access to the image will expire at {expiry}."}, status_code=202)

    def _use(self, fault: dict) -> bool:
        """Consume one use of a counted fault (``count`` absent = forever)."""
        if "count" not in fault:
            return True
        if fault["count"] <= 0:
            return False
        fault["count"] -= 1
        return True

    def _prune(self) -> None:
        if len(self._pending) > 2000:
            cutoff = time.monotonic() - _TOKEN_TTL_S
            for token in [t for t, p in self._pending.items() if p.created < cutoff]:
                del self._pending[token]

    async def image(self, request: Request) -> Response:
        pending = self._pending.get(request.path_params["token"])
        if pending is None:
            return Response(b"<Error><Code>NoSuchKey</Code></Error>", 404, media_type="application/xml")
        pending.polls += 1
        fault = (pending.fault or {}).get("fault")
        if fault == "never_ready" or pending.polls <= self.cfg.local_not_ready_polls:
            return Response(b"<Error><Code>NoSuchKey</Code></Error>", 404, media_type="application/xml")
        if fault == "slow":
            await asyncio.sleep(float(pending.fault.get("delay_s", 5.0)))  # type: ignore[union-attr]
        if fault == "empty":
            return Response(b"", 200, media_type="image/jpeg")
        if fault == "wrong_type":
            return Response(b"<html>Access denied</html>", 200, media_type="text/html")
        if fault == "huge":
            return Response(
                b"\xff\xd8\xff\xe0" + b"\0" * (self.cfg.max_image_bytes + 1024), 200, media_type="image/jpeg"
            )
        if pending.image is None:
            people = self.scene.at(pending.serial, pending.t_ms, second=pending.second)
            pending.image = await asyncio.to_thread(self._render, pending.serial, pending.t_ms, people)
        data = pending.image
        if fault == "corrupt":
            data = data[:200] + bytes(len(data) - 200)
        self.snapshots_served += 1
        return Response(data, 200, media_type="image/jpeg")

    def _render(self, serial: str, t_ms: int, people: list[Presence]) -> bytes:
        with self._render_lock:  # the photo cache is shared
            return render(serial, t_ms, people, self._photos)

    # -- control API -------------------------------------------------------------------------------

    async def visits(self, request: Request) -> Response:
        try:
            body = await request.json()
            visit = self.scene.add_visit(
                str(body["person"]),
                str(body["store_id"]),
                str(body["lane_id"]),
                int(body["enter_ms"]),
                int(body["pay_ms"]),
                int(body["leave_ms"]),
                body.get("visit_id"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            return _err(400, f"bad visit: {exc}")
        return JSONResponse(asdict(visit), status_code=201)

    async def truth(self, request: Request) -> Response:
        serial = request.query_params.get("serial")
        since = int(request.query_params.get("since_ms", 0))
        return JSONResponse([asdict(p) for p in self.scene.ground_truth(serial, since)])

    async def list_people(self, _request: Request) -> Response:
        return JSONResponse({name: [str(p) for p in photos] for name, photos in self.scene.people.items()})

    async def set_fault(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.faults.clear()
            return JSONResponse({"faults": {}})
        body = await request.json()
        if body.get("fault") not in FAULTS or not body.get("serial"):
            return _err(400, f"need serial and fault in {FAULTS}")
        self.faults[str(body["serial"])] = {k: v for k, v in body.items() if k != "serial"}
        return JSONResponse({"faults": self.faults})


# --------------------------------------------------------------------------------------------------
# Running it


class LocalCameraServer:
    """The app under uvicorn in a background thread (tests, the demo); ``publish`` adds MV Sense MQTT."""

    def __init__(
        self,
        settings: Settings,
        port: int | None = None,
        publish: bool = True,
        people: dict[str, tuple[Path, ...]] | None = None,
    ) -> None:
        import uvicorn

        self.settings = settings
        self.port = port if port is not None else settings.cameras.local_port
        self.camera = LocalCameraApp(settings, people)
        self.publisher = MvSensePublisher(settings, self.camera.scene) if publish else None
        config = uvicorn.Config(
            self.camera.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            **UVICORN,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="local-camera", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> LocalCameraServer:
        if self._thread.is_alive():
            return self
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"local camera did not start on port {self.port}")
            time.sleep(0.02)
        if self.publisher:
            self.publisher.start()
        return self

    def stop(self) -> None:
        if self.publisher:
            self.publisher.stop()
        self._server.should_exit = True
        self._thread.join(10)

    def __enter__(self) -> LocalCameraServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalCameraControl:
    """Client of the ``/local`` control API (the shopper driver and tests)."""

    def __init__(self, base_url: str, http: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http or httpx.Client(timeout=10)

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalCameraControl:
        return cls(f"http://127.0.0.1:{settings.cameras.local_port}")

    def people(self) -> dict[str, list[str]]:
        return self._ok(self._http.get(f"{self.base_url}/local/people")).json()

    def add_visit(
        self,
        person: str,
        store_id: str,
        lane_id: str,
        enter_ms: int,
        pay_ms: int,
        leave_ms: int,
        visit_id: str | None = None,
    ) -> dict:
        body = {
            "person": person,
            "store_id": store_id,
            "lane_id": lane_id,
            "enter_ms": enter_ms,
            "pay_ms": pay_ms,
            "leave_ms": leave_ms,
            "visit_id": visit_id,
        }
        return self._ok(self._http.post(f"{self.base_url}/local/visits", json=body)).json()

    def ground_truth(self, serial: str | None = None, since_ms: int = 0) -> list[dict]:
        params: dict[str, str | int] = {"since_ms": since_ms}
        if serial:
            params["serial"] = serial
        return self._ok(self._http.get(f"{self.base_url}/local/ground-truth", params=params)).json()

    def set_fault(self, serial: str, fault: str, **options: object) -> None:
        self._ok(self._http.post(f"{self.base_url}/local/faults", json={"serial": serial, "fault": fault, **options}))

    def clear_faults(self) -> None:
        self._ok(self._http.delete(f"{self.base_url}/local/faults"))

    def close(self) -> None:
        self._http.close()

    @staticmethod
    def _ok(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise RuntimeError(f"local camera: HTTP {response.status_code}: {response.text[:200]}")
        return response


def main(log_level: str | None = None) -> None:
    settings = get_settings()
    setup_logging(settings, log_level, "camera")
    server = LocalCameraServer(settings)
    if not server.camera.scene.people:
        log.warning("no face photos found (run `make setup`, or set CG_CAMERAS__LOCAL_PHOTO_DIRS)")
    server.start()
    log.info(
        "serving %d people on %s (Dashboard API at %s/api/v1)",
        len(server.camera.scene.people),
        server.base_url,
        server.base_url,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@cli.command()
def run(log_level: Annotated[str | None, typer.Option(help=LOG_LEVEL_HELP)] = None) -> None:
    """Serve the local Meraki-compatible cameras (Dashboard API snapshots, MV Sense over MQTT) until Ctrl-C."""
    if log_level is None:
        main()  # CG_LOG__LEVEL
    else:
        main(log_level)


if __name__ == "__main__":
    from infra.cli import run_service

    run_service(cli)
