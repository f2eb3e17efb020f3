"""A local server speaking Amazon Fraud Detector's and SageMaker Runtime's wire protocols.

Fraud Detector: ``POST /`` with ``X-Amz-Target: AWSHawksNestServiceFacade.GetEventPrediction`` and a
JSON 1.1 body; answers ``modelScores`` / ``ruleResults`` as the service does, and ``400 ValidationException`` to
a request the service refuses though botocore sends it (an ``entityId`` outside its pattern, such as one with a
``:``; an empty or over-8192-character variable value; no variables), and ``404 ResourceNotFoundException``, as
AWS does, to a detector, detector version or event type it does not have (:attr:`LocalModelServer.afd_detectors`,
``afd_event_types``). SageMaker Runtime:
``POST /endpoints/<name>/invocations`` with the raw body; answers one probability per CSV line.
Every request is recorded (path, headers, body) so tests can pin exactly what the client sent, and
``delay_s`` makes the server slower than a client's timeout.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

AFD_TARGET = "AWSHawksNestServiceFacade.GetEventPrediction"
AFD_ENTITY_ID_RE = re.compile(r"[0-9A-Za-z_.@+-]{1,256}")
"""GetEventPrediction's ``entities[].entityId`` (pattern ``^[0-9A-Za-z_.@+-]+$``, 1-256 characters)."""
AFD_VERSION_RE = re.compile(r"[1-9][0-9]{0,4}")
AFD_MAX_VALUE = 8192
"""Longest ``eventVariables`` value (characters); keys are 1-64 characters, values at least 1."""


def afd_problem(req: Any) -> str | None:
    """Why Fraud Detector answers ``ValidationException`` to this GetEventPrediction body, None if it does not.
    botocore checks the required members and most lengths, but no pattern and no map's size: those are checked at
    AWS, so here, or a client sending them passes its tests and fails there for every record."""
    if not isinstance(req, dict):
        return "the request body must be a JSON object"
    missing = [
        k
        for k in ("detectorId", "eventId", "eventTypeName", "entities", "eventTimestamp", "eventVariables")
        if k not in req
    ]
    if missing:
        return f"missing required member(s): {', '.join(missing)}"
    version = req.get("detectorVersionId")
    if version is not None and not (isinstance(version, str) and AFD_VERSION_RE.fullmatch(version)):
        return (
            "Value at 'detectorVersionId' failed to satisfy constraint: "
            "Member must satisfy regular expression pattern: ^([1-9][0-9]*)$"
        )
    for i, entity in enumerate(req["entities"] if isinstance(req["entities"], list) else [None]):
        entity_id = entity.get("entityId") if isinstance(entity, dict) else None
        if not (isinstance(entity_id, str) and AFD_ENTITY_ID_RE.fullmatch(entity_id)):
            return (
                f"Value at 'entities.{i + 1}.member.entityId' failed to satisfy constraint: "
                "Member must satisfy regular expression pattern: ^[0-9A-Za-z_.@+-]+$"
            )
    variables = req["eventVariables"]
    if not isinstance(variables, dict) or not variables:
        return (
            "Value at 'eventVariables' failed to satisfy constraint: Member must have length greater than or equal to 1"
        )
    for key, value in variables.items():
        if not 1 <= len(key) <= 64:
            return "Value at 'eventVariables' failed to satisfy constraint: Map keys must have length 1-64"
        if not (isinstance(value, str) and 1 <= len(value) <= AFD_MAX_VALUE):
            return (
                f"Value at 'eventVariables' failed to satisfy constraint: Map value must be a string of 1-"
                f"{AFD_MAX_VALUE} characters"
            )
    return None


def afd_missing(req: dict[str, Any], detectors: dict[str, tuple[str, ...]], event_types: tuple[str, ...]) -> str | None:
    """Why Fraud Detector answers ``ResourceNotFoundException`` to this (valid) GetEventPrediction body: a detector,
    a version of it or an event type that does not exist; None if all do. Answered 200 here, a wrong
    ``CG_MODEL__AFD_*`` setting passed every test and failed every record at AWS."""
    versions = detectors.get(req["detectorId"])
    if versions is None:
        return "detector not found"
    version = req.get("detectorVersionId")
    if not versions or (version is not None and version not in versions):
        return "detector version not found"
    if req["eventTypeName"] not in event_types:
        return "event type not found"
    return None


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class LocalModelServer:
    afd_score: float = 912.0
    afd_models: tuple[str, ...] = ("tx_model",)
    """The detector version's models, each answering ``afd_score``; ``()``: a rules-only version."""
    afd_detectors: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"transaction_event": ("1", "2")})
    """The detectors there are (the default ``CG_MODEL__AFD_DETECTOR_ID``'s), each with its version ids (the last
    is the active one, which a request without ``detectorVersionId`` gets)."""
    afd_event_types: tuple[str, ...] = ("transaction",)
    """The event types there are (the default ``CG_MODEL__AFD_EVENT_TYPE``)."""
    sagemaker_prob: float = 0.5
    delay_s: float = 0.0
    status: int = 200
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # answer in one go: no 40 ms delayed-ACK stalls per call

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.requests.append(Recorded("POST", self.path, dict(self.headers.items()), body))
                if server.delay_s:
                    time.sleep(server.delay_s)
                if server.status != 200:
                    self._send(
                        server.status,
                        b'{"__type": "InternalServerException", "message": "boom"}',
                        "application/x-amz-json-1.1",
                    )
                elif self.path == "/" and self.headers.get("X-Amz-Target") == AFD_TARGET:
                    try:
                        req = json.loads(body or b"null")
                        problem = afd_problem(req)
                    except ValueError:
                        problem = "the request body is not JSON"
                    if problem is not None:
                        error = {"__type": "ValidationException", "message": problem}
                        self._send(400, json.dumps(error).encode(), "application/x-amz-json-1.1")
                        return
                    if missing := afd_missing(req, server.afd_detectors, server.afd_event_types):
                        error = {"__type": "ResourceNotFoundException", "message": missing}
                        self._send(404, json.dumps(error).encode(), "application/x-amz-json-1.1")
                        return
                    answer = {
                        "modelScores": [
                            {
                                "modelVersion": {
                                    "modelId": model,
                                    "modelType": "TRANSACTION_FRAUD_INSIGHTS",
                                    "modelVersionNumber": "1.0",
                                },
                                "scores": {f"{model}_insightscore": server.afd_score},
                            }
                            for model in server.afd_models
                        ],
                        "ruleResults": [{"ruleId": "high_risk", "outcomes": ["block"]}],
                    }
                    self._send(200, json.dumps(answer).encode(), "application/x-amz-json-1.1")
                elif self.path.startswith("/endpoints/") and self.path.endswith("/invocations"):
                    rows = [line for line in body.decode().splitlines() if line]
                    out = "\n".join(str(server.sagemaker_prob) for _ in rows) + "\n"
                    self._send(200, out.encode(), "text/csv")
                else:
                    self._send(400, b'{"__type": "UnknownOperationException"}', "application/x-amz-json-1.1")

            def _send(self, status: int, payload: bytes, ctype: str) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
