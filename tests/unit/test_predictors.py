"""Remote model backends send the documented requests and fall back to the local model.

Fraud Detector is checked against a local server speaking its JSON 1.1 protocol (moto does not
implement it); SageMaker Runtime against moto's server mode and the same local server (for headers
and a slow endpoint).
"""

from __future__ import annotations

import base64
import json
import logging

import httpx
import pytest
from pydantic import SecretStr

from infra.local.aws_models import AFD_TARGET, LocalModelServer
from infra.settings import ModelSettings, Settings
from jobs.model.fraud_model import feature_matrix
from jobs.model.predictors import (
    CircuitBreaker,
    FraudDetectorPredictor,
    RemoteError,
    SageMakerPredictor,
    ScoringModels,
    afd_score,
    make_predictor,
)
from tests.builders import T0, sale
from tests.fraud_model import challenger_model, small_model

TX = sale(
    "tx-42",
    amount=810.3,
    card="tok_9",
    customer_id="398-20-6447",
    card_bin="404409",
    customer_email="c@example.com",
    customer_name="Christina",
    customer_job="Conservator",
    billing_phone="+1-099-994-5728",
    ip_address="72.239.175.244",
    user_agent="Opera/8.42",
    billing_street="4410 Johnson Way",
    billing_city="Warner Robins",
    billing_state="GA",
    billing_zip="31098",
    billing_country="US",
    billing_latitude=32.6181,
    billing_longitude=-83.5739,
    product_category="misc_net",
).to_avro()
IND = {"velocity": 1.0, "first_seen": 1.0}


def settings_for(url: str, backend: str, **kw) -> Settings:
    """Generous timeouts (a loaded CI machine must not turn a success into a fallback); the timeout
    tests set a short read timeout against a server that sleeps longer."""
    values = dict(
        backend=backend,
        aws_endpoint_url=url,
        aws_region="us-east-1",
        aws_access_key_id=SecretStr("testing"),
        aws_secret_access_key=SecretStr("testing"),
        connect_timeout_s=2.0,
        read_timeout_s=3.0,
        retries=1,
        breaker_failures=3,
        breaker_cooldown_s=60,
        afd_detector_version="2",
    )
    model = ModelSettings(**{**values, **kw})
    return Settings().model_copy(update={"model": model})


@pytest.fixture()
def server():
    srv = LocalModelServer()
    yield srv
    srv.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_fraud_detector_gets_seed_004s_request_with_string_values(server):
    predictor = FraudDetectorPredictor(settings_for(server.url, "frauddetector"), small_model())
    [result] = predictor.predict_batch([(TX, IND)])
    assert (result.score, result.version) == (912, "afd:transaction_event:2")
    [req] = server.requests
    assert (req.method, req.path) == ("POST", "/")
    assert req.headers["X-Amz-Target"] == AFD_TARGET
    assert req.headers["Content-Type"] == "application/x-amz-json-1.1"
    assert req.json() == {
        "detectorId": "transaction_event",
        "detectorVersionId": "2",
        "eventId": "tx-42",
        "eventTypeName": "transaction",
        "eventTimestamp": "2026-01-01T00:00:00Z",
        "entities": [{"entityType": "customer", "entityId": "398-20-6447"}],
        "eventVariables": {
            "order_price": "810.3",
            "customer_email": "c@example.com",
            "ip_address": "72.239.175.244",
            "payment_currency": "USD",
            "billing_longitude": "-83.5739",
            "billing_latitude": "32.6181",
            "billing_zip": "31098",
            "billing_state": "GA",
            "user_agent": "Opera/8.42",
            "billing_street": "4410 Johnson Way",
            "billing_city": "Warner Robins",
            "card_bin": "404409",
            "customer_name": "Christina",
            "product_category": "misc_net",
            "customer_job": "Conservator",
            "phone": "+1-099-994-5728",
        },
    }
    assert T0 == 1_767_225_600_000  # the eventTimestamp above is T0


