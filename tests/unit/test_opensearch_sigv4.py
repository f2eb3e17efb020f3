"""SigV4 for Amazon OpenSearch Service: against a local HTTP server that checks each request's AWS signature
the way the service does (canonical request, string to sign, HMAC chain with the caller's secret), the
client's requests verify, and a client with other credentials is refused."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from opensearchpy.exceptions import AuthorizationException

from infra.clients.opensearch import OpenSearchConfigError, make_client, sigv4_auth
from infra.settings import OpenSearchSettings

REGION, SERVICE = "eu-west-1", "es"
KEY_ID, SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


def signature_ok(method: str, url: str, headers: dict[str, str], body: bytes) -> bool:
    """Recompute the request's SigV4 signature with the known secret, as the service would."""
    auth = headers.get("authorization", "")
    if not auth.startswith("AWS4-HMAC-SHA256 "):
        return False
    fields = dict(part.strip().split("=", 1) for part in auth[len("AWS4-HMAC-SHA256 ") :].split(","))
    key_id, date, region, service, _ = fields["Credential"].split("/")
    if (key_id, region, service) != (KEY_ID, REGION, SERVICE):
        return False
    signed = fields["SignedHeaders"].split(";")
    request = AWSRequest(method=method, url=url, data=body, headers={h: headers[h] for h in signed})
    request.context["timestamp"] = headers["x-amz-date"]
    signer = SigV4Auth(Credentials(KEY_ID, SECRET), service, region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    return expected == fields["Signature"] and date == headers["x-amz-date"][:8]


class Domain(BaseHTTPRequestHandler):
    seen: list[str] = []

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        url = f"http://{headers['host']}{self.path}"
        ok = signature_ok(self.command, url, headers, body)
        Domain.seen.append(f"{self.command} {self.path} {'signed' if ok else 'refused'}")
        answer = (
            {"version": {"number": "2.19.0"}}
            if ok
            else {"message": "The request signature we calculated does not match"}
        )
        data = json.dumps(answer).encode()
        self.send_response(200 if ok else 403)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def domain() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Domain)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Domain.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def settings(url: str) -> OpenSearchSettings:
    return OpenSearchSettings(url=url, aws_sigv4=True, aws_region=REGION)


def test_every_request_is_signed_with_the_default_chain_credentials(domain: str, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = make_client(settings(domain))
    try:
        assert client.info()["version"]["number"] == "2.19.0"
        client.search(index="checkout-guard-cases", body={"query": {"term": {"state": "open"}}})
    finally:
        client.close()
    assert Domain.seen == ["GET / signed", "POST /checkout-guard-cases/_search signed"]


def test_other_credentials_are_refused(domain: str, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    client = make_client(settings(domain))
    try:
        with pytest.raises(AuthorizationException):
            client.info()
    finally:
        client.close()
    assert Domain.seen == ["GET / refused"]


def test_sigv4_without_a_region_or_credentials_fails_with_the_setting_named() -> None:
    with pytest.raises(OpenSearchConfigError, match="AWS_REGION"):
        sigv4_auth(OpenSearchSettings(aws_sigv4=True))
    empty = boto3.Session(aws_access_key_id=None, aws_secret_access_key=None, profile_name=None)
    empty._session.get_component("credential_provider").providers = []
    with pytest.raises(OpenSearchConfigError, match="no AWS credentials"):
        sigv4_auth(OpenSearchSettings(aws_sigv4=True, aws_region=REGION), session=empty)
