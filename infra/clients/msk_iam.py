"""Amazon MSK IAM authentication, one setting (``CG_KAFKA__SASL_MECHANISM=AWS_MSK_IAM``) for both clients.

The two Kafka clients speak it differently, each the way AWS documents for it:

- librdkafka (confluent-kafka) has no ``AWS_MSK_IAM`` mechanism: it logs in with ``OAUTHBEARER``, the token
  being a SigV4-presigned ``kafka-cluster:Connect`` URL made by AWS's ``aws-msk-iam-sasl-signer-python``
  (:class:`MskIamToken`, librdkafka's ``oauth_cb``). librdkafka asks again before the token's 15 minutes end,
  from ``poll()``; the constructor asks the first time.
- The Java client (the Flink job's connector) uses ``aws-msk-iam-auth``: mechanism ``AWS_MSK_IAM``, its JAAS
  login module and callback handler (:func:`java_config`). It reads the region from the MSK broker host names.
  Flink's SQL Kafka connector relocated the Kafka client under ``org.apache.flink.kafka.shaded.``, so
  infra/install.sh builds aws-msk-iam-auth with its Kafka references relocated the same way
  (infra/flink-msk-iam/pom.xml); its own classes keep their names, which are the ones configured here.

Credentials are never in the configuration: both sides take them from the AWS default chain (environment,
profile files, the ECS task role, ...), optionally a named profile, optionally assuming a role.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

MECHANISM = "AWS_MSK_IAM"
"""The value of ``KafkaSettings.sasl_mechanism`` that selects MSK IAM (the Java client's mechanism name)."""
SECURITY_PROTOCOL = "SASL_SSL"
"""MSK serves IAM on its TLS listener (port 9098) only."""
LOGIN_MODULE = "software.amazon.msk.auth.iam.IAMLoginModule"
CALLBACK_HANDLER = "software.amazon.msk.auth.iam.IAMClientCallbackHandler"
"""aws-msk-iam-auth's classes: not relocated (only their references to Kafka's are)."""
ROLE_SESSION_NAME = "checkout-guard"
"""The STS session name both clients use when they assume ``aws_role_arn``."""

log = logging.getLogger("infra.clients.msk_iam")


@dataclass(frozen=True)
class MskIamToken:
    """librdkafka's ``oauth_cb``: a fresh MSK IAM token and its expiry (epoch seconds) for each call.

    A frozen dataclass, so two configs built from the same settings compare equal; it holds no credential."""

    region: str
    profile: str | None = None
    role_arn: str | None = None

    def __call__(self, _oauthbearer_config: str | None = None) -> tuple[str, float]:
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider as signer

        try:
            if self.role_arn:
                token, expiry_ms = signer.generate_auth_token_from_role_arn(
                    self.region, self.role_arn, ROLE_SESSION_NAME
                )
            elif self.profile:
                token, expiry_ms = signer.generate_auth_token_from_profile(self.region, self.profile)
            else:
                token, expiry_ms = signer.generate_auth_token(self.region)
        except Exception as exc:  # librdkafka only says "token not set": say why here (no credential in it)
            log.error("MSK IAM token for %s could not be signed: %s: %s", self.region, type(exc).__name__, exc)
            raise
        return token, expiry_ms / 1000


def librdkafka_config(region: str, profile: str | None = None, role_arn: str | None = None) -> dict[str, object]:
    """The librdkafka properties for MSK IAM (with ``bootstrap.servers`` and ``security.protocol``)."""
    return {"sasl.mechanism": "OAUTHBEARER", "oauth_cb": MskIamToken(region, profile, role_arn)}


def _jaas_quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def java_config(region: str, profile: str | None = None, role_arn: str | None = None) -> dict[str, str]:
    """The Java client properties for MSK IAM: ``sasl.mechanism``, ``sasl.jaas.config`` (the login module and
    its options: a profile, a role to assume at ``region``'s STS) and the client callback handler."""
    options = {"awsProfileName": profile} if profile else {}
    if role_arn:
        options |= {"awsRoleArn": role_arn, "awsRoleSessionName": ROLE_SESSION_NAME, "awsStsRegion": region}
    jaas = " ".join([LOGIN_MODULE, "required", *(f"{key}={_jaas_quoted(value)}" for key, value in options.items())])
    return {
        "sasl.mechanism": MECHANISM,
        "sasl.jaas.config": jaas + ";",
        "sasl.client.callback.handler.class": CALLBACK_HANDLER,
    }
