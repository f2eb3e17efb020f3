"""Personal dashboard logins (scrypt hashes in CG_DASHBOARD__USERS) and signed case-image links: each
analyst logs in as themselves, and Webex, which has no login, opens exactly one image of one case until
the link expires."""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient
from typer.testing import CliRunner

import sinks.dashboard.__main__ as dashboard_main
from infra.settings import AlertSettings, DashboardSettings, Settings
from infra.signed_links import image_link, verify_image_link
from sinks.alerts.message import case_card
from sinks.dashboard import login
from sinks.dashboard.app import Dashboard, DashboardConfigError, create_app
from sinks.dashboard.login import LoginBackend, LoginConfigError, hash_password, verify_password

CASE = "case-0123456789ab"
KEY = "image-link-key-for-tests"
NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class FakeSearch:
    """Every search finds one case that has both images."""

    def search(self, index: str, body: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
        source = {"case_id": CASE, "snapshot_ref": "checkout/tx-1.jpg", "reference_image_ref": "enrol/s.jpg"}
        return {"hits": {"total": {"value": 1}, "hits": [{"_source": source}]}, "aggregations": {}}


class Images:
    def get(self, ref: str) -> bytes:
        import io

        from PIL import Image

        out = io.BytesIO()
        Image.new("RGB", (64, 48), (20, 30, 200)).save(out, format="JPEG")
        return out.getvalue()


ANA = hash_password("ana's long password", salt=b"0123456789abcdef")
BEN = hash_password("ben's long password", salt=b"fedcba9876543210")


def served(clock: Clock | None = None, **dashboard: Any) -> TestClient:
    settings = Settings().model_copy(
        update={
            "dashboard": DashboardSettings(host="0.0.0.0", **dashboard),
            "alerts": AlertSettings(image_link_key=SecretStr(KEY)),
        }
    )
    board = Dashboard(settings, client=FakeSearch(), images=Images(), clock=clock or time.time)  # type: ignore[arg-type]
    app = create_app(settings, board)
    if clock is not None:
        for middleware in app.user_middleware:
            if "backend" in middleware.kwargs:  # the login's, not the security headers'
                middleware.kwargs["backend"].clock = clock
    return TestClient(app, raise_server_exceptions=False)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


USERS = {"users": {"ana@example.com": SecretStr(ANA), "ben@example.com": SecretStr(BEN)}}


def test_a_password_hash_verifies_its_password_only() -> None:
    assert verify_password("ana's long password", ANA)
    assert not verify_password("ana's long passwor", ANA)
    assert ANA.startswith("scrypt$16384$8$1$") and "ana" not in ANA
    assert hash_password("same") != hash_password("same")  # a new salt each time


@pytest.mark.parametrize("broken", ["", "plain-password", "scrypt$16$8$1$c2FsdA==$aGFzaA==", "scrypt$x$8$1$a$b"])
def test_a_users_entry_that_is_not_a_hash_stops_the_dashboard_at_start(broken: str) -> None:
    with pytest.raises(LoginConfigError):
        LoginBackend(DashboardSettings(users={"ana@example.com": SecretStr(broken)}))
    with pytest.raises(DashboardConfigError, match="hash-password"):
        served(users={"ana@example.com": SecretStr(broken)})


def test_each_person_logs_in_with_their_own_password() -> None:
    client = served(**USERS)
    assert client.get("/api/config").status_code == 401
    assert client.get("/api/config", headers=basic("ana@example.com", "ana's long password")).status_code == 200
    assert client.get("/api/config", headers=basic("ben@example.com", "ben's long password")).status_code == 200
    assert client.get("/api/config", headers=basic("ana@example.com", "ben's long password")).status_code == 401
    assert client.get("/api/config", headers=basic("eve@example.com", "ana's long password")).status_code == 401


def test_a_checked_login_is_remembered_for_a_while_and_then_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    backend = LoginBackend(DashboardSettings(**USERS), clock=clock)
    calls: list[str] = []
    real = login.verify_password
    monkeypatch.setattr(login, "verify_password", lambda p, e: calls.append(p) or real(p, e))
    assert backend._person("ana@example.com", "ana's long password")
    assert backend._person("ana@example.com", "ana's long password")
    assert len(calls) == 1  # the second request paid no scrypt
    assert not backend._person("ana@example.com", "wrong password")  # a wrong one is never remembered
    clock.now += login.VERIFIED_FOR_S + 1
    assert backend._person("ana@example.com", "ana's long password")
    assert len(calls) == 3


def test_the_single_login_still_works_beside_the_personal_ones() -> None:
    client = served(username="manager", password=SecretStr("s3cret pass"), **USERS)
    assert client.get("/api/config", headers=basic("manager", "s3cret pass")).status_code == 200
    assert client.get("/api/config", headers=basic("ana@example.com", "ana's long password")).status_code == 200


def test_a_signed_link_opens_its_image_without_a_login_until_it_expires() -> None:
    clock = Clock()
    client = served(clock, **USERS)
    link = image_link(f"http://dash/cases/{CASE}", CASE, "live", KEY, NOW, 600)
    path = link.removeprefix("http://dash")
    answer = client.get(path)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    clock.now = NOW + 601
    assert client.get(path).status_code == 401


def test_an_image_opened_by_its_signed_link_stays_embeddable_by_mail_clients_and_webex() -> None:
    """A signed link is shown from another origin (a webmail page, Webex): no Cross-Origin-Resource-Policy, even
    when the analyst's browser sends its login along. The same image under the login alone is same-origin."""
    clock = Clock()
    client = served(clock, **USERS)
    path = image_link(f"/cases/{CASE}", CASE, "live", KEY, NOW, 600)
    ana = basic("ana@example.com", "ana's long password")
    for headers in ({}, ana):
        answer = client.get(path, headers=headers)
        assert answer.status_code == 200 and "cross-origin-resource-policy" not in answer.headers
        assert answer.headers["cache-control"] == "no-store"
    for bad in (f"/cases/{CASE}/images/live", f"/cases/{CASE}/images/live?exp={int(NOW) + 600}&sig=forged"):
        assert client.get(bad, headers=ana).headers["cross-origin-resource-policy"] == "same-origin", bad
    clock.now = NOW + 601  # expired: only the login opens it, as a same-origin image
    assert client.get(path, headers=ana).headers["cross-origin-resource-policy"] == "same-origin"


def test_a_signed_link_opens_nothing_else() -> None:
    client = served(Clock(), **USERS)
    query = image_link(f"/cases/{CASE}", CASE, "live", KEY, NOW, 600).partition("?")[2]
    assert client.get(f"/cases/{CASE}/images/reference?{query}").status_code == 401  # the other image
    assert client.get(f"/cases/case-ffffffffffff/images/live?{query}").status_code == 401  # another case
    for path in (f"/cases/{CASE}", f"/api/cases/{CASE}", "/api/cases", "/"):
        assert client.get(f"{path}?{query}").status_code == 401
    verdict = client.post(f"/api/cases/{CASE}/verdict?{query}", json={"verb": "confirm"})
    assert verdict.status_code == 401
    forged = image_link(f"/cases/{CASE}", CASE, "live", "another key", NOW, 600)
    assert client.get(forged).status_code == 401


def test_a_link_signature_covers_case_image_and_expiry() -> None:
    sig_query = image_link("/c", CASE, "live", KEY, NOW, 60).partition("?")[2]
    params = dict(part.split("=", 1) for part in sig_query.split("&"))
    assert verify_image_link(KEY, CASE, "live", params["exp"], params["sig"], NOW)
    assert not verify_image_link(KEY, CASE, "live", str(int(params["exp"]) + 1), params["sig"], NOW)
    assert not verify_image_link(KEY, CASE, "reference", params["exp"], params["sig"], NOW)
    assert not verify_image_link(None, CASE, "live", params["exp"], params["sig"], NOW)
    assert not verify_image_link(KEY, CASE, "live", "-1", params["sig"], NOW)
    assert image_link("/c", CASE, "live", None, NOW, 60) == "/c/images/live"  # no key: a plain link


def test_the_webex_card_carries_signed_image_links_when_a_key_is_set() -> None:
    alert = {
        "alert_id": "watchlist:tx-1",
        "kind": "WATCHLIST_MATCH",
        "store_id": "S1",
        "snapshot_ref": "checkout/tx-1.jpg",
        "subject_id": "subj-a",
        "event_time": int(NOW * 1000),
    }
    settings = AlertSettings(image_link_key=SecretStr(KEY), image_link_ttl_s=900)
    card = json.dumps(case_card(alert, settings, now_s=NOW, has_reference=True))
    assert f"exp={int(NOW) + 900}" in card and card.count("sig=") == 2
    assert "sig=" not in json.dumps(case_card(alert, AlertSettings(), now_s=NOW, has_reference=True))


def test_hash_password_prints_the_users_entry() -> None:
    result = CliRunner().invoke(
        dashboard_main.cli, ["hash-password", "ana@example.com"], input="a long password\na long password\n"
    )
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output.strip().splitlines()[-1])
    assert verify_password("a long password", entry["ana@example.com"])
    short = CliRunner().invoke(dashboard_main.cli, ["hash-password", "x"], input="short\nshort\n")
    assert short.exit_code == 2


