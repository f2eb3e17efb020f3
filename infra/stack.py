"""The embedded local stack: Kafka (KRaft), OpenSearch, Mosquitto, a mail server and Prometheus as plain
background processes.

CLI: ``python -m infra.stack up|down|status|topics|reset``. Tests and tools import ``up``, ``down``,
``status`` and ``ensure_topics``; all take the one :class:`~infra.settings.Settings` object.

Everything lives under ``settings.stack_dir`` (default ``.stack/`` in the repo root)::

    lib/kafka/*.jar  lib/flink/*.jar  opensearch-<ver>/  downloads/   installed by infra/install.sh
    conf/            generated configs (kafka-server.properties, mosquitto.conf, opensearch/, prometheus.yml)
    mail/            every mail the local SMTP server accepted, one .eml file each
    data/<svc>/      service data          logs/<svc>.log   console output of each service
    run/<svc>.pid    pid files             tmp/             JVM temp dirs

Ports come from the settings (``CG_KAFKA__BOOTSTRAP_SERVERS``, ``CG_KAFKA__CONTROLLER_PORT``,
``CG_OPENSEARCH__URL``, ``CG_MQTT__PORT``, ``CG_SMTP__PORT``, ``CG_METRICS__PROMETHEUS_PORT``); ``CG_STACK_DIR``
moves everything. Every service listens on ``CG_BIND_HOST`` (127.0.0.1) only.

``CG_KAFKA__BROKERS=3`` makes Kafka three KRaft nodes (``kafka-1..3``: each broker and controller, own data,
log, pid and config; ports derived in :mod:`infra.kafka_cluster`), replication factor 3 and two in sync;
``status`` then shows each broker, the active controller and each partition's leader and ISR.

Prometheus scrapes every process of :data:`infra.metrics.PROCESSES` (one job each, label ``process``) at
``CG_METRICS__SCRAPE_INTERVAL_S``; ``up`` rewrites its config and reloads it (SIGHUP) when the settings changed.

Logins (off by default): Kafka serves SASL/SCRAM on its client listener when the clients' own settings
log in (``CG_KAFKA__SECURITY_PROTOCOL=SASL_PLAINTEXT``, ``…__SASL_MECHANISM=SCRAM-SHA-512``,
``…__SASL_USERNAME``/``…__SASL_PASSWORD``: that user is created or updated at every broker start), and
Mosquitto refuses anonymous clients when ``CG_MQTT__USERNAME``/``…__PASSWORD`` are set.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import pwd
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import typer
import yaml
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)
from pydantic import SecretStr

from infra.addresses import client_host, host_port, split_host_port
from infra.clients import kafka as kafka_clients
from infra.flink_cluster import ClusterPaths
from infra.flink_cluster import cli as flink_cli
from infra.kafka_cluster import KafkaNode, active_controller, kafka_nodes, server_properties, topic_config
from infra.local import smtp as local_smtp
from infra.logs import setup_logging
from infra.metrics import scrape_targets
from infra.processes import log_tail, port_open
from infra.retry import call_with_retries
from infra.settings import KafkaSettings, Settings, get_settings
from schemas.errors import CheckoutGuardError
from schemas.topics import ALL_TOPICS, DEAD_LETTERS

# Pinned versions. infra/install.sh reads these lines (keep the `NAME = "value"` form).
OPENSEARCH_VERSION = "2.19.4"
FLINK_KAFKA_CONNECTOR = "org.apache.flink:flink-sql-connector-kafka:5.0.0-2.2"
FLINK_METRICS_PROMETHEUS = "org.apache.flink:flink-metrics-prometheus:2.2.1"
MAVEN_DEPENDENCY_PLUGIN = "3.8.1"
MSK_IAM_AUTH_ALL_SHA256 = "b758405bd032d0aa3579eabe3fc3344da7003d723c4bb687767924450da7bbfd"
"""sha256 of aws-msk-iam-auth's "all" jar, of the version infra/flink-msk-iam/pom.xml pins: install.sh checks the
fetched jar against it before relocating it for the connector (MSK IAM for the job, infra/clients/msk_iam.py)."""

SERVICES = ("kafka", "opensearch", "mosquitto", "smtp", "prometheus")
KAFKA_NODE_NAMES = ("kafka-1", "kafka-2", "kafka-3")
"""With ``CG_KAFKA__BROKERS=3`` the service ``kafka`` is these three processes (pid, log, data and config
each); one node keeps the plain ``kafka`` name."""
KAFKA_JVM_OPTS = (
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)
START_TIMEOUT_S = 180.0
"""Unloaded, Kafka is up in ~8 s and OpenSearch in ~10 s; on a busy 2-core machine it can take a minute."""
STOP_TIMEOUT_S = 30.0
UNPRIVILEGED_UID = 1000
"""OpenSearch refuses to run as root: as root it runs in a user namespace mapped to this uid."""
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OPENSEARCH_DISK_WATERMARKS = {"low": "3gb", "high": "2gb", "flood_stage": "1gb"}
"""Free space (not a share: a share of a big, busy dev disk blocks writes with tens of GB left) below which
OpenSearch stops placing replicas / new shards, and below ``flood_stage`` makes its indices read-only until
space is freed: the last margin before the disk runs full under Kafka and OpenSearch alike."""
SCRAM_ITERATIONS = 8192
STACK_ADMIN = "cg_stack"
"""The stack's own Kafka login when SASL is on (PLAIN, checked against the broker's JAAS config, not the
metadata log: it works before any SCRAM user exists). Its password is new at every broker start."""
LOG4J2_CONFIG = Path(__file__).resolve().with_name("log4j2.properties")
PROMETHEUS_RETENTION = "2d"
"""The local Prometheus is for watching the pipeline now (the health page), not a long-term store."""

log = logging.getLogger("infra.stack")


class StackError(CheckoutGuardError, RuntimeError):
    """The stack could not be brought to the requested state; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------
# Paths and endpoints


@dataclass(frozen=True)
class StackPaths:
    root: Path

    @classmethod
    def of(cls, settings: Settings) -> StackPaths:
        return cls(Path(settings.stack_dir).expanduser().resolve())

    @property
    def kafka_lib(self) -> Path:
        return self.root / "lib" / "kafka"

    @property
    def flink_lib(self) -> Path:
        return self.root / "lib" / "flink"

    @property
    def flink_ext_jar(self) -> Path:
        """The job's own Java operators (``jobs/flink/java``), compiled by infra/install.sh."""
        return self.root / "lib" / "flink-ext" / "checkout-guard-flink.jar"

    @property
    def flink_plugins(self) -> Path:
        """A Flink plugins folder: ``metrics-prometheus/`` holds Flink's Prometheus reporter and the job's
        subclass of it that binds ``CG_BIND_HOST`` (infra/install.sh; loaded by ``jobs.flink.job``)."""
        return self.root / "lib" / "flink-plugins"

    @property
    def opensearch_home(self) -> Path:
        return self.root / f"opensearch-{OPENSEARCH_VERSION}"

    @property
    def conf(self) -> Path:
        return self.root / "conf"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def data(self, svc: str) -> Path:
        return self.root / "data" / svc

    def log(self, svc: str) -> Path:
        return self.logs / f"{svc}.log"

    def pid(self, svc: str) -> Path:
        return self.run / f"{svc}.pid"

    @property
    def kafka_properties(self) -> Path:
        return self.conf / "kafka-server.properties"

    def node_properties(self, name: str) -> Path:
        """``kafka`` (one node) or ``kafka-<id>`` (a node of three): its generated server.properties."""
        return self.conf / f"{name}-server.properties"

    @property
    def mosquitto_conf(self) -> Path:
        return self.conf / "mosquitto.conf"

    @property
    def mosquitto_passwords(self) -> Path:
        return self.conf / "mosquitto.passwd"

    @property
    def kafka_admin_secret(self) -> Path:
        """The stack's own Kafka login of the running broker (SASL only), mode 0600."""
        return self.run / "kafka-admin.json"

    @property
    def opensearch_conf(self) -> Path:
        return self.conf / "opensearch"

    @property
    def prometheus_conf(self) -> Path:
        return self.conf / "prometheus.yml"