def test_fraud_detector_is_called_once_per_record_and_unknown_entities_say_so(server):
    predictor = FraudDetectorPredictor(settings_for(server.url, "frauddetector"), small_model())
    items = [(sale(f"t{i}", customer_email=None).to_avro(), {}) for i in range(6)]
    results = predictor.predict_batch(items)
    assert [r.score for r in results] == [912] * 6
    bodies = [r.json() for r in server.requests]
    assert sorted(b["eventId"] for b in bodies) == [f"t{i}" for i in range(6)]
    assert all(b["entities"] == [{"entityType": "customer", "entityId": "unknown"}] for b in bodies)
    assert all("customer_email" not in b["eventVariables"] for b in bodies)


def _afd_client(url: str):
    import boto3

    return boto3.client(
        "frauddetector",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.mark.parametrize(
    ("change", "member"),
    [
        ({"entities": [{"entityType": "customer", "entityId": "loyalty:42"}]}, "entityId"),
        ({"entities": [{"entityType": "customer", "entityId": "a b"}]}, "entityId"),
        ({"eventVariables": {}}, "eventVariables"),
        ({"eventVariables": {"order_price": "1", "user_agent": "x" * 8193}}, "eventVariables"),
    ],
    ids=["colon-in-entity-id", "space-in-entity-id", "no-variables", "value-over-8192"],
)
def test_the_local_fraud_detector_refuses_what_aws_refuses_though_botocore_sends_it(server, change, member):
    from botocore.exceptions import ClientError

    predictor = FraudDetectorPredictor(settings_for(server.url, "frauddetector"), small_model())
    client = _afd_client(server.url)
    good = predictor.request(TX)
    assert client.get_event_prediction(**good)["modelScores"], "the documented request is answered"
    with pytest.raises(ClientError) as err:
        client.get_event_prediction(**{**good, **change})
    assert err.value.response["Error"]["Code"] == "ValidationException"
    assert member in err.value.response["Error"]["Message"]


def test_a_customer_id_fraud_detector_refuses_is_sent_as_a_stable_hash_and_scored(server):
    from schemas.afd_csv import afd_entity_id

    predictor = FraudDetectorPredictor(settings_for(server.url, "frauddetector"), small_model())
    items = [(sale(f"t{i}", customer_id=cid).to_avro(), IND) for i, cid in enumerate(["loyalty:42", "loyalty:43"])]
    items.append((TX, IND))
    results = predictor.predict_batch(items)  # "loyalty:42" was refused for every record: the local fallback
    assert [(r.score, r.version) for r in results] == [(912, "afd:transaction_event:2")] * 3
    sent = {r.json()["eventId"]: r.json()["entities"][0]["entityId"] for r in server.requests}
    assert sent["tx-42"] == "398-20-6447", "an id Fraud Detector takes goes unchanged"
    assert sent["t0"] == afd_entity_id("loyalty:42") == afd_entity_id("loyalty:42")
    assert sent["t0"].startswith("h_") and len(sent["t0"]) == 34 and sent["t0"] != sent["t1"]
    assert predictor.failures == 0 and predictor.breaker.consecutive == 0


def test_a_user_agent_over_fraud_detectors_limit_is_cut_to_it_and_scored(server):
    predictor = FraudDetectorPredictor(settings_for(server.url, "frauddetector"), small_model())
    tx = sale("t-long", user_agent="Mozilla/5.0 " + "x" * 9000).to_avro()
    [result] = predictor.predict_batch([(tx, IND)])
    assert (result.score, result.version) == (912, "afd:transaction_event:2")
    [req] = server.requests
    assert req.json()["eventVariables"]["user_agent"] == ("Mozilla/5.0 " + "x" * 9000)[:8192]


def test_a_record_fraud_detector_refuses_for_its_own_values_does_not_open_the_breaker(server, caplog):
    """A ValidationException about a record's variables is an answer, not an outage: the record goes to the
    fallback, not retried, and the records after it are still sent."""
    real = _afd_client(server.url)

    class Spoiling:  # sends each record with a value AWS refuses (over 8,192 characters), as a record's own would
        def get_event_prediction(self, **req: object) -> dict:
            req["eventVariables"] = {**req["eventVariables"], "user_agent": "x" * 8193}  # type: ignore[dict-item]
            return real.get_event_prediction(**req)

    model = small_model()
    settings = settings_for(server.url, "frauddetector", breaker_failures=2, concurrency=1)
    predictor = FraudDetectorPredictor(settings, model, client=Spoiling())
    items = [(sale(f"t{i}").to_avro(), IND) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="checkout_guard.predictors"):
        results = predictor.predict_batch(items)
    assert [r.version for r in results] == [f"local:{model.version} (fallback)"] * 4
    assert len(server.requests) == 4, "one call per record, none retried, the breaker still closed"
    assert predictor.breaker.state == "closed" and predictor.failures == 4
    [warning] = warnings_of(caplog)
    assert "a record's own values" in warning and "ValidationException" in warning
    server.status = 500  # an outage still opens it
    predictor.predict_batch(items[:1])
    assert predictor.breaker.state == "open"


def test_slow_fraud_detector_falls_back_to_the_local_model_after_bounded_retries(server):
    server.delay_s = 1.0
    model = small_model()
    predictor = FraudDetectorPredictor(settings_for(server.url, "frauddetector", read_timeout_s=0.3), model)
    [result] = predictor.predict_batch([(TX, IND)])
    assert result.version == f"local:{model.version} (fallback)"
    assert result.score == model.predict_batch([(TX, IND)])[0].score
    assert len(server.requests) == 2  # one call + one retry, then the fallback
    assert result.time_ms >= 600  # two read timeouts of 0.3 s were spent before falling back


def test_open_circuit_skips_the_backend_until_its_cool_down(server):
    server.status = 500
    clock = Clock()
    model = small_model()
    predictor = FraudDetectorPredictor(
        settings_for(server.url, "frauddetector", breaker_failures=2), model, clock=clock
    )
    first = predictor.predict_batch([(TX, IND)])
    assert len(server.requests) == 2 and predictor.breaker.state == "open"
    assert first[0].version.endswith("(fallback)")
    again = predictor.predict_batch([(TX, IND), (TX, IND)])
    assert len(server.requests) == 2  # open: nothing sent
    assert all(r.version.endswith("(fallback)") and r.score is not None for r in again)
    clock.now += 61  # cool-down over: one trial call, which succeeds and closes the circuit
    server.status = 200
    [trial] = predictor.predict_batch([(TX, IND)])
    assert trial.version == "afd:transaction_event:2" and predictor.breaker.state == "closed"


@pytest.mark.parametrize(
    ("models", "score"),
    [((), 912.0), (("tx_model",), float("nan")), (("tx_model", "other_model"), 912.0)],
    ids=["rules-only-version", "nan-score", "two-models-none-configured"],
)
def test_fraud_detector_answer_without_a_usable_score_is_a_failed_call_the_fallback_covers(server, models, score):
    server.afd_models, server.afd_score = models, score
    model = small_model()
    settings = settings_for(server.url, "frauddetector", breaker_failures=2, concurrency=1)  # records in turn
    predictor = FraudDetectorPredictor(settings, model)
    items = [(sale(f"t{i}").to_avro(), IND) for i in range(3)]
    results = predictor.predict_batch(items)  # raised IndexError / ValueError before: every record dead-lettered
    assert [r.version for r in results] == [f"local:{model.version} (fallback)"] * 3
    assert [r.score for r in results] == [r.score for r in model.predict_batch(items)]
    # one call per record, not retried (the same version answers the same); two failures open the circuit,
    # so the third record goes to the fallback without a call
    assert len(server.requests) == 2 and predictor.failures == 2 and predictor.breaker.state == "open"


def test_fraud_detector_score_is_the_configured_models(server):
    server.afd_models = ("other_model", "tx_model")
    predictor = FraudDetectorPredictor(
        settings_for(server.url, "frauddetector", afd_model_id="tx_model"), small_model()
    )
    [result] = predictor.predict_batch([(TX, IND)])
    assert (result.score, result.version) == (912, "afd:transaction_event:2")
    assert afd_score({"modelScores": [{"modelVersion": {"modelId": "m"}, "scores": {"m_insightscore": 1200}}]}) == 1000
    with pytest.raises(RemoteError, match="model 'missing'"):
        afd_score({"modelScores": [{"modelVersion": {"modelId": "m"}, "scores": {"m_insightscore": 5}}]}, "missing")


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "circuit" not in r.getMessage()]