def test_a_login_name_no_verdict_could_be_recorded_under_is_refused_at_login_saying_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A verdict's actor is the login name, 1 to 254 printable characters (``check_actor``): a longer login was let
    in, and every verdict it gave was then refused. It is refused at login now (before any scrypt), and
    ``hash-password`` will not make its entry; a login of exactly 254 characters still works. (Configured, such a
    login stops the start: the next test.)"""
    from schemas.identifiers import ACTOR_MAX

    longest, over = "a" * (ACTOR_MAX - len("@example.com")) + "@example.com", "a" * ACTOR_MAX + "@example.com"
    client = served(users={longest: SecretStr(ANA)})
    assert client.get("/api/config", headers=basic(longest, "ana's long password")).status_code == 200
    checks: list[str] = []
    monkeypatch.setattr(login, "verify_password", lambda p, e: checks.append(p) or True)
    refused = client.get("/api/config", headers=basic(over, "ana's long password"))
    assert refused.status_code == 401 and not checks
    assert f"1 to {ACTOR_MAX} printable characters" in refused.text and "actor" in refused.text
    assert over not in refused.text, "the name itself is never echoed"
    made = CliRunner().invoke(dashboard_main.cli, ["hash-password", over], input="a long password\na long password\n")
    assert made.exit_code == 2 and f"1 to {ACTOR_MAX} printable characters" in made.output


def test_a_configured_login_name_no_verdict_could_be_recorded_under_stops_the_dashboard_at_start() -> None:
    """A ``CG_DASHBOARD__USERS`` login over 254 characters (or with a control character) was refused only at each try
    to log in: the dashboard started with a login nobody could use. It stops the start now (``dashboard not started:``,
    exit 2), naming the setting, the entry's place and the name's length, never the name; so does such a
    ``CG_DASHBOARD__USERNAME``. A login of exactly 254 characters, or any printable one, still starts."""
    from schemas.identifiers import ACTOR_MAX

    longest, over = "a" * (ACTOR_MAX - len("@example.com")) + "@example.com", "a" * ACTOR_MAX + "@example.com"
    for bad in (over, "ana\t@example.com", ""):
        with pytest.raises(DashboardConfigError) as refused:
            served(users={"ben@example.com": SecretStr(BEN), bad: SecretStr(ANA)})
        why = str(refused.value)
        assert "CG_DASHBOARD__USERS entry 2 of 2" in why and f"({len(bad)}-character string;" in why, why
        assert f"1 to {ACTOR_MAX} printable characters" in why and (not bad or bad not in why), why
    with pytest.raises(DashboardConfigError, match="CG_DASHBOARD__USERNAME") as single:
        served(username=over, password=SecretStr("a long password"))
    assert over not in str(single.value)
    served(users={longest: SecretStr(ANA), "José Müller & Co": SecretStr(BEN)})
    served(username=longest, password=SecretStr("a long password"))


def test_a_configured_login_name_with_a_colon_stops_the_dashboard_at_start() -> None:
    """HTTP Basic ends the login name at its first colon, so ``ana:shop@example.com`` could never log in: the
    dashboard started with it all the same."""
    with pytest.raises(DashboardConfigError, match="CG_DASHBOARD__USERS entry 2 of 2 holds a colon"):
        served(users={"ben@example.com": SecretStr(BEN), "ana:shop@example.com": SecretStr(ANA)})
    with pytest.raises(DashboardConfigError, match="CG_DASHBOARD__USERNAME holds a colon"):
        served(username="ana:shop", password=SecretStr("a long password"))


def test_personal_logins_reach_a_child_process_intact(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings().model_copy(update={"dashboard": DashboardSettings(**USERS)})
    env = settings.to_env()
    assert json.loads(env["CG_DASHBOARD__USERS"]) == {"ana@example.com": ANA, "ben@example.com": BEN}
    monkeypatch.setenv("CG_DASHBOARD__USERS", env["CG_DASHBOARD__USERS"])
    again = Settings().dashboard.users
    assert {k: v.get_secret_value() for k, v in again.items()} == {"ana@example.com": ANA, "ben@example.com": BEN}


def test_repeated_wrong_passwords_lock_the_login_for_a_while_without_checking() -> None:
    clock = Clock()
    backend = LoginBackend(DashboardSettings(**USERS), clock=clock)
    for _ in range(login.FAILURES_ALLOWED):
        assert not backend._person("ana@example.com", "guess")
    assert not backend._person("ana@example.com", "ana's long password"), "locked: not even checked"
    assert backend._person("ben@example.com", "ben's long password"), "other logins unaffected"
    clock.now += login.FAILURE_WINDOW_S + 1
    assert backend._person("ana@example.com", "ana's long password")


def test_wrong_passwords_sent_side_by_side_are_checked_no_more_often_than_the_lockout_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A guesser does not wait for one answer before sending the next: many tries at once must not all pass the
    lockout before the first of them is counted."""
    backend = LoginBackend(DashboardSettings(**USERS), clock=Clock())
    checked: list[str] = []

    def slow_check(password: str, encoded: str) -> bool:
        checked.append(password)
        time.sleep(0.05)  # scrypt takes about this long
        return False

    monkeypatch.setattr(login, "verify_password", slow_check)
    tries = 4 * login.FAILURES_ALLOWED
    start = threading.Barrier(tries)

    def guess(n: int) -> bool:
        start.wait()
        return backend._person("ana@example.com", f"guess {n}")

    with ThreadPoolExecutor(tries) as pool:
        assert not any(pool.map(guess, range(tries)))
    assert len(checked) == login.FAILURES_ALLOWED


