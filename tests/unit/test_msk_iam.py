"""MSK IAM: one setting (``CG_KAFKA__SASL_MECHANISM=AWS_MSK_IAM``) gives the Python clients librdkafka's
OAUTHBEARER with AWS's token signer and the job's Java client aws-msk-iam-auth's login, never a secret.

Nothing here reaches AWS: the credentials are fake ones from the environment, and a SigV4 signature is computed
locally. The JVM test runs the relocated aws-msk-iam-auth that ``make setup`` builds against the connector's
relocated Kafka client, the way the Flink job loads them.
"""

from __future__ import annotations

import base64
import logging
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from pydantic import ValidationError

from infra.clients import kafka as kafka_clients
from infra.clients import msk_iam
from infra.settings import KafkaSettings, Settings
from infra.stack import StackError, StackPaths, find_java_home, flink_connector_jars
from jobs.flink.job import SHADED_KAFKA, kafka_properties

REGION = "eu-west-1"
ACCESS_KEY = "AKIAFAKEFAKEFAKE0001"
SECRET_KEY = "fake+secret/key/never+in+any+config000"
BROKER = "b-1.cg.abc123.c2.kafka.eu-west-1.amazonaws.com"
IAM = {
    "bootstrap_servers": f"{BROKER}:9098",
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "AWS_MSK_IAM",
    "aws_region": REGION,
}


@pytest.fixture
def fake_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Static credentials in the environment, no profile files, no instance metadata: signing stays local."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_the_python_clients_log_in_with_oauthbearer_and_a_token_callback() -> None:
    conf = KafkaSettings(**IAM).client_config()
    assert {k: v for k, v in conf.items() if k != "oauth_cb"} == {
        "bootstrap.servers": f"{BROKER}:9098",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "OAUTHBEARER",  # librdkafka has no AWS_MSK_IAM
    }
    assert conf["oauth_cb"] == msk_iam.MskIamToken(REGION)
    # every client the project builds goes through kafka_clients.config, which keeps the callback as it is
    built = kafka_clients.config(Settings(kafka=IAM), kafka_clients.RELIABLE, client_id="x")
    assert built["oauth_cb"] == conf["oauth_cb"] and built["sasl.mechanism"] == "OAUTHBEARER"


def test_the_token_is_a_presigned_kafka_connect_url_for_the_region_and_expires_in_seconds(fake_aws: None) -> None:
    token_source = KafkaSettings(**IAM).client_config()["oauth_cb"]
    assert callable(token_source)
    before = time.time()
    token, expiry = token_source("")
    url = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    parsed = urlparse(url)
    query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
    assert (parsed.scheme, parsed.netloc) == ("https", f"kafka.{REGION}.amazonaws.com")
    assert query["Action"] == "kafka-cluster:Connect"
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert query["X-Amz-Credential"].startswith(f"{ACCESS_KEY}/") and query["X-Amz-Credential"].endswith(
        f"/{REGION}/kafka-cluster/aws4_request"
    )
    assert query["X-Amz-Expires"] == "900" and len(query["X-Amz-Signature"]) == 64
    assert SECRET_KEY not in url
    # librdkafka wants epoch seconds (the signer gives milliseconds): 15 minutes from the signing second
    assert before - 1 + 900 <= expiry <= time.time() + 900


def test_a_profile_or_a_role_reaches_the_signer(monkeypatch: pytest.MonkeyPatch) -> None:
    from aws_msk_iam_sasl_signer import MSKAuthTokenProvider

    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(
        MSKAuthTokenProvider,
        "generate_auth_token_from_profile",
        lambda region, profile: calls.append(("profile", region, profile)) or ("t", 1_000_000),
    )
    monkeypatch.setattr(
        MSKAuthTokenProvider,
        "generate_auth_token_from_role_arn",
        lambda region, arn, session: calls.append(("role", region, arn, session)) or ("t", 2_000_000),
    )
    role = "arn:aws:iam::123456789012:role/cg-kafka"
    by_profile = KafkaSettings(**IAM, aws_profile="cg").client_config()["oauth_cb"]
    by_role = KafkaSettings(**IAM, aws_role_arn=role).client_config()["oauth_cb"]
    assert callable(by_profile) and callable(by_role)
    assert by_profile(None) == ("t", 1000.0) and by_role(None) == ("t", 2000.0)
    assert calls == [("profile", REGION, "cg"), ("role", REGION, role, msk_iam.ROLE_SESSION_NAME)]