def test_a_wrong_afd_model_id_is_warned_about_once_naming_the_setting(server, caplog):
    """A misconfigured detector looks like an outage unless its cause is said: at WARNING, once per cause."""
    server.afd_models = ()  # a rules-only detector version, or a model id it does not have
    clock = Clock()
    settings = settings_for(server.url, "frauddetector", afd_model_id="tx_model", breaker_failures=100, concurrency=2)
    predictor = FraudDetectorPredictor(settings, small_model(), clock=clock)
    with caplog.at_level(logging.WARNING, logger="checkout_guard.predictors"):
        results = predictor.predict_batch([(TX, IND)] * 4)
        predictor.predict_batch([(TX, IND)] * 2)
    assert all(r.version.endswith("(fallback)") for r in results)  # still the fallback, as before
    [warning] = warnings_of(caplog)
    assert "CG_MODEL__AFD_MODEL_ID" in warning and "'tx_model'" in warning and "rules-only" in warning
    for private in ("tx-42", "c@example.com", "398-20-6447", "testing", "810.3"):  # no transaction data, no secret
        assert private not in warning
    clock.now += 3601  # the cause still holds an hour later: said again, with how often it recurred
    with caplog.at_level(logging.WARNING, logger="checkout_guard.predictors"):
        predictor.predict_batch([(TX, IND)])
    assert warnings_of(caplog)[1:] == [
        warning.replace("meanwhile", "meanwhile (6 such failures since the last warning)")
    ]