@dataclass(frozen=True)
class Endpoints:
    """Where clients reach each service (``*_host``, from the client settings) and where it listens."""

    bind_host: str
    kafka_host: str
    kafka_port: int
    controller_port: int
    opensearch_host: str
    opensearch_port: int
    mqtt_host: str
    mqtt_port: int
    smtp_host: str
    smtp_port: int
    prometheus_host: str
    prometheus_port: int
    kafka_nodes: tuple[KafkaNode, ...] = ()
    """Every local Kafka node (one, or three with ``CG_KAFKA__BROKERS=3``); node 1 is ``kafka_host:kafka_port``."""

    @classmethod
    def of(cls, settings: Settings) -> Endpoints:
        k_host, k_port = split_host_port(settings.kafka.bootstrap_servers.split(",")[0])
        url = urlsplit(settings.opensearch.url)
        return cls(
            bind_host=settings.bind_host,
            kafka_host=k_host,
            kafka_port=int(k_port),
            controller_port=settings.kafka.controller_port,
            opensearch_host=url.hostname or "127.0.0.1",
            opensearch_port=url.port or (443 if url.scheme == "https" else 9200),
            mqtt_host=settings.mqtt.host,
            mqtt_port=settings.mqtt.port,
            smtp_host=settings.smtp.host,
            smtp_port=settings.smtp.port,
            prometheus_host=client_host(settings.bind_host),
            prometheus_port=settings.metrics.prometheus_port,
            kafka_nodes=_kafka_nodes(settings),
        )

    def ports(self, svc: str) -> list[tuple[str, int]]:
        if svc == "kafka" and len(self.kafka_nodes) > 1:
            return [(n.host, p) for n in self.kafka_nodes for p in (n.port, n.controller_port)]
        return {
            "kafka": [(self.kafka_host, self.kafka_port), (self.kafka_host, self.controller_port)],
            "opensearch": [(self.opensearch_host, self.opensearch_port)],
            "mosquitto": [(self.mqtt_host, self.mqtt_port)],
            "smtp": [(self.smtp_host, self.smtp_port)],
            "prometheus": [(self.prometheus_host, self.prometheus_port)],
        }[svc]

    def address(self, svc: str) -> str:
        if svc == "kafka" and len(self.kafka_nodes) > 1:
            controllers = ", ".join(f":{n.controller_port}" for n in self.kafka_nodes)
            return f"{', '.join(n.address for n in self.kafka_nodes)} (controllers {controllers})"
        if svc == "kafka":
            return f"{host_port(self.kafka_host, self.kafka_port)} (controller :{self.controller_port})"
        return ", ".join(host_port(h, p) for h, p in self.ports(svc))


def _kafka_nodes(settings: Settings) -> tuple[KafkaNode, ...]:
    kafka = settings.kafka
    try:
        return kafka_nodes(kafka.bootstrap_servers, kafka.controller_port, kafka.brokers)
    except ValueError as exc:
        raise StackError(f"kafka: {exc} (CG_KAFKA__BOOTSTRAP_SERVERS, CG_KAFKA__CONTROLLER_PORT)") from exc


def flink_connector_jars(settings: Settings) -> list[Path]:
    """The Flink Kafka connector jar(s) installed by infra/install.sh (for ``env.add_jars``)."""
    jars = sorted(StackPaths.of(settings).flink_lib.glob("*.jar"))
    if not jars:
        raise StackError("Flink Kafka connector not installed: run `make setup`")
    return jars


def flink_ext_jar(settings: Settings) -> Path:
    """The job's own operators jar, built by infra/install.sh from ``jobs/flink/java``."""
    jar = StackPaths.of(settings).flink_ext_jar
    if not jar.is_file():
        raise StackError("the job's Java operators are not built: run `make setup`")
    return jar


def _java_major(home: Path) -> int | None:
    try:
        for line in (home / "release").read_text().splitlines():
            if line.startswith("JAVA_VERSION="):
                return int(line.split("=", 1)[1].strip('"').split(".")[0])
    except (OSError, ValueError):
        return None
    return None


def find_java_home(settings: Settings) -> Path:
    """``settings.java_home``, else the ``java`` on PATH, else a JDK under /usr/lib/jvm: the first of
    Java 17..21 (OpenSearch 2.19 needs the security manager, gone in Java 24; Flink 2.2 runs 11-21)."""
    if settings.java_home:
        return Path(settings.java_home)
    candidates: list[Path] = []
    java = shutil.which("java")
    if java:
        candidates.append(Path(java).resolve().parent.parent)
    candidates += sorted(Path("/usr/lib/jvm").glob("*"))
    for home in candidates:
        major = _java_major(home)
        if major is not None and 17 <= major <= 21 and (home / "bin" / "java").exists():
            return home
    raise StackError("no JDK 17..21 found: install openjdk-17-jdk-headless or set CG_JAVA_HOME")


# --------------------------------------------------------------------------------------------------
# Health checks


def _quiet_logger() -> logging.Logger:
    lg = logging.getLogger("infra.stack.librdkafka")
    if not lg.handlers:
        lg.addHandler(logging.NullHandler())
        lg.propagate = False
    return lg


def _admin(settings: Settings) -> AdminClient:
    return kafka_clients.admin(settings, logger=_quiet_logger(), log_connection_close=False)


def _kafka_healthy(settings: Settings, ep: Endpoints, timeout: float = 3.0) -> bool:
    """A broker answers and every configured broker is registered (with three, one down is not healthy)."""
    nodes = ep.kafka_nodes or (KafkaNode(1, ep.kafka_host, ep.kafka_port, ep.controller_port),)
    if not any(port_open(n.host, n.port) for n in nodes):
        return False
    try:
        md = _admin(settings).list_topics(timeout=timeout)
    except KafkaException:
        return False
    return len(md.brokers) >= len(nodes)


def _opensearch_status(settings: Settings, timeout: float = 2.0) -> str | None:
    """Cluster health colour, or None when OpenSearch does not answer."""
    auth = None
    if settings.opensearch.username and settings.opensearch.password:
        auth = (settings.opensearch.username, settings.opensearch.password.get_secret_value())
    try:
        r = httpx.get(
            settings.opensearch.url.rstrip("/") + "/_cluster/health",
            timeout=timeout,
            auth=auth,
            verify=settings.opensearch.verify_certs,
        )
        return r.json().get("status") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _configure_opensearch(settings: Settings) -> None:
    """One node can never hold a replica: new indices without an explicit replica count get none, so
    cluster health reads green. (A persistent cluster setting: the -E node option is not honoured.)"""
    r = httpx.put(
        settings.opensearch.url.rstrip("/") + "/_cluster/settings",
        timeout=10,
        json={"persistent": {"cluster.default_number_of_replicas": 0}},
    )
    if r.status_code != 200:
        log.warning("opensearch: could not set cluster.default_number_of_replicas: %s", r.text[:200])


def _opensearch_healthy(settings: Settings, ep: Endpoints) -> bool:
    if not port_open(ep.opensearch_host, ep.opensearch_port):
        return False
    return _opensearch_status(settings) in ("yellow", "green")


def _mqtt_login(settings: Settings) -> tuple[str, str] | None:
    """The MQTT login of the settings: both set, or none (then the local broker allows anonymous clients)."""
    mqtt = settings.mqtt
    if mqtt.username and mqtt.password is not None:
        return mqtt.username, mqtt.password.get_secret_value()
    return None


def _mqtt_connect_packet(client_id: str, login: tuple[str, str] | None) -> bytes:
    """MQTT 3.1.1 CONNECT: clean session, keepalive 10 s, with username and password when given."""

    def field(text: str) -> bytes:
        data = text.encode()
        return len(data).to_bytes(2, "big") + data

    flags = 0x02 | (0xC0 if login else 0)
    variable = field("MQTT") + bytes([0x04, flags, 0x00, 0x0A])
    payload = field(client_id) + (field(login[0]) + field(login[1]) if login else b"")
    remaining, length = len(variable) + len(payload), bytearray()
    while True:  # the remaining length as a variable-length integer, 7 bits a byte
        remaining, digit = divmod(remaining, 128)
        length.append(digit | (0x80 if remaining else 0))
        if not remaining:
            break
    return bytes([0x10]) + bytes(length) + variable + payload


def _mqtt_healthy(ep: Endpoints, login: tuple[str, str] | None = None, timeout: float = 2.0) -> bool:
    """A real MQTT 3.1.1 CONNECT -> CONNACK(accepted) exchange (logged in when ``login``), then DISCONNECT."""
    packet = _mqtt_connect_packet("cg-health", login)
    try:
        with socket.create_connection((ep.mqtt_host, ep.mqtt_port), timeout=timeout) as sock:
            sock.sendall(packet)
            reply = sock.recv(4)
            sock.sendall(b"\xe0\x00")
            return reply == b"\x20\x02\x00\x00"
    except OSError:
        return False