def test_guessing_under_many_made_up_names_does_not_unlock_a_locked_login(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = LoginBackend(DashboardSettings(**USERS), clock=Clock())
    monkeypatch.setattr(login, "verify_password", lambda p, e: False)  # wrong, and fast
    for _ in range(login.FAILURES_ALLOWED):
        assert not backend._person("ana@example.com", "guess")
    for n in range(login.MAX_VERIFIED + 1):
        backend._person(f"nobody-{n}@example.com", "guess")
    checked: list[str] = []
    monkeypatch.setattr(login, "verify_password", lambda p, e: checked.append(p) or True)
    assert not backend._person("ana@example.com", "another guess") and checked == [], "still locked: not checked"


SINGLE = {"username": "manager", "password": SecretStr("s3cret pass")}


@pytest.mark.parametrize("logins", [SINGLE, {**SINGLE, **USERS}], ids=["alone", "beside personal logins"])
def test_repeated_wrong_passwords_lock_the_single_login_too(logins: dict[str, Any]) -> None:
    clock = Clock()
    backend = LoginBackend(DashboardSettings(**logins), clock=clock)
    for _ in range(login.FAILURES_ALLOWED):
        assert not backend._person("manager", "guess")
    assert not backend._person("manager", "s3cret pass"), "locked: the right password is refused too"
    clock.now += login.FAILURE_WINDOW_S + 1
    assert backend._person("manager", "s3cret pass")


def test_a_browser_logged_in_to_the_single_login_keeps_polling_while_guesses_lock_it() -> None:
    backend = LoginBackend(DashboardSettings(**SINGLE), clock=Clock())
    assert backend._person("manager", "s3cret pass")
    for _ in range(login.FAILURES_ALLOWED + 1):
        assert not backend._person("manager", "guess")
    assert backend._person("manager", "s3cret pass"), "checked a moment ago: remembered, as a personal login is"


def test_guessing_under_many_made_up_names_does_not_unlock_the_single_login() -> None:
    backend = LoginBackend(DashboardSettings(**SINGLE, **USERS), clock=Clock())
    for _ in range(login.FAILURES_ALLOWED):
        assert not backend._person("manager", "guess")
    for n in range(login.MAX_VERIFIED + 1):
        backend._failures[f"nobody-{n}@example.com"] = (1, NOW)
    backend._person("nobody-else@example.com", "guess")  # the record is full: room is made
    assert not backend._person("manager", "s3cret pass"), "still locked"


def test_an_unknown_login_costs_a_check_too_and_never_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = LoginBackend(DashboardSettings(**USERS), clock=Clock())
    checked: list[str] = []
    real = login.verify_password
    monkeypatch.setattr(login, "verify_password", lambda p, e: checked.append(e) or real(p, e))
    assert not backend._person("eve@example.com", "ana's long password")
    assert checked == [backend._dummy], "the same scrypt work as for a known login"


def test_a_hash_asking_for_more_memory_than_a_check_may_take_is_refused_at_start() -> None:
    greedy = "scrypt$1048576$8$1$c2FsdHNhbHRzYWx0$" + base64.b64encode(b"x" * 32).decode()
    with pytest.raises(LoginConfigError):
        LoginBackend(DashboardSettings(users={"ana@example.com": SecretStr(greedy)}))


def test_a_malformed_expiry_is_no_link() -> None:
    assert not verify_image_link(KEY, CASE, "live", "\u00b2", "sig", NOW)
    assert not verify_image_link(KEY, CASE, "live", "1" * 13, "sig", NOW)