def test_a_refused_call_names_the_detector_settings_without_the_services_message(caplog):
    from botocore.exceptions import ClientError

    class Refusing:
        def get_event_prediction(self, **_: object) -> dict:
            error = {"Code": "ResourceNotFoundException", "Message": "no detector for c@example.com"}
            raise ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": 404}}, "GetEventPrediction")

    settings = settings_for("http://127.0.0.1:1", "frauddetector", breaker_failures=100)
    predictor = FraudDetectorPredictor(settings, small_model(), client=Refusing())
    with caplog.at_level(logging.WARNING, logger="checkout_guard.predictors"):
        predictor.predict_batch([(TX, IND)] * 3)
    [warning] = warnings_of(caplog)
    assert "ResourceNotFoundException 404" in warning and "CG_MODEL__AFD_DETECTOR_ID" in warning
    assert "c@example.com" not in warning


def test_an_outage_is_left_to_the_breakers_line(server, caplog):
    server.status = 500  # retryable: not a setting to check
    predictor = FraudDetectorPredictor(settings_for(server.url, "frauddetector"), small_model())
    with caplog.at_level(logging.WARNING, logger="checkout_guard.predictors"):
        predictor.predict_batch([(TX, IND)])
    assert warnings_of(caplog) == []


def test_breaker_reopens_when_the_half_open_trial_fails():
    clock = Clock()
    breaker = CircuitBreaker(failures=2, cooldown_s=10, clock=clock)
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert not breaker.allow()
    clock.now += 10
    assert breaker.allow() and not breaker.allow()  # exactly one trial while half-open
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()