def test_a_token_that_cannot_be_signed_is_logged_with_its_reason(
    fake_aws: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    token_source = msk_iam.MskIamToken(REGION)
    with caplog.at_level(logging.ERROR, "infra.clients.msk_iam"), pytest.raises(Exception):  # noqa: B017
        token_source(None)
    assert "MSK IAM token for eu-west-1 could not be signed" in caplog.text


def test_a_real_client_takes_the_callback_at_construction(fake_aws: None) -> None:
    """confluent-kafka asks ``oauth_cb`` in the constructor and fails there after 10 s without a token."""
    asked: list[str | None] = []
    signer = msk_iam.MskIamToken(REGION)

    def counting(config: str | None) -> tuple[str, float]:
        asked.append(config)
        return signer(config)

    quiet = logging.getLogger("test_msk_iam.librdkafka")
    quiet.disabled = True
    # 127.0.0.1:1: refused at once, nothing is listening; the token is set before any connection anyway
    admin = kafka_clients.admin(
        KafkaSettings(**{**IAM, "bootstrap_servers": "127.0.0.1:1"}), oauth_cb=counting, logger=quiet
    )
    assert len(asked) == 1
    del admin


@pytest.mark.parametrize(
    ("changes", "needs"),
    [
        ({"security_protocol": "SASL_PLAINTEXT"}, "security_protocol SASL_SSL"),
        ({"aws_region": None}, "aws_region"),
        ({"sasl_username": "u", "sasl_password": "p"}, "no sasl_username/sasl_password"),
        ({"aws_profile": "a", "aws_role_arn": "arn:aws:iam::1:role/r"}, "aws_profile or aws_role_arn, not both"),
    ],
)
def test_incomplete_msk_iam_settings_fail_at_start(changes: dict[str, object], needs: str) -> None:
    with pytest.raises(ValidationError, match=f"AWS_MSK_IAM needs.*{needs}"):
        Settings(kafka={**IAM, **changes})


def test_other_mechanisms_ignore_the_aws_settings() -> None:
    scram = KafkaSettings(
        security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="p"
    )
    assert not scram.msk_iam and "oauth_cb" not in scram.client_config()
    assert KafkaSettings(sasl_mechanism="aws_msk_iam", security_protocol="sasl_ssl", aws_region=REGION).msk_iam


def test_the_java_client_gets_aws_msk_iam_with_the_librarys_classes_and_no_secret() -> None:
    assert KafkaSettings(**IAM).java_client_config(SHADED_KAFKA) == {
        "bootstrap.servers": f"{BROKER}:9098",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "AWS_MSK_IAM",
        # aws-msk-iam-auth's own names: only its references to Kafka are relocated (infra/flink-msk-iam/pom.xml)
        "sasl.jaas.config": "software.amazon.msk.auth.iam.IAMLoginModule required;",
        "sasl.client.callback.handler.class": "software.amazon.msk.auth.iam.IAMClientCallbackHandler",
    }
    role = "arn:aws:iam::123456789012:role/cg-kafka"
    assumed = KafkaSettings(**IAM, aws_role_arn=role).java_client_config(SHADED_KAFKA)["sasl.jaas.config"]
    assert assumed == (
        f'software.amazon.msk.auth.iam.IAMLoginModule required awsRoleArn="{role}" '
        f'awsRoleSessionName="checkout-guard" awsStsRegion="{REGION}";'
    )
    profile = KafkaSettings(**IAM, aws_profile='we"ird').java_client_config()["sasl.jaas.config"]
    assert profile == 'software.amazon.msk.auth.iam.IAMLoginModule required awsProfileName="we\\"ird";'


def test_the_job_hands_the_iam_login_to_the_connector_as_properties(fake_aws: None) -> None:
    options = kafka_properties(Settings(kafka=IAM))
    assert options["properties.sasl.mechanism"] == "AWS_MSK_IAM"
    assert options["properties.sasl.client.callback.handler.class"] == msk_iam.CALLBACK_HANDLER
    assert not [v for v in options.values() if ACCESS_KEY in v or SECRET_KEY in v]


# --- the relocated aws-msk-iam-auth in a JVM --------------------------------------------------------------

PROBE = """
import java.io.FileReader;
import java.nio.charset.StandardCharsets;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import javax.security.auth.Subject;
import javax.security.auth.callback.CallbackHandler;
import javax.security.auth.login.AppConfigurationEntry;
import javax.security.auth.spi.LoginModule;
import javax.security.sasl.Sasl;

public class MskIamProbe {
    public static void main(String[] args) throws Exception {
        String prefix = args[0], handlerName = args[1], loginName = args[2], host = args[3], propertiesFile = args[4];
        Class<?> handlerClass = Class.forName(handlerName);
        Class<?> iface = Class.forName(prefix + "org.apache.kafka.common.security.auth.AuthenticateCallbackHandler");
        System.out.println("IMPLEMENTS " + iface.isAssignableFrom(handlerClass));
        // The SASL exchange's first message, as the relocated Kafka client gets it: handler, login, SASL client
        Object handler = handlerClass.getConstructor().newInstance();
        AppConfigurationEntry entry = new AppConfigurationEntry(
                loginName, AppConfigurationEntry.LoginModuleControlFlag.REQUIRED, Map.of());
        iface.getMethod("configure", Map.class, String.class, List.class)
                .invoke(handler, Map.of(), "AWS_MSK_IAM", List.of(entry));
        LoginModule login = (LoginModule) Class.forName(loginName).getConstructor().newInstance();
        login.initialize(new Subject(), null, new HashMap<>(), new HashMap<>());
        login.login();
        byte[] first = Sasl.createSaslClient(new String[] {"AWS_MSK_IAM"}, null, "kafka", host, Map.of(),
                (CallbackHandler) handler).evaluateChallenge(new byte[0]);
        System.out.println("PAYLOAD " + new String(first, StandardCharsets.UTF_8));
        // The job's own properties, taken by the connector's relocated Kafka client (no connection is made)
        Properties properties = new Properties();
        try (FileReader reader = new FileReader(propertiesFile)) { properties.load(reader); }
        Class<?> admin = Class.forName(prefix + "org.apache.kafka.clients.admin.Admin");
        AutoCloseable client = (AutoCloseable) admin.getMethod("create", Properties.class).invoke(null, properties);
        client.close();
        System.out.println("CLIENT-CREATED");
    }
}
"""


def _installed_iam_jar() -> list[Path]:
    return sorted(StackPaths.of(Settings()).flink_lib.glob("aws-msk-iam-auth-*-flink-sql.jar"))


@pytest.mark.skipif(
    not _installed_iam_jar(), reason="aws-msk-iam-auth relocated for the Flink connector is not installed (make setup)"
)
def test_the_relocated_library_implements_the_connectors_kafka_interface_and_signs_in_a_jvm(
    fake_aws: None, tmp_path: Path
) -> None:
    import pyflink

    try:
        java = find_java_home(Settings()) / "bin" / "java"
        jars = flink_connector_jars(Settings())
    except StackError as exc:
        pytest.skip(str(exc))
    flink_runtime = Path(pyflink.__file__).parent / "lib" / "*"  # slf4j and the rest of Flink's classpath
    (tmp_path / "MskIamProbe.java").write_text(PROBE)
    properties = {
        **KafkaSettings(**{**IAM, "bootstrap_servers": "127.0.0.1:1"}).java_client_config(SHADED_KAFKA),
        "client.id": "msk-iam-probe",
    }
    (tmp_path / "client.properties").write_text(
        "".join(f"{k}={v.replace(chr(92), chr(92) * 2)}\n" for k, v in properties.items())
    )
    run = subprocess.run(
        [str(java), "-cp", ":".join([*map(str, jars), str(flink_runtime)]), "MskIamProbe.java"]
        + [SHADED_KAFKA, msk_iam.CALLBACK_HANDLER, msk_iam.LOGIN_MODULE, BROKER, str(tmp_path / "client.properties")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if " " in line)
    assert lines["IMPLEMENTS"] == "true"
    payload = lines["PAYLOAD"]
    assert '"action":"kafka-cluster:Connect"' in payload and f'"host":"{BROKER}"' in payload
    assert f"{ACCESS_KEY}/" in payload and f"/{REGION}/kafka-cluster/aws4_request" in payload
    assert SECRET_KEY not in payload
    assert "CLIENT-CREATED" in run.stdout