def _prometheus_get(ep: Endpoints, path: str, timeout: float = 2.0, **params: str) -> httpx.Response | None:
    try:
        url = f"http://{host_port(ep.prometheus_host, ep.prometheus_port)}{path}"
        return httpx.get(url, params=params, timeout=timeout)
    except httpx.HTTPError:
        return None


def _prometheus_healthy(ep: Endpoints) -> bool:
    """Ready: the TSDB is open and the config loaded (``/-/healthy`` answers earlier than that)."""
    answer = _prometheus_get(ep, "/-/ready")
    return answer is not None and answer.status_code == 200


def _prometheus_targets(ep: Endpoints) -> str:
    """``3/8 targets up`` for ``status``: how many of the pipeline's processes are being scraped."""
    answer = _prometheus_get(ep, "/api/v1/query", query="up")
    try:
        series = answer.json()["data"]["result"] if answer is not None else None
    except (ValueError, KeyError, TypeError):
        series = None
    if series is None:
        return "targets unknown"
    if not series:
        return "no scrape yet"
    return f"{sum(1 for s in series if s['value'][1] == '1')}/{len(series)} targets up"


def _healthy(svc: str, settings: Settings, ep: Endpoints) -> bool:
    if svc == "prometheus":
        return _prometheus_healthy(ep)
    if svc == "kafka":
        return _kafka_healthy(settings, ep)
    if svc == "opensearch":
        return _opensearch_healthy(settings, ep)
    if svc == "smtp":
        return local_smtp.healthy(ep.smtp_host, ep.smtp_port)
    return _mqtt_healthy(ep, _mqtt_login(settings))


# --------------------------------------------------------------------------------------------------
# Processes


def _marker(svc: str, paths: StackPaths) -> str:
    """A string in the command line of the service process started for this stack dir."""
    if svc in KAFKA_NODE_NAMES:
        return str(paths.node_properties(svc))
    return {
        "kafka": str(paths.kafka_properties),
        "opensearch": f"-Epath.data={paths.data('opensearch')}",
        "mosquitto": str(paths.mosquitto_conf),
        "smtp": f"--mail-dir={local_smtp.mail_dir(paths.root)}",
        "prometheus": f"--storage.tsdb.path={paths.data('prometheus')}",
    }[svc]


def _our_process(svc: str, paths: StackPaths) -> psutil.Process | None:
    """The live process recorded in the pid file, if it really is ours (pids get reused)."""
    try:
        pid = int(paths.pid(svc).read_text().strip())
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if _marker(svc, paths) in " ".join(proc.cmdline()):
            return proc
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def service_process(svc: str, paths: StackPaths) -> psutil.Process | None:
    """The running process of ``svc`` started from this stack dir, or None (tests list its sockets)."""
    return _our_process(svc, paths)


def _clean_stale_pid(svc: str, paths: StackPaths) -> None:
    if paths.pid(svc).exists() and _our_process(svc, paths) is None:
        paths.pid(svc).unlink(missing_ok=True)
        log.info("%s: removed stale pid file", svc)


@contextlib.contextmanager
def _lock(paths: StackPaths) -> Iterator[None]:
    """Serialises up/down/reset between processes (parallel test sessions, two terminals)."""
    paths.run.mkdir(parents=True, exist_ok=True)
    with open(paths.run / "stack.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _spawn(svc: str, paths: StackPaths, cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Start a service detached from our session, console output to logs/<svc>.log (previous: .1)."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    logfile = paths.log(svc)
    if logfile.exists() and logfile.stat().st_size:
        logfile.replace(logfile.with_suffix(".log.1"))
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    paths.pid(svc).write_text(f"{proc.pid}\n")
    return proc


def _base_env(settings: Settings) -> dict[str, str]:
    """Services get a small explicit environment, not whatever the caller's shell had."""
    return {"PATH": SERVICE_PATH, "LANG": "C.UTF-8", "JAVA_HOME": str(find_java_home(settings))}


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds a password), whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _security_line(svc: str, settings: Settings) -> str:
    """The first line of a generated config: which logins it asks for (no secrets), to spot a running
    service started with other security settings than the current ones."""
    if svc == "kafka" or svc in KAFKA_NODE_NAMES:
        kafka = settings.kafka
        wanted = f"sasl {kafka.sasl_mechanism} user {kafka.sasl_username}" if kafka.sasl_enabled else "anonymous"
    else:
        login = _mqtt_login(settings)
        wanted = f"password user {login[0]}" if login else "anonymous"
    return f"# security: {wanted}"


def _security_drift(svc: str, settings: Settings, paths: StackPaths) -> str | None:
    """Why the running ``svc`` does not serve the logins the settings ask for, or None."""
    conf = {"kafka": paths.kafka_properties, "mosquitto": paths.mosquitto_conf}.get(svc)
    conf = paths.node_properties(svc) if svc in KAFKA_NODE_NAMES else conf
    if conf is None:
        return None
    try:
        running = conf.read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    if not running.startswith("# security: "):
        running = "# security: anonymous"  # written before logins were an option
    wanted = _security_line(svc, settings)
    if running == wanted:
        return None
    return f"{svc} runs with '{running[2:]}' but the settings ask for '{wanted[2:]}': `make down` then `make up`"


# --- Kafka ----------------------------------------------------------------------------------------


SCRAM_MECHANISMS = {"SCRAM-SHA-256": ScramMechanism.SCRAM_SHA_256, "SCRAM-SHA-512": ScramMechanism.SCRAM_SHA_512}


def _jaas(module: str, **options: str) -> str:
    quoted = "".join(f' {k}="{v}"' for k, v in options.items())  # values: our own, quote-free tokens
    return f"org.apache.kafka.common.security.{module} required{quoted};"


def _kafka_listeners(settings: Settings, ep: Endpoints, admin_password: str | None) -> str:
    """Listener lines: PLAINTEXT, or with ``admin_password`` SASL on both listeners -- the clients' SCRAM
    mechanism on the client listener, PLAIN for the stack's own login (broker to itself, controller)."""
    # An IPv6 host in brackets: ::1:9092 is itself an IPv6 address, the port read into the host.
    port, controller = host_port(ep.bind_host, ep.kafka_port), host_port(ep.bind_host, ep.controller_port)
    advertised = host_port(ep.kafka_host, ep.kafka_port)
    if admin_password is None:
        return f"""listeners=PLAINTEXT://{port},CONTROLLER://{controller}
advertised.listeners=PLAINTEXT://{advertised}
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"""
    mechanism = (settings.kafka.sasl_mechanism or "").upper()
    if settings.kafka.security_protocol.upper() != "SASL_PLAINTEXT" or mechanism not in SCRAM_MECHANISMS:
        raise StackError(
            "the local Kafka serves SASL_PLAINTEXT with SCRAM-SHA-256 or SCRAM-SHA-512, not "
            f"{settings.kafka.security_protocol} with {settings.kafka.sasl_mechanism}"
        )
    if not settings.kafka.sasl_username or settings.kafka.sasl_password is None:
        raise StackError("SASL on the local Kafka needs CG_KAFKA__SASL_USERNAME and CG_KAFKA__SASL_PASSWORD")
    plain = _jaas(
        "plain.PlainLoginModule",
        username=STACK_ADMIN,
        password=admin_password,
        **{f"user_{STACK_ADMIN}": admin_password},
    )
    return f"""listeners=SASL_PLAINTEXT://{port},CONTROLLER://{controller}
advertised.listeners=SASL_PLAINTEXT://{advertised}
inter.broker.listener.name=SASL_PLAINTEXT
listener.security.protocol.map=CONTROLLER:SASL_PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
sasl.enabled.mechanisms={mechanism},PLAIN
sasl.mechanism.inter.broker.protocol=PLAIN
sasl.mechanism.controller.protocol=PLAIN
listener.name.sasl_plaintext.{mechanism.lower()}.sasl.jaas.config={_jaas("scram.ScramLoginModule")}
listener.name.sasl_plaintext.plain.sasl.jaas.config={plain}
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config={plain}"""


def _kafka_node_name(node: KafkaNode, nodes: tuple[KafkaNode, ...]) -> str:
    return "kafka" if len(nodes) == 1 else f"kafka-{node.node_id}"