def test_sagemaker_gets_one_csv_body_per_batch(server):
    server.sagemaker_prob = 0.25
    model = small_model()
    predictor = SageMakerPredictor(settings_for(server.url, "sagemaker"), model)
    items = [(sale(f"t{i}", amount=10.0 + i).to_avro(), {"velocity": 1.0}) for i in range(4)]
    results = predictor.predict_batch(items)
    [req] = server.requests
    assert req.path == "/endpoints/checkout-guard-fraud/invocations"
    assert req.headers["Content-Type"] == "text/csv" and req.headers["Accept"] == "text/csv"
    assert req.body == SageMakerPredictor.body(feature_matrix(items))
    assert len(req.body.decode().splitlines()) == 4
    expected = int(model.calibration.score(__import__("numpy").array([0.25]))[0])
    assert [(r.score, r.version) for r in results] == [(expected, "sagemaker:checkout-guard-fraud")] * 4


def test_a_local_promotion_does_not_recalibrate_the_endpoints_answers(server):
    """The endpoint still serves the model it was deployed with; only the fallback follows the registry."""
    server.sagemaker_prob = 0.25
    models = [small_model()]
    predictor = SageMakerPredictor(settings_for(server.url, "sagemaker"), lambda: models[0])
    items = [(sale("t1", amount=10.0).to_avro(), {"velocity": 1.0})]
    before = predictor.predict_batch(items)[0].score
    models[0] = challenger_model()  # promoted locally
    assert predictor.fallback_model is models[0] and predictor.predict_batch(items)[0].score == before


def test_the_endpoints_model_version_pins_its_calibration_across_restarts(tmp_path, server):
    """Every restart (a failover, a rescale) builds the predictor again: after a local promotion it must still
    map the endpoint's probabilities with the model the endpoint serves."""
    server.sagemaker_prob = 0.25
    served = small_model().save(tmp_path)
    challenger_model().save(tmp_path)  # promoted locally: the champion now
    settings = settings_for(server.url, "sagemaker", artifact_dir=tmp_path)
    pinned = settings.model_copy(
        update={"model": settings.model.model_copy(update={"sagemaker_model_version": served.name})}
    )
    items = [(sale("t1", amount=10.0).to_avro(), {"velocity": 1.0})]
    expected = int(small_model().calibration.score(__import__("numpy").array([0.25]))[0])
    assert make_predictor(pinned).remote.predict_batch(items)[0].score == expected
    assert make_predictor(settings).remote.predict_batch(items)[0].score != expected  # unpinned: the new champion's


def test_the_endpoints_model_version_is_found_in_a_folder_not_named_after_it(tmp_path, server):
    """CG_MODEL__SAGEMAKER_MODEL_VERSION names a model version (``model.json``'s); the model kept in a folder copied
    or renamed by hand was looked for in the folder of that name, and the job did not start."""
    server.sagemaker_prob = 0.25
    served = small_model()
    served.save(tmp_path).rename(tmp_path / "endpoint-nov")
    challenger_model().save(tmp_path)  # the champion now, in a folder of its version's name
    settings = settings_for(server.url, "sagemaker", artifact_dir=tmp_path)
    pinned = settings.model_copy(
        update={"model": settings.model.model_copy(update={"sagemaker_model_version": served.version})}
    )
    items = [(sale("t1", amount=10.0).to_avro(), {"velocity": 1.0})]
    expected = int(served.calibration.score(__import__("numpy").array([0.25]))[0])
    assert make_predictor(pinned).remote.predict_batch(items)[0].score == expected


