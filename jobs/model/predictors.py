"""Predictor backends for the job: the local model, Amazon Fraud Detector, a SageMaker endpoint.

All answer ``predict_batch([(tx, indicators), ...]) -> [ModelResult, ...]`` (score 0-1000 calibrated
by false-positive rate, which backend answered, model time). The remote ones are guarded, because a
scoring job must not stall on a network call:

* a **timeout** on connect and read (botocore ``Config``), botocore's own retries off;
* **bounded retries** of our own (``retries`` extra attempts) for timeouts, throttling and 5xx;
* a **circuit breaker**: after ``breaker_failures`` consecutive failed calls it opens and every
  record goes straight to the fallback; after ``breaker_cooldown_s`` one trial call (half-open)
  decides whether it closes again;
* **fallback to the local model** for every record the remote backend did not score; such results
  say so in their version (``local:<ver> (fallback)``).

Fraud Detector's ``GetEventPrediction`` scores one event per call (that is the API), so records of a
batch are sent concurrently (``concurrency``); SageMaker takes the whole batch as one ``text/csv``
body of feature vectors (seed 002's XGBoost endpoint) and answers one probability per line.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any

import numpy as np

from infra.retry import call_with_retries
from infra.settings import Settings
from jobs.model.drift import RetiredVersions
from jobs.model.fraud_model import FEATURE_NAMES, Item, LocalModel, ModelArtifactError, feature_matrix
from jobs.model.registry import ModelRegistry, load_version
from jobs.scoring.rules import ModelResult
from jobs.scoring.scorer import Predictor
from schemas.afd_csv import AFD_MAX_VARIABLE_CHARS, afd_entity_id
from schemas.errors import CheckoutGuardError
from schemas.model_artifact import FALLBACK_SUFFIX
from schemas.records import AlertAvro, ModelDriftAvro

log = logging.getLogger("checkout_guard.predictors")

AFD_VARIABLES: tuple[tuple[str, str], ...] = (
    ("order_price", "amount"),
    ("customer_email", "customer_email"),
    ("ip_address", "ip_address"),
    ("payment_currency", "currency"),
    ("billing_longitude", "billing_longitude"),
    ("billing_latitude", "billing_latitude"),
    ("billing_zip", "billing_zip"),
    ("billing_state", "billing_state"),
    ("user_agent", "user_agent"),
    ("billing_street", "billing_street"),
    ("billing_city", "billing_city"),
    ("card_bin", "card_bin"),
    ("customer_name", "customer_name"),
    ("product_category", "product_category"),
    ("customer_job", "customer_job"),
    ("phone", "billing_phone"),
)
"""Seed 004's detector variables (Fraud Detector name, transaction field); values are sent as strings."""
UNKNOWN_ENTITY = "unknown"
"""Fraud Detector's entity id for an event without a known entity."""
RECORD_FAULT_MEMBERS = ("'eventVariables", "'entities")
"""A ``ValidationException`` naming one of these members refuses the record's own values (a variable, its entity),
not the service or a setting: see :meth:`FraudDetectorPredictor._record_fault`."""