def _kafka_properties(
    settings: Settings,
    paths: StackPaths,
    ep: Endpoints,
    admin_password: str | None = None,
    node: KafkaNode | None = None,
) -> str:
    """server.properties of ``node`` (default: the first), listening on its own ports."""
    nodes = ep.kafka_nodes or (KafkaNode(1, ep.kafka_host, ep.kafka_port, ep.controller_port),)
    node = node or nodes[0]
    own = replace(ep, kafka_host=node.host, kafka_port=node.port, controller_port=node.controller_port)
    return server_properties(
        node,
        nodes,
        log_dir=str(paths.data(_kafka_node_name(node, nodes))),
        listeners=_kafka_listeners(settings, own, admin_password),
        security_line=_security_line("kafka", settings),
    )


def _kafka_cluster_id() -> str:
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _start_kafka(settings: Settings, paths: StackPaths, ep: Endpoints) -> subprocess.Popen:
    admin_password = secrets.token_urlsafe(24) if settings.kafka.sasl_enabled else None
    return _start_kafka_node(settings, paths, ep, admin_password)


def _start_kafka_node(
    settings: Settings,
    paths: StackPaths,
    ep: Endpoints,
    admin_password: str | None,
    node: KafkaNode | None = None,
    cluster_id: str | None = None,
) -> subprocess.Popen:
    """Write ``node``'s config, format its storage when new (with ``cluster_id``: the cluster's), start it."""
    if not any(paths.kafka_lib.glob("kafka_2.13-*.jar")):
        raise StackError(f"Kafka is not installed in {paths.kafka_lib}: run `make setup`")
    nodes = ep.kafka_nodes or (KafkaNode(1, ep.kafka_host, ep.kafka_port, ep.controller_port),)
    node = node or nodes[0]
    name = _kafka_node_name(node, nodes)
    properties = paths.node_properties(name)
    java = str(find_java_home(settings) / "bin" / "java")
    classpath = f"{paths.kafka_lib}/*"
    data = paths.data(name)
    data.mkdir(parents=True, exist_ok=True)
    _write_private(properties, _kafka_properties(settings, paths, ep, admin_password, node))
    if admin_password is None:
        paths.kafka_admin_secret.unlink(missing_ok=True)
    else:
        _write_private(paths.kafka_admin_secret, json.dumps({"username": STACK_ADMIN, "password": admin_password}))
    env = _base_env(settings)
    if not (data / "meta.properties").exists():
        log.info("kafka: formatting storage in %s", data)
        fmt = subprocess.run(
            [
                java,
                "-XX:TieredStopAtLevel=1",
                "-XX:+UseSerialGC",
                f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
                "-cp",
                classpath,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id or _kafka_cluster_id(),
                "-c",
                str(properties),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise StackError(f"kafka storage format failed:\n{fmt.stdout}\n{fmt.stderr}")
    cmd = [
        java,
        *KAFKA_JVM_OPTS,
        f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
        "-cp",
        classpath,
        "kafka.Kafka",
        str(properties),
    ]
    return _spawn(name, paths, cmd, env, cwd=data)


def _cluster_id(paths: StackPaths) -> str:
    """The id the nodes of three were formatted with (a node formatted anew must join it), or a new one."""
    for name in KAFKA_NODE_NAMES:
        with contextlib.suppress(OSError):
            for line in (paths.data(name) / "meta.properties").read_text().splitlines():
                if line.startswith("cluster.id="):
                    return line.split("=", 1)[1].strip()
    return _kafka_cluster_id()


def _cluster_admin_password(settings: Settings, paths: StackPaths, others_running: bool) -> str | None:
    """The stack's own login (SASL only): the running nodes' one when a node rejoins them (brokers and
    controllers log in to each other with it), else a new one."""
    if not settings.kafka.sasl_enabled:
        return None
    if others_running:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return str(json.loads(paths.kafka_admin_secret.read_text())["password"])
    return secrets.token_urlsafe(24)


def _ensure_kafka_cluster(settings: Settings, paths: StackPaths, ep: Endpoints) -> str:
    """Bring the three Kafka nodes to healthy: start those not running (a killed one rejoins), wait until
    all three are registered. Returns running | started."""
    if _our_process("kafka", paths) is not None:
        raise StackError(
            "kafka: a single node from this stack dir runs but the settings ask for 3 brokers "
            "(CG_KAFKA__BROKERS): `make down` then `make up`"
        )
    nodes = ep.kafka_nodes
    names = {node: _kafka_node_name(node, nodes) for node in nodes}
    procs: dict[KafkaNode, subprocess.Popen | psutil.Process | None] = {
        node: _our_process(name, paths) for node, name in names.items()
    }
    for node, proc in procs.items():
        drift = _security_drift(names[node], settings, paths) if proc is not None else None
        if drift:
            raise StackError(drift)
    stopped = [node for node, proc in procs.items() if proc is None]
    t0 = time.monotonic()
    if stopped:
        for node in stopped:
            _clean_stale_pid(names[node], paths)
        busy = [host_port(n.host, p) for n in stopped for p in (n.port, n.controller_port) if port_open(n.host, p)]
        if busy:
            raise StackError(
                f"kafka: port(s) {', '.join(busy)} taken by another process; free them or change the ports "
                "in the settings (CG_KAFKA__BOOTSTRAP_SERVERS, CG_KAFKA__CONTROLLER_PORT)"
            )
        admin_password = _cluster_admin_password(settings, paths, others_running=len(stopped) < len(nodes))
        cluster_id = _cluster_id(paths)
        for node in stopped:
            procs[node] = _start_kafka_node(settings, paths, ep, admin_password, node, cluster_id)
            log.info("%s: started pid %d", names[node], procs[node].pid)  # type: ignore[union-attr]
    alive = {names[node]: proc for node, proc in procs.items() if proc is not None}
    if settings.kafka.sasl_enabled:
        admin = _stack_admin(settings, paths)
        _wait_kafka_nodes(admin, paths, ep, alive)
        _ensure_scram_user(admin, settings.kafka)
    _wait_kafka_nodes(settings, paths, ep, alive)
    if stopped:
        log.info("kafka: %d brokers healthy at %s after %.1fs", len(nodes), ep.address("kafka"), time.monotonic() - t0)
    return "started" if stopped else "running"


def _wait_kafka_nodes(
    settings: Settings, paths: StackPaths, ep: Endpoints, procs: dict[str, subprocess.Popen | psutil.Process]
) -> None:
    """Until every node is registered with the cluster; a node that exits meanwhile fails the start."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _kafka_healthy(settings, ep):
            return
        for name, proc in procs.items():
            alive = proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_running()
            if not alive:
                paths.pid(name).unlink(missing_ok=True)
                raise StackError(
                    f"{name} exited during start-up; end of {paths.log(name)}:\n{log_tail(paths.log(name))}"
                )
        time.sleep(0.3)
    tails = "\n".join(f"--- {paths.log(name)}:\n{log_tail(paths.log(name), 8)}" for name in procs)
    raise StackError(
        f"kafka: not all brokers healthy after {START_TIMEOUT_S:.0f}s\n{tails}\n(try `make down` and `make up`)"
    )


def _stack_admin(settings: Settings, paths: StackPaths) -> Settings:
    """``settings`` logged in as the stack's own Kafka user of the running broker (SASL only)."""
    login = json.loads(paths.kafka_admin_secret.read_text())
    kafka = settings.kafka.model_copy(
        update={
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "PLAIN",
            "sasl_username": login["username"],
            "sasl_password": SecretStr(login["password"]),
        }
    )
    return settings.model_copy(update={"kafka": kafka})


def _ensure_scram_user(admin_settings: Settings, user: KafkaSettings) -> None:
    """Create the clients' SCRAM user, or set its password to the configured one (what kafka-configs
    ``--alter --add-config SCRAM-SHA-512=[password=...]`` does), through the stack's own login."""
    if not user.sasl_username or user.sasl_password is None or not user.sasl_mechanism:
        raise StackError("SASL on the local Kafka needs CG_KAFKA__SASL_USERNAME and CG_KAFKA__SASL_PASSWORD")
    mechanism = SCRAM_MECHANISMS[user.sasl_mechanism.upper()]
    upsert = UserScramCredentialUpsertion(
        user.sasl_username,
        ScramCredentialInfo(mechanism, SCRAM_ITERATIONS),
        user.sasl_password.get_secret_value().encode(),
    )
    admin = kafka_clients.admin(admin_settings, logger=_quiet_logger(), log_connection_close=False)
    try:
        for fut in admin.alter_user_scram_credentials([upsert]).values():
            fut.result()
    except KafkaException as exc:
        raise StackError(f"kafka: could not create SCRAM user {user.sasl_username}: {exc}") from exc
    log.info("kafka: SCRAM user %s (%s) in place", user.sasl_username, user.sasl_mechanism)


# --- OpenSearch -----------------------------------------------------------------------------------


def _write_opensearch_conf(settings: Settings, paths: StackPaths) -> Path:
    """A config dir of our own: the distribution's, with JVM files (gc log, heap dumps) under .stack."""
    home, conf = paths.opensearch_home, paths.opensearch_conf
    logs, data = paths.logs / "opensearch", paths.data("opensearch")
    if conf.exists():
        shutil.rmtree(conf)
    shutil.copytree(home / "config", conf)
    jvm = (home / "config" / "jvm.options").read_text()
    jvm = "\n".join(line for line in jvm.splitlines() if not line.startswith(("-Xms", "-Xmx")))
    jvm = (
        jvm.replace("file=logs/gc.log", f"file={logs}/gc.log")
        .replace("filecount=32,filesize=64m", "filecount=2,filesize=16m")
        .replace("HeapDumpPath=data", f"HeapDumpPath={data}")
        .replace("ErrorFile=logs/", f"ErrorFile={logs}/")
    )
    (conf / "jvm.options").write_text(jvm + "\n")
    (conf / "opensearch.yml").write_text(
        "# Generated by infra/stack.py; the node settings are passed as -E options on the command line.\n"
        "cluster.name: checkout-guard-local\nnode.name: local-1\n"
    )
    return conf


def _raise_nofile_limit(wanted: int = 65535) -> None:
    """OpenSearch wants 65535 open files; children inherit our limit, so raise ours (up to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _opensearch_command(paths: StackPaths, ep: Endpoints) -> list[str]:
    """bin/opensearch with the node settings: one node on the bind host, its disk watermarks on."""
    return [
        str(paths.opensearch_home / "bin" / "opensearch"),
        "-Ediscovery.type=single-node",
        f"-Enetwork.host={ep.bind_host}",  # HTTP and the transport port (9300..) alike
        f"-Ehttp.port={ep.opensearch_port}",
        f"-Epath.data={paths.data('opensearch')}",
        f"-Epath.logs={paths.logs / 'opensearch'}",
        "-Ecluster.routing.allocation.disk.threshold_enabled=true",
        *(f"-Ecluster.routing.allocation.disk.watermark.{k}={v}" for k, v in OPENSEARCH_DISK_WATERMARKS.items()),
    ]


def _start_opensearch(settings: Settings, paths: StackPaths, ep: Endpoints) -> subprocess.Popen:
    home = paths.opensearch_home
    if not (home / "bin" / "opensearch").exists():
        raise StackError(f"OpenSearch {OPENSEARCH_VERSION} is not installed in {home}: run `make setup`")
    data, logs, tmp = paths.data("opensearch"), paths.logs / "opensearch", paths.tmp / "opensearch"
    for d in (data, logs, tmp):
        d.mkdir(parents=True, exist_ok=True)
    conf = _write_opensearch_conf(settings, paths)
    heap = settings.opensearch.heap
    env = _base_env(settings) | {
        "OPENSEARCH_JAVA_HOME": str(find_java_home(settings)),
        "OPENSEARCH_PATH_CONF": str(conf),
        "OPENSEARCH_JAVA_OPTS": f"-Xms{heap} -Xmx{heap}",
        "OPENSEARCH_TMPDIR": str(tmp),
    }
    cmd = _opensearch_command(paths, ep)
    if os.geteuid() == 0:
        # OpenSearch refuses to start as root. A user namespace makes it an ordinary uid inside,
        # while the files it writes stay owned by the invoking user outside.
        unshare = shutil.which("unshare", path=SERVICE_PATH)
        if not unshare:
            raise StackError("running as root needs `unshare` (util-linux) to start OpenSearch")
        cmd = [unshare, "--user", f"--map-user={UNPRIVILEGED_UID}", f"--map-group={UNPRIVILEGED_UID}", *cmd]
    _raise_nofile_limit()
    # bin/opensearch runs bin/opensearch-keystore relative to the working directory.
    return _spawn("opensearch", paths, cmd, env, cwd=home)


# --- Mosquitto ------------------------------------------------------------------------------------


def _mosquitto_access(settings: Settings, paths: StackPaths) -> str:
    """Anonymous clients, or with a login in the settings only that user: a password file hashed by
    ``mosquitto_passwd -U`` (the password never on a command line)."""
    login = _mqtt_login(settings)
    if login is None:
        paths.mosquitto_passwords.unlink(missing_ok=True)
        return "allow_anonymous true\n"
    username, password = login
    if ":" in username or "\n" in username + password:
        raise StackError("the MQTT username may not contain ':', nor the username or password a line break")
    tool = shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd", path=SERVICE_PATH)
    if not tool:
        raise StackError("mosquitto_passwd is not installed (Debian package mosquitto): run `make setup`")
    _write_private(paths.mosquitto_passwords, f"{username}:{password}\n")
    hashed = subprocess.run([tool, "-U", str(paths.mosquitto_passwords)], capture_output=True, text=True, check=False)
    if hashed.returncode != 0:
        raise StackError(f"mosquitto_passwd failed: {hashed.stderr.strip()}")
    return f"allow_anonymous false\npassword_file {paths.mosquitto_passwords}\n"


def _start_mosquitto(settings: Settings, paths: StackPaths, ep: Endpoints) -> subprocess.Popen:
    binary = shutil.which("mosquitto") or shutil.which("mosquitto", path=SERVICE_PATH)
    if not binary:
        raise StackError("mosquitto is not installed: run `make setup`")
    data = paths.data("mosquitto")
    data.mkdir(parents=True, exist_ok=True)
    paths.conf.mkdir(parents=True, exist_ok=True)
    paths.mosquitto_conf.write_text(
        f"{_security_line('mosquitto', settings)}\n"
        "# Generated by infra/stack.py on every start.\n"
        f"listener {ep.mqtt_port} {ep.bind_host}\n"
        f"{_mosquitto_access(settings, paths)}"
        # When started as root mosquitto switches to this user; keep it the invoking user.
        f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
        # What the camera bridge would dead-letter as oversized: the broker drops it (and acknowledges it to the
        # publisher), as paho reads a whole MQTT 3.1.1 packet (up to 256 MB) into memory before the bridge sees it.
        f"message_size_limit {settings.job.max_message_bytes}\n"
        "persistence true\n"
        f"persistence_location {data}/\n"
        "autosave_interval 60\n"
        "log_dest stdout\n"
        "log_timestamp_format %Y-%m-%dT%H:%M:%S\n"
    )
    return _spawn("mosquitto", paths, [binary, "-c", str(paths.mosquitto_conf)], _base_env(settings), cwd=data)


# --- Local mail (SMTP) ----------------------------------------------------------------------------


def _start_smtp(settings: Settings, paths: StackPaths, ep: Endpoints) -> subprocess.Popen:
    """aiosmtpd in its own Python process (infra/local/smtp.py): mails land in <stack dir>/mail/*.eml, and are
    deleted as alert snapshots are (their retention, checked at the image store purge's interval)."""
    mail = local_smtp.mail_dir(paths.root)
    mail.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "infra.local.smtp",
        f"--mail-dir={mail}",
        "--host",
        ep.bind_host,
        "--port",
        str(ep.smtp_port),
        f"--keep-days={settings.faces.alert_snapshot_retention_days}",
        f"--purge-every-s={settings.faces.retention_purge_interval_s}",
    ]
    # its settings are the options above: no .env of its own (the repo root's, which this process may not have read)
    env = _base_env(settings) | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "CG_ENV_FILE": ""}
    return _spawn("smtp", paths, cmd, env, cwd=paths.root)


# --- Prometheus -----------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    """A Prometheus duration (whole units only): ``5s``, or ``1500ms``."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def prometheus_config(settings: Settings) -> str:
    """The scrape config: one job per process of :data:`infra.metrics.PROCESSES`, labelled ``process``, and
    the Flink cluster's members (``flink-<member>``) found from the file ``flink up`` writes.

    Every process is listed whether it runs or not: one that is not running shows as a target that is
    down, which is what the health page should say. The timeout stays within the interval (Prometheus
    refuses a config where it does not)."""
    interval = settings.metrics.scrape_interval_s
    config = {
        "global": {
            "scrape_interval": _duration(interval),
            "scrape_timeout": _duration(min(interval, 10.0)),
            "evaluation_interval": _duration(max(interval, 15.0)),
        },
        "scrape_configs": [
            *(
                {"job_name": process, "static_configs": [{"targets": [target], "labels": {"process": process}}]}
                for process, target in scrape_targets(settings).items()
            ),
            {  # the Flink cluster's members, while it runs (infra/flink_cluster.py writes the file)
                "job_name": "flink-cluster",
                "file_sd_configs": [
                    {"files": [str(ClusterPaths.of(settings).scrape_targets)], "refresh_interval": "5s"}
                ],
            },
        ],
    }
    header = "# Generated by infra/stack.py at every start and `up` -- edit the generator, not this file.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def _prometheus_command(binary: str, paths: StackPaths, ep: Endpoints) -> list[str]:
    return [
        binary,
        f"--config.file={paths.prometheus_conf}",
        f"--storage.tsdb.path={paths.data('prometheus')}",
        f"--storage.tsdb.retention.time={PROMETHEUS_RETENTION}",
        f"--web.listen-address={host_port(ep.bind_host, ep.prometheus_port)}",  # [::1]:9490: ::1:9490 is refused
    ]


def _start_prometheus(settings: Settings, paths: StackPaths, ep: Endpoints) -> subprocess.Popen:
    """Debian's ``prometheus`` binary with our own config, data dir and port (never the package's
    system service on 9090)."""
    binary = shutil.which("prometheus") or shutil.which("prometheus", path=SERVICE_PATH)
    if not binary:
        raise StackError("prometheus is not installed (Debian package prometheus): run `make setup`")
    data = paths.data("prometheus")
    data.mkdir(parents=True, exist_ok=True)
    paths.conf.mkdir(parents=True, exist_ok=True)
    paths.prometheus_conf.write_text(prometheus_config(settings))
    env = {"PATH": SERVICE_PATH, "LANG": "C.UTF-8"}  # a Go binary: no JVM, so no JAVA_HOME to look for
    return _spawn("prometheus", paths, _prometheus_command(binary, paths, ep), env, cwd=data)


def _reload_prometheus(settings: Settings, paths: StackPaths, proc: psutil.Process) -> None:
    """A running Prometheus whose scrape config no longer matches the settings (another scrape interval
    or base port) gets the new one and a SIGHUP: it reloads without losing its data or its pid."""
    wanted = prometheus_config(settings)
    with contextlib.suppress(OSError):
        if paths.prometheus_conf.read_text() == wanted:
            return
    paths.prometheus_conf.write_text(wanted)
    with contextlib.suppress(psutil.Error):
        proc.send_signal(signal.SIGHUP)
        log.info("prometheus: scrape config changed, reloaded (pid %d)", proc.pid)


_STARTERS: dict[str, Callable[[Settings, StackPaths, Endpoints], subprocess.Popen]] = {
    "kafka": _start_kafka,
    "opensearch": _start_opensearch,
    "mosquitto": _start_mosquitto,
    "smtp": _start_smtp,
    "prometheus": _start_prometheus,
}


def _wait_healthy(
    svc: str,
    settings: Settings,
    paths: StackPaths,
    ep: Endpoints,
    proc: subprocess.Popen | psutil.Process,
    timeout: float = START_TIMEOUT_S,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(svc, settings, ep):
            return
        alive = proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_running()
        if not alive:
            paths.pid(svc).unlink(missing_ok=True)
            raise StackError(f"{svc} exited during start-up; end of {paths.log(svc)}:\n{log_tail(paths.log(svc))}")
        time.sleep(0.3)
    raise StackError(
        f"{svc} not healthy after {timeout:.0f}s; end of {paths.log(svc)}:\n"
        f"{log_tail(paths.log(svc))}\n(try `make down` and `make up`)"
    )


BIND_RETRIES = 2
"""Starts again after a service exits with "Address already in use" although its ports were free just before: a
port in Linux's ephemeral range (32768-60999; the defaults and CI's ports lie below it, an operator's may not) can be
held for a moment by any outgoing connection, Kafka's own to its controller included."""


def _start_and_wait(svc: str, settings: Settings, paths: StackPaths, ep: Endpoints) -> None:
    """Start ``svc`` and wait until healthy, again (:data:`BIND_RETRIES`) when a port was taken meanwhile."""
    for attempt in range(BIND_RETRIES + 1):
        try:
            _start_once(svc, settings, paths, ep)
            return
        except StackError as exc:
            if "Address already in use" not in str(exc) or attempt == BIND_RETRIES:
                raise
            log.warning("%s: a port was taken while it started (a passing connection's port); starting again", svc)
            time.sleep(1.0)


def _start_once(svc: str, settings: Settings, paths: StackPaths, ep: Endpoints) -> None:
    popen = _STARTERS[svc](settings, paths, ep)
    log.info("%s: started pid %d, waiting until healthy", svc, popen.pid)
    if svc == "kafka" and settings.kafka.sasl_enabled:
        # The clients' user may not exist yet (a fresh broker) or have another password: the stack's
        # own login puts it in place before the broker counts as healthy for the clients.
        admin = _stack_admin(settings, paths)
        _wait_healthy(svc, admin, paths, ep, popen)
        _ensure_scram_user(admin, settings.kafka)
    _wait_healthy(svc, settings, paths, ep, popen)


def _ensure_service(svc: str, settings: Settings, paths: StackPaths, ep: Endpoints) -> str:
    """Bring one service to healthy; returns what was done: running | started | external."""
    if svc == "kafka" and settings.kafka.brokers > 1:
        return _ensure_kafka_cluster(settings, paths, ep)
    if svc == "kafka" and any(_our_process(name, paths) for name in KAFKA_NODE_NAMES):
        raise StackError(
            "kafka: three brokers from this stack dir run but the settings ask for one "
            "(CG_KAFKA__BROKERS): `make down` then `make up`"
        )
    proc = _our_process(svc, paths)
    if proc is not None:
        drift = _security_drift(svc, settings, paths)
        if drift:
            raise StackError(drift)
        if svc == "prometheus":
            _reload_prometheus(settings, paths, proc)
        if not _healthy(svc, settings, ep):
            log.info("%s: pid %d running, waiting until healthy", svc, proc.pid)
            _wait_healthy(svc, settings, paths, ep, proc)
        return "running"
    _clean_stale_pid(svc, paths)
    busy = [host_port(h, p) for h, p in ep.ports(svc) if port_open(h, p)]
    if busy:
        if _healthy(svc, settings, ep):
            log.warning(
                "%s: already served at %s by a process this stack dir did not start; using it", svc, ep.address(svc)
            )
            return "external"
        raise StackError(
            f"{svc}: port(s) {', '.join(busy)} taken by another process; free them or change "
            "the ports in the settings (CG_KAFKA__BOOTSTRAP_SERVERS, CG_KAFKA__CONTROLLER_PORT, "
            "CG_OPENSEARCH__URL, CG_MQTT__PORT, CG_SMTP__PORT, CG_METRICS__PROMETHEUS_PORT)"
        )
    t0 = time.monotonic()
    _start_and_wait(svc, settings, paths, ep)
    log.info("%s: healthy at %s after %.1fs", svc, ep.address(svc), time.monotonic() - t0)
    if svc == "opensearch":
        _configure_opensearch(settings)
    return "started"


# --------------------------------------------------------------------------------------------------
# Public API


def _set_topic_config(admin: AdminClient, topic: str, config: dict[str, str]) -> None:
    """Set these keys on an existing topic (the others stay): a retention setting changed since creation."""
    entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in config.items()]
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=entries)
    for fut in admin.incremental_alter_configs([resource]).values():
        try:
            fut.result(30)
        except KafkaException as exc:
            log.warning("could not set %s on topic %s: %s", ", ".join(config), topic, exc)


def ensure_topics(settings: Settings) -> list[str]:
    """Create the topics of ``schemas.topics.ALL_TOPICS`` (with the settings' prefix) that are missing.

    Existing topics are left alone (a partition count that differs from the spec is logged), but for the
    dead letters' retention and each spec's ``enforced`` keys. Returns the names created. What is missing is
    decided by ``kafka_clients.listed_topic``, as by every tool: a topic listed as unknown is created."""
    admin = _admin(settings)
    prefix = settings.kafka.topic_prefix
    wanted = {spec.full_name(prefix): spec for spec in ALL_TOPICS}
    listing = kafka_clients.cluster_metadata(admin, settings)
    existing = {name: found for name in wanted if (found := kafka_clients.listed_topic(listing, name)) is not None}
    for name, spec in wanted.items():
        if name in existing and existing[name].error is None and len(existing[name].partitions) != spec.partitions:
            log.warning(
                "topic %s has %d partitions, the spec says %d (left alone)",
                name,
                len(existing[name].partitions),
                spec.partitions,
            )
    dead_letters = DEAD_LETTERS.full_name(prefix)
    retention = {"retention.ms": str(int(settings.kafka.dead_letter_retention_days * 86_400_000))}
    replicas = topic_config(settings.kafka.brokers)  # three brokers: min.insync.replicas 2
    missing = [
        NewTopic(
            name,
            num_partitions=spec.partitions,
            replication_factor=settings.kafka.brokers,
            config={**spec.config, **replicas, **(retention if name == dead_letters else {})},
        )
        for name, spec in wanted.items()
        if name not in existing
    ]
    created = []
    for name, fut in (admin.create_topics(missing, request_timeout=30) if missing else {}).items():
        try:
            fut.result()
            created.append(name)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc.args[0]):
                raise StackError(f"creating topic {name} failed: {exc}") from exc
    for name, spec in wanted.items():  # there already (or made by a racing call): these keys win all the same
        enforced = {key: spec.config[key] for key in spec.enforced} | (retention if name == dead_letters else {})
        if enforced and name not in created:
            _set_topic_config(admin, name, enforced)
    if created:
        log.info("kafka: created topics %s", ", ".join(created))
    return created


def describe_topics(settings: Settings) -> dict[str, dict]:
    """Partitions and (non-default) config of every topic of ALL_TOPICS that exists (``kafka_clients.listed_topic``)."""
    admin = _admin(settings)
    prefix = settings.kafka.topic_prefix
    md = admin.list_topics(timeout=10)
    wanted = [s.full_name(prefix) for s in ALL_TOPICS]
    found = {n: topic for n in wanted if (topic := kafka_clients.listed_topic(md, n)) is not None}
    out: dict[str, dict] = {n: {"partitions": len(topic.partitions), "config": {}} for n, topic in found.items()}
    if found:
        futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, n) for n in found])
        for res, fut in futures.items():
            out[res.name]["config"] = {
                k: v.value for k, v in fut.result().items() if not v.is_default and not v.is_sensitive
            }
    return out


_COORDINATOR_LOADING = frozenset(
    {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.COORDINATOR_LOAD_IN_PROGRESS}
)
"""What a group request answers while ``__consumer_offsets`` is being created (not all flagged retriable)."""


def _wait_group_coordinator(settings: Settings, timeout_s: float = START_TIMEOUT_S) -> None:
    """Block until the broker serves consumer groups: on a fresh broker the first group request
    creates ``__consumer_offsets`` and answers NOT_COORDINATOR until its partitions are loaded."""
    probe = kafka_clients.consumer(settings, "checkout-guard-stack-probe", kafka_clients.MANUAL_COMMIT)
    topic = ALL_TOPICS[0].full_name(settings.kafka.topic_prefix)

    def loading(exc: BaseException) -> bool:
        if not isinstance(exc, KafkaException):
            return False
        err = exc.args[0]
        return err.retriable() or err.code() in _COORDINATOR_LOADING

    try:
        call_with_retries(
            lambda: probe.committed([TopicPartition(topic, 0)], timeout=10),
            retriable=loading,
            wait=lambda _n: 0.5,
            deadline_s=timeout_s,
        )
    except KafkaException as exc:
        raise StackError(f"Kafka does not serve consumer groups: {exc}") from exc
    finally:
        probe.close()


def up(settings: Settings, services: tuple[str, ...] = SERVICES) -> dict:
    """Start whatever of ``services`` is not running (in parallel), wait until healthy, create missing
    topics (when Kafka is among them).

    Idempotent: services already running and healthy are left as they are. Returns :func:`status`."""
    paths, ep = StackPaths.of(settings), Endpoints.of(settings)
    t0 = time.monotonic()
    with _lock(paths):
        for d in (paths.conf, paths.run, paths.logs, paths.tmp):
            d.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(len(services)) as pool:
            futures = {svc: pool.submit(_ensure_service, svc, settings, paths, ep) for svc in services}
            errors = []
            for fut in futures.values():
                try:
                    fut.result()
                except StackError as exc:
                    errors.append(str(exc))
        if errors:
            raise StackError("\n\n".join(errors))
        if "kafka" in services:
            ensure_topics(settings)
            _wait_group_coordinator(settings)
    log.info("stack up in %.1fs (data and logs in %s)", time.monotonic() - t0, paths.root)
    return status(settings)


def down(settings: Settings) -> list[str]:
    """Stop the services this stack dir started (SIGTERM, SIGKILL after a timeout); clean pid files.

    Returns the names of the services stopped."""
    paths = StackPaths.of(settings)
    with _lock(paths):
        procs: dict[str, psutil.Process] = {}
        for svc in (*SERVICES, *KAFKA_NODE_NAMES):  # whichever Kafka shape runs, whatever the settings say now
            proc = _our_process(svc, paths)
            if proc is None:
                _clean_stale_pid(svc, paths)
                continue
            procs[svc] = proc
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGTERM)
            log.info("%s: SIGTERM to pid %d", svc, proc.pid)
        _, alive = psutil.wait_procs(list(procs.values()), timeout=STOP_TIMEOUT_S)
        for proc in alive:
            log.warning("pid %d did not stop within %.0fs: SIGKILL", proc.pid, STOP_TIMEOUT_S)
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        for svc in procs:
            paths.pid(svc).unlink(missing_ok=True)
        if procs.keys() & {"kafka", *KAFKA_NODE_NAMES}:
            paths.kafka_admin_secret.unlink(missing_ok=True)
    return list(procs)


def reset(settings: Settings) -> None:
    """``down``, then delete data, logs, generated config, Flink checkpoints, kept mails and the alert
    sender's ledger (installs are kept): replayed ids must alert again on an empty stack."""
    down(settings)
    paths = StackPaths.of(settings)
    doomed = [
        paths.root / "data",
        paths.logs,
        paths.conf,
        paths.tmp,
        paths.run,
        paths.root / "flink",
        local_smtp.mail_dir(paths.root),
        paths.root / "alerts",
    ]  # alerts: the sender's dedup ledger
    checkpoints = Path(settings.checkpoint_dir).resolve()
    if checkpoints.is_relative_to(paths.root):  # never delete a checkpoint store outside the stack dir
        doomed.append(checkpoints)
    for d in doomed:
        if d.exists():
            shutil.rmtree(d)
            log.info("removed %s", d)


def kafka_state(settings: Settings, topics: list[str] | None = None, timeout_s: float = 5.0) -> dict:
    """Each local broker and each partition of ``topics`` (default: ours) as the cluster sees them now::

        {"brokers": [{"node": 1, "address": "127.0.0.1:9092", "pid": int | None, "up": bool,
                      "controller": bool}, ...],
         "controller": int | None,
         "partitions": {topic: [{"partition": 0, "leader": 1, "replicas": [1, 2, 3], "isr": [1, 2, 3]}]}}

    ``up``: registered with the cluster (a SIGKILLed broker drops out once its session expires);
    ``controller``: the KRaft quorum leader (DescribeQuorum; unknown when the brokers ask for a login).

    A topic the broker answers with an error is left out (no partitions to show); one with a partition without a
    leader is not (``topic_replay.topic_unusable`` is not asked): this is the cluster's state, leader -1 included, what
    the broker-failover test waits on and ``stack status`` shows; :func:`status` judges the topics' health by it."""
    paths, nodes = StackPaths.of(settings), _kafka_nodes(settings)
    md = None
    with contextlib.suppress(KafkaException):
        md = _admin(settings).list_topics(timeout=timeout_s)
    registered = set(md.brokers) if md is not None else set()
    controller = None
    if not settings.kafka.sasl_enabled:
        for node in nodes:
            if node.node_id in registered and (controller := active_controller(node.host, node.port)) is not None:
                break
    brokers = []
    for node in nodes:
        proc = _our_process(_kafka_node_name(node, nodes), paths)
        brokers.append(
            {
                "node": node.node_id,
                "address": node.address,
                "pid": proc.pid if proc else None,
                "up": node.node_id in registered,
                "controller": node.node_id == controller,
            }
        )
    names = topics if topics is not None else [s.full_name(settings.kafka.topic_prefix) for s in ALL_TOPICS]
    partitions: dict[str, list[dict]] = {}
    for name in names:
        topic = kafka_clients.listed_topic(md, name) if md is not None else None
        if topic is None or topic.error is not None:
            continue
        partitions[name] = [
            {"partition": p.id, "leader": p.leader, "replicas": list(p.replicas), "isr": list(p.isrs)}
            for p in sorted(topic.partitions.values(), key=lambda p: p.id)
        ]
    return {"brokers": brokers, "controller": controller, "partitions": partitions}


def status(settings: Settings) -> dict:
    """Health of each service and of the topics::

        {"services": {"kafka": {"pid": int | None, "managed": bool, "address": "127.0.0.1:9092, ...",
                                "healthy": bool, "detail": str}, "opensearch": {...}, "mosquitto": {...}},
         "topics": {"expected": 8, "present": 8 | None, "missing": [...], "unavailable": {name: why}},
         "kafka": {"brokers": [...], "controller": ..., "partitions": {...}},  (see kafka_state)
         "healthy": bool}

    ``managed`` says the process was started from this stack dir (has a live pid file). A topic is missing by
    ``kafka_clients.listed_topic``; one that exists but the broker answers with an error (no leader, not authorised),
    for the topic or one of its partitions, or with a partition without a leader, is present and ``unavailable``, the
    partition named, in the broker's words (``topic_replay.topic_unusable``): not healthy."""
    paths, ep = StackPaths.of(settings), Endpoints.of(settings)
    services: dict[str, dict] = {}
    for svc in SERVICES:
        proc = _our_process(svc, paths)
        if svc == "kafka" and len(ep.kafka_nodes) > 1:  # the first of the three that runs
            proc = next(filter(None, (_our_process(name, paths) for name in KAFKA_NODE_NAMES)), None)
        healthy = _healthy(svc, settings, ep)
        detail = ""
        if svc == "opensearch" and healthy:
            detail = f"cluster {_opensearch_status(settings)}"
        elif svc == "prometheus" and healthy:
            detail = _prometheus_targets(ep) + ("" if proc else "; not started from this stack dir")
        elif healthy and proc is None:
            detail = "not started from this stack dir"
        elif not healthy and proc is not None:
            detail = f"process alive but not answering; see {paths.log(svc)}"
        services[svc] = {
            "pid": proc.pid if proc else None,
            "managed": proc is not None,
            "address": ep.address(svc),
            "healthy": healthy,
            "detail": detail,
        }
    expected = [s.full_name(settings.kafka.topic_prefix) for s in ALL_TOPICS]
    topics: dict = {"expected": len(expected), "present": None, "missing": expected, "unavailable": {}}
    if services["kafka"]["healthy"]:
        from infra.clients.topic_replay import topic_unusable

        with contextlib.suppress(KafkaException):
            listing = _admin(settings).list_topics(timeout=5)
            found = {t: kafka_clients.listed_topic(listing, t) for t in expected}
            topics["missing"] = [t for t, topic in found.items() if topic is None]
            topics["present"] = len(expected) - len(topics["missing"])
            topics["unavailable"] = {
                t: str(why)
                for t, topic in found.items()
                if topic is not None and (why := topic_unusable(t, topic)) is not None
            }
    kafka: dict = {"brokers": [], "controller": None, "partitions": {}}
    if any(port_open(n.host, n.port) for n in ep.kafka_nodes):  # a degraded cluster still answers
        kafka = kafka_state(settings)
    ok = all(s["healthy"] for s in services.values()) and not topics["missing"] and not topics["unavailable"]
    return {"services": services, "topics": topics, "kafka": kafka, "healthy": ok}


# --------------------------------------------------------------------------------------------------
# CLI

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Local stack: Kafka (KRaft), OpenSearch, Mosquitto, SMTP and Prometheus under the stack dir.",
)


def _cli_settings() -> Settings:
    settings = get_settings()
    setup_logging(settings, process="stack")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return settings


def _print_status(st: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="checkout-guard local stack")
    for col in ("service", "pid", "address", "healthy", "detail"):
        table.add_column(col)
    for svc, s in st["services"].items():
        table.add_row(
            svc,
            str(s["pid"] or "-"),
            s["address"],
            "[green]yes[/green]" if s["healthy"] else "[red]no[/red]",
            s["detail"],
        )
    t = st["topics"]
    present = "?" if t["present"] is None else t["present"]
    unavailable = t.get("unavailable") or {}
    table.add_row(
        "topics",
        "",
        "",
        "[green]yes[/green]" if not t["missing"] and not unavailable else "[red]no[/red]",
        f"{present}/{t['expected']} present"
        + (f"; missing {', '.join(t['missing'])}" if t["missing"] and t["present"] is not None else "")
        + "".join(f"; {why}" for why in unavailable.values()),
    )
    Console().print(table)
    if len(st.get("kafka", {}).get("brokers", [])) > 1:
        _print_kafka_cluster(st["kafka"])


def _print_kafka_cluster(kafka: dict) -> None:
    """Three brokers: each one's state, and each partition's leader and in-sync replicas (red: fewer
    in sync than replicas)."""
    from rich.console import Console
    from rich.table import Table

    brokers = Table(title="kafka brokers")
    for col in ("node", "address", "pid", "up", "role"):
        brokers.add_column(col)
    for b in kafka["brokers"]:
        up_cell = "[green]up[/green]" if b["up"] else "[red]down[/red]"
        role = "active controller" if b["controller"] else "broker, voter"
        brokers.add_row(str(b["node"]), b["address"], str(b["pid"] or "-"), up_cell, role)
    parts = Table(title="partitions: leader \\[in-sync replicas]")
    for col in ("topic", "partitions", "under-replicated"):
        parts.add_column(col)
    for topic, partitions in kafka["partitions"].items():
        cells, under = [], 0
        for p in partitions:
            short = len(p["isr"]) < len(p["replicas"])
            under += short
            cell = f"{p['partition']}: {p['leader']} [{','.join(map(str, p['isr']))}]"
            cells.append(f"[red]{cell}[/red]" if short else cell)
        parts.add_row(topic, "  ".join(cells), f"[red]{under}[/red]" if under else "0")
    Console().print(brokers)
    Console().print(parts)


def _fail(exc: StackError) -> None:
    typer.echo(f"[stack] ERROR: {exc}", err=True)
    raise typer.Exit(1)


@app.command("up")
def up_cmd() -> None:
    """Start Kafka, OpenSearch, Mosquitto, SMTP and Prometheus (those not running) and create the topics."""
    try:
        _print_status(up(_cli_settings()))
    except StackError as exc:
        _fail(exc)


@app.command("down")
def down_cmd() -> None:
    """Stop the services started from this stack dir."""
    stopped = down(_cli_settings())
    typer.echo(f"[stack] stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@app.command("status")
def status_cmd() -> None:
    """Show each service's health and the topics; exit 1 if anything is down."""
    st = status(_cli_settings())
    _print_status(st)
    if not st["healthy"]:
        raise typer.Exit(1)


@app.command("topics")
def topics_cmd() -> None:
    """Create missing topics and list them with partitions and config."""
    from rich.console import Console
    from rich.table import Table

    settings = _cli_settings()
    try:
        ensure_topics(settings)
        topics = describe_topics(settings)
    except (StackError, KafkaException) as exc:
        _fail(StackError(str(exc)))
    table = Table(title=f"topics at {settings.kafka.bootstrap}")
    for col in ("topic", "partitions", "config"):
        table.add_column(col)
    for name, t in topics.items():
        table.add_row(name, str(t["partitions"]), ", ".join(f"{k}={v}" for k, v in sorted(t["config"].items())))
    Console().print(table)


@app.command("reset")
def reset_cmd() -> None:
    """Stop everything and delete data, logs and checkpoints (keeps the installed software)."""
    reset(_cli_settings())
    typer.echo("[stack] reset done; `make up` starts from empty")


flink_app = flink_cli(_cli_settings, find_java_home, lambda settings: StackPaths.of(settings).flink_plugins, StackError)
app.add_typer(
    flink_app,
    name="flink",
    help="A standalone Flink cluster from the wheel: flink up|down|status|submit|stop (infra/flink_cluster.py).",
)


if __name__ == "__main__":
    from infra.cli import run_tool

    run_tool(app)