def test_sagemaker_request_is_accepted_by_moto_server():
    from moto.sagemakerruntime.models import sagemakerruntime_backends
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        url = f"http://{host}:{port}"
        httpx.post(
            f"{url}/moto-api/static/sagemaker/endpoint-results",
            json={
                "region": "us-east-1",
                "results": [
                    {
                        "Body": "0.9\n0.01\n",
                        "ContentType": "text/csv",
                        "InvokedProductionVariant": "AllTraffic",
                        "CustomAttributes": "",
                    }
                ],
            },
        ).raise_for_status()
        model = small_model()
        predictor = SageMakerPredictor(settings_for(url, "sagemaker"), model)
        items = [(TX, IND), (sale("t2").to_avro(), {})]
        results = predictor.predict_batch(items)
        assert [r.version for r in results] == ["sagemaker:checkout-guard-fraud"] * 2
        assert results[0].score > results[1].score
        # moto files the request under its endpoint-name parse (None in server mode); the path itself
        # is pinned against the local server above
        backend = sagemakerruntime_backends["123456789012"]["us-east-1"]
        recorded = [key for by_endpoint in backend.results.values() for key in by_endpoint]
        [sent] = [json.loads(base64.b64decode(key)) for key in recorded]
        assert sent["Accept"] == "text/csv"
        assert sent["Body"] == SageMakerPredictor.body(feature_matrix(items)).decode()
    finally:
        moto.stop()


def test_slow_sagemaker_endpoint_falls_back_for_the_whole_batch(server):
    server.delay_s = 1.0
    model = small_model()
    predictor = SageMakerPredictor(settings_for(server.url, "sagemaker", retries=0, read_timeout_s=0.3), model)
    items = [(sale(f"t{i}").to_avro(), {}) for i in range(3)]
    results = predictor.predict_batch(items)
    assert len(server.requests) == 1
    assert [r.score for r in results] == [r.score for r in model.predict_batch(items)]
    assert all(r.version.endswith("(fallback)") for r in results)


def test_factory_builds_the_configured_backend_with_local_fallback(tmp_path, server):
    small_model().save(tmp_path)
    base = settings_for(server.url, "frauddetector", artifact_dir=tmp_path)
    afd = make_predictor(base)
    assert isinstance(afd, ScoringModels) and isinstance(afd.remote, FraudDetectorPredictor)
    assert afd.remote.fallback_model.version == small_model().version
    promoted = challenger_model().save(tmp_path)  # CURRENT -> another model, as promote does
    afd.registry.refresh(force=True)
    assert afd.remote.fallback_model.version == promoted.name  # the fallback follows the promotion, no restart
    local = make_predictor(base.model_copy(update={"model": base.model.model_copy(update={"backend": "local"})}))
    assert local.predict_batch([(TX, IND)])[0].version == f"local:{promoted.name}"
    with pytest.raises(ValueError, match="unknown model backend"):
        make_predictor(base.model_copy(update={"model": base.model.model_copy(update={"backend": "magic"})}))


class _Answering:
    """A SageMaker Runtime client that answers ``text`` to every call."""

    def __init__(self, text: bytes) -> None:
        self.text, self.calls = text, 0

    def invoke_endpoint(self, **_kw):
        import io

        self.calls += 1
        return {"Body": io.BytesIO(self.text)}


@pytest.mark.parametrize(
    "answer", [b"nan\n0.2\n", b"0.2\n7\n", b"-0.5\n0.2\n", b"0.2\ninf\n", b"0.2\nyes\n", b"\xff\xfe"]
)
def test_a_sagemaker_answer_that_is_not_probabilities_is_a_failed_call_the_fallback_covers(answer, caplog):
    """A NaN in the answer came out as score -9223372036854775808 and a 7 as 1000 (a block): the endpoint serves
    something else than a model trained by ``train``, and asking again gets the same answer."""
    model = small_model()
    client = _Answering(answer)
    predictor = SageMakerPredictor(settings_for("http://unused", "sagemaker", retries=2), model, client=client)
    items = [(sale(f"t{i}").to_avro(), {}) for i in range(2)]
    with caplog.at_level(logging.WARNING):
        results = predictor.predict_batch(items)
    assert [r.score for r in results] == [r.score for r in model.predict_batch(items)]
    assert all(r.version.endswith("(fallback)") for r in results)
    assert client.calls == 1, "not retried"
    assert any("not probabilities within 0-1" in w and "CG_MODEL__SAGEMAKER_ENDPOINT" in w for w in warnings_of(caplog))