class RemoteError(CheckoutGuardError, RuntimeError):
    """A remote model call failed; ``retryable`` says whether another attempt may succeed. ``cause``, on one
    that will fail again the same way (a setting, not an outage), says why and which setting to check, in
    words fit for a WARNING. The message, logged at DEBUG, holds the error code and HTTP status, or the error's type,
    never the service's or botocore's text: AWS echoes a value it refuses (an e-mail, an IP, a card token)."""

    def __init__(self, message: str, retryable: bool = True, cause: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.cause = cause


CAUSE_REPEAT_S = 3600.0
"""A cause already warned about is warned about again at most this often (with how often it recurred)."""
MAX_CAUSES = 64
"""Distinct causes remembered per predictor; past that a new one is logged at DEBUG only."""


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive failures -> half-open after ``cooldown_s``
    (one trial call at a time) -> closed on success, open again on failure. Thread-safe."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = max(1, failures)
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.consecutive = 0
        self.opened_at: float | None = None
        self._trial = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.cooldown_s else "open"

    def allow(self) -> bool:
        with self._lock:
            if self.opened_at is None:
                return True
            if self.clock() - self.opened_at < self.cooldown_s or self._trial:
                return False
            self._trial = True  # half-open: let exactly one call through
            return True

    def success(self) -> None:
        with self._lock:
            self.consecutive, self.opened_at, self._trial = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self.consecutive += 1
            if self._trial or self.consecutive >= self.threshold:
                if self.opened_at is None or self._trial:
                    log.warning(
                        "model backend failing (%d in a row): circuit open for %.0fs", self.consecutive, self.cooldown_s
                    )
                self.opened_at = self.clock()
            self._trial = False


class ScoringModels(Predictor):
    """The champion (the local model, or a remote backend with it as fallback) and the challenger.

    Per batch: follow the registry's pointers (a promotion applies between batches), build the
    feature matrix once for the local champion, the challenger and the drift monitor, and give each
    result the challenger's score beside the champion's. Only the champion's score decides.
    ``drift`` (a :class:`jobs.model.drift.DriftMonitor` factory) watches the local champion's inputs
    and scores per event-time hour; its finished hourly reports wait in :meth:`drain_reports`, which also drops the
    drift episodes of a version no longer champion nor challenger (after its last reports): kept, a retired version's
    stayed in the job's state for ever.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        remote: Predictor | None = None,
        drift: Callable[[LocalModel], Any] | None = None,
        psi_alert: float = 0.25,
        *,
        tally_drift: bool = False,
        episodes: Any = None,
    ) -> None:
        from jobs.model.drift import DriftEpisodes

        self.registry = registry
        self.psi_alert = psi_alert
        self.episodes: DriftEpisodes = episodes or DriftEpisodes(psi_alert)
        """Which figures are past the setting: a drift alerts when it starts, not every hour (state: the job's)."""
        self.remote = remote
        self._drift_factory = drift
        self._drift: tuple[str, Any] | None = None
        self._retired = RetiredVersions()
        """The versions a promotion retired: a rollback's monitor resumes where theirs stopped."""
        self._reports: list[Any] = []
        self._pending: tuple[Any, list[int], Any, list[int]] | None = None
        """The last batch's drift observation (monitor, times, features, scores), applied by :meth:`settle`."""
        self.tally_drift = tally_drift
        """One slot of a parallel job: the drift counters of each batch wait in :meth:`drain_tallies` for
        the one monitor that merges and reports them, instead of making this slot's own reports."""
        self._tallies: list[Any] = []
        self._challenger_failing: set[str] = set()
        """Challenger versions whose last batch failed to score: warned about once, until one scores again."""
        self._roles: frozenset[str] | None = None
        """The champion's and the challenger's versions as of the last batch (None: no batch yet)."""
        self._episodes_of: frozenset[str] | None = None
        """The roles the drift episodes were last trimmed to (None: not since the start or a restore)."""

    @property
    def model(self) -> LocalModel | None:
        return self.registry.champion

    def _monitor(self, champion: LocalModel | None) -> Any:
        if self._drift_factory is None or champion is None or self.remote is not None:
            return None
        if self._drift is None or self._drift[0] != champion.version:
            if self._drift is not None and (retired := self._drift[1]) is not None:
                self._reports.extend(retired.flush())
                self._retired.retire(self._drift[0], retired)
            self._drift = (champion.version, self._retired.revive(champion.version, self._drift_factory(champion)))
        return self._drift[1]

    def predict_batch(self, items: Sequence[Item]) -> list[ModelResult]:
        if not items:
            return []
        self._pending = None  # a batch that was never settled failed: it is being decided again
        self.registry.refresh()
        champion, challenger = self.registry.champion, self.registry.challenger
        self._roles = frozenset(m.version for m in (champion, challenger) if m is not None)
        monitor = self._monitor(champion)
        t0 = time.perf_counter()
        local = self.remote is None and champion is not None
        x = feature_matrix(items) if local or challenger is not None or monitor is not None else None
        if local:
            assert champion is not None and x is not None
            scores = champion.scores(x).tolist()
            elapsed = int(round((time.perf_counter() - t0) * 1000))
            base: list[ModelResult] = []
            shared: dict[int, ModelResult] = {}  # results are immutable: one object per distinct score
            for s in scores:
                r = shared.get(s)
                if r is None:
                    r = shared[s] = ModelResult(score=s, version=champion.label, time_ms=elapsed)
                base.append(r)
        else:
            base = (self.remote or Predictor()).predict_batch(items)
            scores = [r.score for r in base]
        if monitor is not None and x is not None:
            self._pending = (monitor, [tx["event_time"] for tx, _ in items], x, scores)
        if challenger is None:
            return base
        assert x is not None
        challenger_scores = self._challenger_scores(challenger, x)
        if challenger_scores is None:
            return base
        version = challenger.label
        return [
            dataclasses.replace(r, challenger_score=c, challenger_version=version)
            for r, c in zip(base, challenger_scores, strict=True)
        ]

    def _challenger_scores(self, challenger: LocalModel, x: np.ndarray) -> list[int] | None:
        """The challenger's scores of the batch, or None when it fails to score it: it never decides, so its
        failure must not become the champion's (the batch raised, and every transaction of it was dead-lettered).
        Logged once per version until it scores again."""
        try:
            scores: list[int] = challenger.scores(x).tolist()
            if len(scores) != x.shape[0]:
                raise ValueError(f"{len(scores)} scores for {x.shape[0]} rows")
        except Exception as exc:  # noqa: BLE001 - whatever the challenger's model raises, the champion decides
            if challenger.version not in self._challenger_failing:
                self._challenger_failing.add(challenger.version)
                log.warning(
                    "challenger %s failed to score a batch (%s: %s): the champion decides without it, "
                    "and its records carry no challenger score until it scores again",
                    challenger.version,
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                )
            return None
        if challenger.version in self._challenger_failing:
            self._challenger_failing.discard(challenger.version)
            log.info("challenger %s scores again", challenger.version)
        return scores

    def settle(self) -> None:
        if self._pending is None:
            return
        (monitor, times, x, scores), self._pending = self._pending, None
        if self.tally_drift:
            self._tallies.append(monitor.tally(times, x, scores))  # a batch is never empty: never None
        else:
            self._reports.extend(monitor.observe(times, x, scores))

    def drain_reports(self) -> list[tuple[ModelDriftAvro, AlertAvro | None]]:
        from jobs.model.drift import with_alerts

        reports, self._reports = self._reports, []
        alerted = with_alerts(reports, self.episodes)
        if self._roles is not None and self._roles != self._episodes_of:
            # once the reports are in (a retired champion's last hours among them): its episodes go, and from state
            self.episodes.keep_only(self._roles)
            self._episodes_of = self._roles
        return alerted

    def restore_drift(self, episodes: dict[str, Any]) -> None:
        self.episodes.restore(episodes)
        self._episodes_of = None  # a checkpoint may keep the episodes of versions retired since

    def drain_drift_changes(self) -> dict[str, Any]:
        return self.episodes.drain_changes()

    def drain_tallies(self) -> list[Any]:
        """With ``tally_drift``: the drift counters (:class:`jobs.model.drift.HourTally`) since the last call."""
        tallies, self._tallies = self._tallies, []
        return tallies


class LocalPredictor(ScoringModels):
    """One fixed local model (backtests, benches): no pointers followed, no challenger, no drift."""

    def __init__(self, model: LocalModel, challenger: LocalModel | None = None) -> None:
        super().__init__(ModelRegistry.fixed(model, challenger))


Fallback = LocalModel | Callable[[], LocalModel | None] | None
"""A remote predictor's local model: fixed, or where to find the one of the moment (the registry's champion)."""


class GuardedPredictor(Predictor):
    """Shared timeout/retry/breaker/fallback logic; subclasses implement the remote call."""

    name = "remote"
    settings_to_check = "the CG_MODEL__* settings of the backend, CG_MODEL__AWS_REGION and the AWS credentials"
    """Named when the service refuses a call for good (4xx): those are what a refusal points at."""
    setup_errors: dict[str, str] = {}
    """Error codes of a setup that every call meets until a setting is fixed (code -> what is wrong, in words): never
    retried, warned about once as a setting to check, the records scored by the fallback."""

    def __init__(
        self,
        settings: Settings,
        fallback: Fallback,
        client: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings.model
        self._clock = clock
        self._causes: dict[str, tuple[float, int]] = {}
        """Cause -> (when last warned, failures since); see :meth:`_warn_cause`."""
        self._causes_lock = threading.Lock()
        self._fallback_of: Callable[[], LocalModel | None] = (
            (lambda: fallback) if fallback is None or isinstance(fallback, LocalModel) else fallback
        )
        self.client = client if client is not None else self._make_client(settings)
        self.breaker = CircuitBreaker(self.settings.breaker_failures, self.settings.breaker_cooldown_s, clock)
        self.calls = 0
        self.failures = 0

    @property
    def fallback_model(self) -> LocalModel | None:
        """The local model that answers when the remote does not: the registry's champion of the moment when
        the factory gave a registry (a promotion reaches it as it reaches the job), else a fixed model."""
        return self._fallback_of()

    def _service(self) -> str:
        raise NotImplementedError

    def _make_client(self, settings: Settings) -> Any:
        from botocore.config import Config

        from infra.clients.aws import aws_client

        m = settings.model
        config = Config(
            connect_timeout=m.connect_timeout_s,
            read_timeout=m.read_timeout_s,
            retries={"total_max_attempts": 1},
            max_pool_connections=max(10, m.concurrency),
        )
        return aws_client(
            self._service(),
            region=m.aws_region,
            region_setting="CG_MODEL__AWS_REGION",
            endpoint_url=m.aws_endpoint_url,
            access_key_id=m.aws_access_key_id,
            secret_access_key=m.aws_secret_access_key,
            config=config,
        )

    def _attempt(self, fn: Callable[[], Any]) -> Any:
        """One guarded remote call: up to ``retries + 1`` attempts while the breaker allows."""
        from botocore.exceptions import BotoCoreError, ClientError

        last: RemoteError | None = None

        def once() -> Any:
            nonlocal last
            if not self.breaker.allow():
                raise RemoteError(f"{self.name} circuit open", retryable=False) from last
            self.calls += 1
            try:
                result = fn()
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                code = exc.response.get("Error", {}).get("Code", "")
                if self._record_fault(code, str(exc.response.get("Error", {}).get("Message", ""))):
                    # The service answered: not an outage, so the breaker hears of an answer, not a failure.
                    self.breaker.success()
                    self.failures += 1
                    last = RemoteError(
                        f"{self.name} {code} {status}",  # AWS's message echoes the values it refused: not kept
                        retryable=False,
                        cause=f"{self.name} refused a record's own values with {code} {status}",
                    )
                    self._warn_cause(last)
                    raise last from None
                setup = self.setup_errors.get(code)
                retryable = setup is None and (status >= 500 or status == 429 or "Throttl" in code)
                # The service's message may quote the request (variable values): the cause names the code only.
                cause = f"{self.name} refused the call with {code or 'HTTP'} {status}: check {self.settings_to_check}"
                if setup is not None:
                    cause = f"{self.name}: {setup} ({code} {status}): check {self.settings_to_check}"
                last = RemoteError(f"{self.name} {code or 'HTTP'} {status}", retryable, cause)
            except (BotoCoreError, RemoteError, ValueError, KeyError, IndexError) as exc:
                # botocore's message may quote a parameter's value (ParamValidationError): its type only
                last = exc if isinstance(exc, RemoteError) else RemoteError(f"{self.name}: {type(exc).__name__}", True)
            else:
                self.breaker.success()
                return result
            self.failures += 1
            self.breaker.failure()
            self._warn_cause(last)
            raise last

        return call_with_retries(
            once,
            retriable=lambda exc: isinstance(exc, RemoteError) and exc.retryable,
            attempts=self.settings.retries + 1,
            wait=lambda n: 0.05 * 2**n,
            maximum_s=0.2,
        )

    def _record_fault(self, code: str, message: str) -> bool:
        """Whether a refusal is of the record's own content, which the next record does not share: such a call
        neither opens the breaker nor is retried. None are known for this backend."""
        return False

    def _warn_cause(self, exc: RemoteError) -> None:
        """Say at WARNING why calls fail for good, once per distinct cause and then at most every
        :data:`CAUSE_REPEAT_S`: a wrong detector, model or endpoint otherwise shows only as the breaker's
        "circuit open", which reads like an AWS outage, while every record is scored by the local model."""
        cause = exc.cause
        if exc.retryable or cause is None:
            return
        now = self._clock()
        with self._causes_lock:
            known = self._causes.get(cause)
            if known is not None and now - known[0] < CAUSE_REPEAT_S:
                self._causes[cause] = (known[0], known[1] + 1)
                return
            if known is None and len(self._causes) >= MAX_CAUSES:
                return
            self._causes[cause] = (now, 0)
        again = f" ({known[1] + 1} such failures since the last warning)" if known is not None else ""
        log.warning("%s: %s; the local model scores meanwhile%s", self.name, cause, again)

    def _fallback(self, items: Sequence[Item], spent_ms: Sequence[int]) -> list[ModelResult]:
        if self.fallback_model is None:
            return [ModelResult(score=None, version=f"{self.name} unavailable", time_ms=t) for t in spent_ms]
        results = self.fallback_model.predict_batch(items, label=f"{self.fallback_model.label}{FALLBACK_SUFFIX}")
        return [ModelResult(r.score, r.version, r.time_ms + t) for r, t in zip(results, spent_ms, strict=True)]


class FraudDetectorPredictor(GuardedPredictor):
    """Amazon Fraud Detector ``GetEventPrediction``, one call per record, concurrently within a batch."""

    name = "frauddetector"
    settings_to_check = (
        "CG_MODEL__AFD_DETECTOR_ID, CG_MODEL__AFD_DETECTOR_VERSION, CG_MODEL__AFD_EVENT_TYPE, "
        "CG_MODEL__AFD_ENTITY_TYPE, CG_MODEL__AWS_REGION and the AWS credentials"
    )

    setup_errors = {
        "ResourceNotFoundException": "the detector, its version or the event type does not exist",
        "AccessDeniedException": "the AWS credentials may not call GetEventPrediction",
    }

    def __init__(self, settings: Settings, fallback: Fallback, client: Any = None, **kw: Any) -> None:
        super().__init__(settings, fallback, client, **kw)
        m = self.settings
        self.version = f"afd:{m.afd_detector_id}:{m.afd_detector_version or 'active'}"
        self._pool = ThreadPoolExecutor(max_workers=max(1, m.concurrency), thread_name_prefix="afd")

    def _service(self) -> str:
        return "frauddetector"

    def _record_fault(self, code: str, message: str) -> bool:
        """A ``ValidationException`` about ``eventVariables`` or ``entities`` refuses this record's values (AWS:
        "Value at 'eventVariables' failed to satisfy constraint ..."); one about anything else (a
        ``detectorVersionId`` setting, say) holds for every record and is left to the breaker."""
        return code == "ValidationException" and any(member in message for member in RECORD_FAULT_MEMBERS)

    def request(self, tx: dict[str, Any]) -> dict[str, Any]:
        """The documented request for one transaction (seed 004's variables, all values strings). The customer id
        goes as :func:`schemas.afd_csv.afd_entity_id` (one with ``:`` is refused as it is), a value is cut to
        :data:`schemas.afd_csv.AFD_MAX_VARIABLE_CHARS` (a longer user agent made AWS refuse the whole call)."""
        m = self.settings
        variables: dict[str, str] = {}
        for afd_name, field in AFD_VARIABLES:
            value = tx.get(field)
            if value is None or value == "":
                continue
            variables[afd_name] = _as_text(value)[:AFD_MAX_VARIABLE_CHARS]
        req: dict[str, Any] = {
            "detectorId": m.afd_detector_id,
            "eventId": tx["transaction_id"],
            "eventTypeName": m.afd_event_type,
            "eventTimestamp": datetime.fromtimestamp(tx["event_time"] / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "entities": [
                {"entityType": m.afd_entity_type, "entityId": afd_entity_id(tx.get("customer_id") or UNKNOWN_ENTITY)}
            ],
            "eventVariables": variables,
        }
        if m.afd_detector_version:
            req["detectorVersionId"] = m.afd_detector_version
        return req

    def score_of(self, response: dict[str, Any]) -> int:
        """The configured model's score in one answer (see :func:`afd_score`)."""
        return afd_score(response, self.settings.afd_model_id)

    def _one(self, item: Item) -> tuple[int | None, int]:
        t0 = time.perf_counter()
        try:
            # The answer is read inside the guarded call: an answer without a usable score is a failed call
            # that the breaker counts and the fallback covers, not an exception out of the batch.
            score: int | None = self._attempt(
                lambda: self.score_of(self.client.get_event_prediction(**self.request(item[0])))
            )
        except RemoteError as exc:
            log.debug("fraud detector: %s", exc)
            score = None
        return score, int(round((time.perf_counter() - t0) * 1000))

    def predict_batch(self, items: Sequence[Item]) -> list[ModelResult]:
        if not items:
            return []
        answers = [self._one(items[0])] if len(items) == 1 else list(self._pool.map(self._one, items))
        results: list[ModelResult | None] = [
            ModelResult(score=s, version=self.version, time_ms=t) if s is not None else None for s, t in answers
        ]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            for i, r in zip(
                missing, self._fallback([items[i] for i in missing], [answers[i][1] for i in missing]), strict=True
            ):
                results[i] = r
        return results  # type: ignore[return-value]


class SageMakerPredictor(GuardedPredictor):
    """A SageMaker endpoint serving a model on our feature vector (seed 002's XGBoost), batched.

    Body: ``text/csv``, one line per record, :data:`FEATURE_NAMES` order, missing values empty.
    Answer: one probability per record (newline- or comma-separated), turned into the 0-1000 score
    through the local artifact's FPR calibration (the endpoint serves a model trained by ``train``
    on these features); without a local artifact the probability is scaled linearly."""

    name = "sagemaker"
    max_rows = 1000
    settings_to_check = "CG_MODEL__SAGEMAKER_ENDPOINT, CG_MODEL__AWS_REGION and the AWS credentials"

    def __init__(self, settings: Settings, fallback: Fallback, client: Any = None, **kw: Any) -> None:
        super().__init__(settings, fallback, client, **kw)
        self.version = f"sagemaker:{self.settings.sagemaker_endpoint}"
        served = self.settings.sagemaker_model_version
        start = load_version(settings.models_root, served) if served else self.fallback_model
        self.calibration = start.calibration if start is not None else None
        """The calibration of the model the endpoint serves (``sagemaker_model_version``, found by its
        ``model.json`` version in whichever folder holds it; else the champion at start), fixed: a local promotion
        must not re-calibrate the endpoint's answers (the fallback follows it)."""

    def _service(self) -> str:
        return "sagemaker-runtime"

    @staticmethod
    def body(x: np.ndarray) -> bytes:
        lines = []
        for row in x:
            lines.append(",".join("" if math.isnan(v) else repr(float(v)) for v in row))
        return ("\n".join(lines) + "\n").encode()

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        response = self.client.invoke_endpoint(
            EndpointName=self.settings.sagemaker_endpoint, ContentType="text/csv", Accept="text/csv", Body=self.body(x)
        )
        not_probabilities = RemoteError(
            "sagemaker answered values that are not probabilities within 0-1",
            retryable=False,
            cause="the endpoint answers values that are not probabilities within 0-1: check that "
            "CG_MODEL__SAGEMAKER_ENDPOINT serves a model trained by `train` (CSV rows in, one probability out)",
        )
        try:
            text = response["Body"].read().decode()
            values = [float(v) for v in text.replace("\n", ",").split(",") if v.strip()]
        except ValueError:  # not text, or not numbers: the same endpoint answers the same way again
            raise not_probabilities from None
        if len(values) != x.shape[0]:
            raise RemoteError(
                f"sagemaker answered {len(values)} values for {x.shape[0]} records",
                retryable=False,
                cause="the endpoint answers another number of values than records sent: check that "
                "CG_MODEL__SAGEMAKER_ENDPOINT serves a model trained by `train` (CSV rows in, one probability out)",
            )
        probs = np.asarray(values, dtype=np.float64)
        # A NaN became score -2**63 through the calibration, and 7.0 (a class, a 0-1000 score) a block at 1000.
        if not (np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()):
            raise not_probabilities
        return probs

    def predict_batch(self, items: Sequence[Item]) -> list[ModelResult]:
        if not items:
            return []
        x = feature_matrix(items)
        out: list[ModelResult] = []
        for start in range(0, len(items), self.max_rows):
            chunk = x[start : start + self.max_rows]
            t0 = time.perf_counter()
            try:
                probs = self._attempt(partial(self._invoke, chunk))
            except RemoteError as exc:
                log.debug("sagemaker: %s", exc)
                spent = int(round((time.perf_counter() - t0) * 1000))
                out.extend(self._fallback(items[start : start + self.max_rows], [spent] * chunk.shape[0]))
                continue
            spent = int(round((time.perf_counter() - t0) * 1000))
            if self.calibration is not None:
                scores = self.calibration.score(probs)
            else:
                scores = np.rint(np.clip(probs, 0.0, 1.0) * 1000).astype(np.int64)
            out.extend(ModelResult(score=int(s), version=self.version, time_ms=spent) for s in scores)
        return out


def afd_score(response: dict[str, Any], model_id: str | None = None) -> int:
    """The 0-1000 ``<model>_insightscore`` of one ``GetEventPrediction`` answer.

    ``modelScores`` may be empty (a rules-only detector version, or one scoring through an external SageMaker
    model) or hold several models; the score is the configured model's (``model_id``), or the only model's.
    No such score, or one that is not a finite number, raises a non-retryable :class:`RemoteError`: the same
    detector version answers the same way again, so the record goes to the local fallback instead.
    """
    entries = response.get("modelScores") if isinstance(response, dict) else None
    if not isinstance(entries, list):
        raise RemoteError(
            "frauddetector answer without modelScores",
            retryable=False,
            cause="the answer has no modelScores: check CG_MODEL__AFD_DETECTOR_ID and CG_MODEL__AFD_DETECTOR_VERSION",
        )
    models = len(entries)
    if model_id is not None:
        entries = [
            e for e in entries if isinstance(e, dict) and (e.get("modelVersion") or {}).get("modelId") == model_id
        ]
    if len(entries) != 1 or not isinstance(entries[0], dict):
        which = f"model {model_id!r}" if model_id is not None else "one model (set CG_MODEL__AFD_MODEL_ID)"
        if model_id is not None:
            cause = (
                f"the detector version answered {models} model score(s), {len(entries)} of model {model_id!r}: "
                "check that CG_MODEL__AFD_MODEL_ID names a model of CG_MODEL__AFD_DETECTOR_VERSION "
                "(a rules-only version has none)"
            )
        elif models == 0:
            cause = "the detector version answered no model score (rules-only?): check CG_MODEL__AFD_DETECTOR_VERSION"
        else:
            cause = (
                f"the detector version answered {models} model scores: set CG_MODEL__AFD_MODEL_ID to the deciding one"
            )
        raise RemoteError(f"frauddetector answered {len(entries)} model scores for {which}", False, cause)
    scores = entries[0].get("scores")
    if not isinstance(scores, dict) or not scores:
        raise RemoteError(
            "frauddetector model score without scores",
            retryable=False,
            cause="the model's answer holds no scores: check CG_MODEL__AFD_MODEL_ID",
        )
    values = [v for k, v in scores.items() if str(k).endswith("_insightscore")] or list(scores.values())
    try:
        value = float(values[0])
    except (TypeError, ValueError):
        value = math.nan
    if len(values) != 1 or not math.isfinite(value):
        raise RemoteError(
            f"frauddetector score not one finite number: {values!r:.80}",
            retryable=False,
            cause="the model's score is not one finite number: check CG_MODEL__AFD_MODEL_ID",
        )
    return int(round(min(1000.0, max(0.0, value))))


def _as_text(value: Any) -> str:
    return str(value)  # 810.3 -> "810.3", 25.0 -> "25.0": what the CSV the detector was trained on holds


def drift_monitors(settings: Settings) -> Callable[[LocalModel], Any] | None:
    """A drift monitor per champion version, from the reference distributions ``train`` stored in it."""
    m = settings.model
    if m.drift_psi_alert <= 0:
        return None

    def make(model: LocalModel) -> Any:
        from jobs.model.drift import DriftMonitor

        reference = model.meta.get("reference")
        if not reference:
            return None
        try:
            if not isinstance(reference, dict) or reference.get("feature_names") != model.meta["feature_names"]:
                raise ValueError(f"the drift reference of model {model.version} is not of its features")
            return DriftMonitor(
                reference,
                model.version,
                psi_alert=m.drift_psi_alert,
                min_rows=m.drift_min_rows,
                grace_ms=m.drift_grace_ms,
            )
        except ValueError as exc:  # no drift reports for that model, rather than no decisions
            log.warning("no drift reports for model %s: %s", model.version, exc)
            return None

    return make


def drift_episodes(settings: Settings) -> Any:
    """The drift episodes (:class:`jobs.model.drift.DriftEpisodes`) the settings ask for: when a drift alerts."""
    from jobs.model.drift import DriftEpisodes

    m = settings.model
    return DriftEpisodes(m.drift_psi_alert, m.drift_min_rows, round(m.drift_remind_hours * 3_600_000))


def make_predictor(settings: Settings, *, tally_drift: bool = False) -> Predictor:
    """The predictor ``settings.model.backend`` names: champion and challenger from the models root
    (local), or a remote backend with the local champion as its fallback and the challenger beside it.
    ``tally_drift``: a slot of a parallel job (see :class:`ScoringModels`)."""
    backend = settings.model.backend
    if backend == "none":
        return Predictor()
    if backend == "local":
        return ScoringModels(
            ModelRegistry(settings),
            drift=drift_monitors(settings),
            psi_alert=settings.model.drift_psi_alert,
            tally_drift=tally_drift,
            episodes=drift_episodes(settings),
        )
    try:
        registry = ModelRegistry(settings)
    except ModelArtifactError:
        registry = ModelRegistry(None)  # no local model: the remote answers alone, no fallback

    def champion() -> LocalModel | None:
        return registry.champion

    remote: Predictor
    if backend == "frauddetector":
        remote = FraudDetectorPredictor(settings, champion)
    elif backend == "sagemaker":
        remote = SageMakerPredictor(settings, champion)
    else:
        raise ValueError(f"unknown model backend {backend!r} (local, frauddetector, sagemaker, none)")
    return ScoringModels(registry, remote=remote)


__all__ = [
    "FEATURE_NAMES",
    "CircuitBreaker",
    "FraudDetectorPredictor",
    "LocalPredictor",
    "SageMakerPredictor",
    "ScoringModels",
    "make_predictor",
]