def test_a_sagemaker_answer_of_0_and_1_is_scored() -> None:
    model = small_model()
    predictor = SageMakerPredictor(settings_for("http://unused", "sagemaker"), model, client=_Answering(b"0\n1.0\n"))
    results = predictor.predict_batch([(sale(f"t{i}").to_avro(), {}) for i in range(2)])
    assert [r.version for r in results] == ["sagemaker:checkout-guard-fraud"] * 2
    assert [r.score for r in results] == model.calibration.score(__import__("numpy").array([0.0, 1.0])).tolist()


@pytest.mark.parametrize(
    "setting",
    [{"afd_detector_id": "no_such_detector"}, {"afd_detector_version": "9"}, {"afd_event_type": "no_such_event"}],
    ids=["detector", "version", "event-type"],
)
def test_a_detector_version_or_event_type_that_does_not_exist_is_a_setup_error_warned_once_not_retried(
    server, setting, caplog
):
    """AWS answers ResourceNotFoundException (404) for a detector, version or event type it does not have; the local
    stand-in scored such a request 912, so a wrong CG_MODEL__AFD_* setting passed every test."""
    from botocore.exceptions import ClientError

    settings = settings_for(server.url, "frauddetector", breaker_failures=100, concurrency=1, **setting)
    predictor = FraudDetectorPredictor(settings, (model := small_model()))
    with pytest.raises(ClientError) as err:
        _afd_client(server.url).get_event_prediction(**predictor.request(TX))
    assert err.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    server.requests.clear()
    with caplog.at_level(logging.WARNING, logger="checkout_guard.predictors"):
        results = predictor.predict_batch([(sale(f"t{i}").to_avro(), IND) for i in range(3)])
    assert [r.version for r in results] == [f"local:{model.version} (fallback)"] * 3
    assert len(server.requests) == 3, "one call per record, none retried"
    [warning] = warnings_of(caplog)
    assert "ResourceNotFoundException 404" in warning and "does not exist" in warning
    assert "CG_MODEL__AFD_DETECTOR_ID" in warning


def test_no_record_value_aws_echoes_in_its_error_reaches_the_log_only_the_code_and_status(caplog):
    """AWS's error message quotes the value it refused (an e-mail, an IP, a card token), and botocore's
    ParamValidationError quotes the parameter's value: the client logged that text at DEBUG."""
    from botocore.exceptions import ClientError, ParamValidationError

    echoed = "Value 'c@example.com' at 'eventVariables.customer_email' (ip 72.239.175.244, card tok_4242424242424242)"
    errors: list[Exception] = [
        ClientError(
            {"Error": {"Code": "ValidationException", "Message": echoed}, "ResponseMetadata": {"HTTPStatusCode": 400}},
            "GetEventPrediction",
        ),
        ClientError(
            {
                "Error": {"Code": "ValidationException", "Message": f"entities: {echoed}"},
                "ResponseMetadata": {"HTTPStatusCode": 400},
            },
            "GetEventPrediction",
        ),
        ParamValidationError(report=f"Invalid type for parameter eventVariables.customer_email, value: {echoed}"),
    ]

    class Echoing:
        def get_event_prediction(self, **_: object) -> dict:
            raise errors.pop(0)

    settings = settings_for("http://127.0.0.1:1", "frauddetector", breaker_failures=100, retries=0, concurrency=1)
    predictor = FraudDetectorPredictor(settings, small_model(), client=Echoing())
    with caplog.at_level(logging.DEBUG, logger="checkout_guard.predictors"):
        results = predictor.predict_batch([(TX, IND)] * 3)
    assert all(r.version.endswith("(fallback)") for r in results)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for private in ("c@example.com", "72.239.175.244", "tok_4242424242424242"):
        assert private not in logged, logged
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert "fraud detector: frauddetector ValidationException 400" in debug, debug
    assert "fraud detector: frauddetector: ParamValidationError" in debug, debug
