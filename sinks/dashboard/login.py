"""Who may use the dashboard: personal logins, a read-only token, and signed image links.

- **Personal logins** (HTTP Basic): ``CG_DASHBOARD__USERS``, a JSON map of person -> scrypt hash made by
  ``python -m sinks.dashboard hash-password`` (no password is stored or configured in clear), plus the
  older single ``CG_DASHBOARD__USERNAME``/``PASSWORD``. A verdict records the person, so each analyst has
  their own login; a password checked once is remembered (its SHA-256, for ``VERIFIED_FOR_S``) so the
  page's polling does not pay scrypt on every request. Wrong passwords lock any of these logins alike
  (``FAILURES_ALLOWED``), the single one included.
- **Token** (``Authorization: Bearer``): scripts and monitoring; reads only (no verdicts).
- **Signed image links**: Webex fetches a card's images without any login, so ``GET /cases/<id>/images/
  <which>?exp=..&sig=..`` opens with a valid, unexpired signature (:mod:`infra.signed_links`) and nothing
  else does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping

from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse, Response

from infra.settings import AlertSettings, DashboardSettings
from infra.signed_links import verify_image_link
from schemas.errors import CheckoutGuardError, InvalidRecord
from schemas.identifiers import check_actor

REALM = "Checkout Guard"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
"""scrypt cost (OWASP's minimum for scrypt): about 50 ms and 16 MiB per check."""
HASH_PREFIX = "scrypt"
VERIFIED_FOR_S = 300.0
"""How long a checked login is taken without running scrypt again."""
MAX_VERIFIED = 1024
SCRYPT_MAXMEM = 2**27
"""Most memory one check may take (128 MiB); a hash asking for more is refused at start."""
CONCURRENT_CHECKS = 2
"""scrypt checks at once (each ~50 ms of a core): the rest wait, off the event loop."""
FAILURES_ALLOWED, FAILURE_WINDOW_S = 5, 60.0
"""Wrong passwords for one login within the window before its next tries are refused unchecked until the window
ends (guessing, or a flood meant to keep the cores busy with scrypt)."""
IMAGE_LINK_USER = "image-link"
"""The user of a request opened by a signed image link (never a person: it cannot decide a case)."""
TOKEN_USER = "token"
_IMAGE_PATH = re.compile(r"^/cases/([^/]+)/images/([^/]+)$")


class LoginConfigError(CheckoutGuardError, ValueError):
    """A login setting that cannot work (a malformed password hash, a login name no verdict could be recorded under)."""


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``scrypt$<n>$<r>$<p>$<salt>$<hash>`` (base64) of ``password``: what ``CG_DASHBOARD__USERS`` holds."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = base64.b64encode
    return f"{HASH_PREFIX}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    try:
        if len(parts) != 6 or parts[0] != HASH_PREFIX:
            raise ValueError
        n, r, p = (int(x) for x in parts[1:4])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
        if n < 2**10 or n & (n - 1) or not (1 <= r <= 64 and 1 <= p <= 16) or len(digest) < 16 or not salt:
            raise ValueError
        if 129 * n * r * p > SCRYPT_MAXMEM:  # what hashlib.scrypt would refuse at every login
            raise ValueError
    except (ValueError, binascii.Error):
        raise LoginConfigError(
            "a CG_DASHBOARD__USERS entry is not a password hash from `python -m sinks.dashboard hash-password`"
        ) from None
    return n, r, p, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (:func:`hash_password`'s format); constant-time."""
    n, r, p, salt, digest = _parse_hash(encoded)
    candidate = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(digest), maxmem=SCRYPT_MAXMEM)
    return secrets.compare_digest(candidate, digest)


def _digest(value: str) -> bytes:
    """Equal-length values to compare, so the comparison reveals neither content nor length."""
    return hashlib.sha256(value.encode()).digest()


def opened_by_link(key: str | None, case_id: str, which: str, query: Mapping[str, str], now: float) -> bool:
    """Whether ``query`` holds a valid, unexpired signed link to image ``which`` of ``case_id``."""
    return verify_image_link(key, case_id, which, query.get("exp"), query.get("sig"), now)


def _secret(value) -> str | None:
    """A ``SecretStr``'s value; empty counts as unset."""
    return (value.get_secret_value() if value is not None else None) or None


def unrecordable(user: str, field: str = "the login name") -> str | None:
    """Why no verdict could be recorded under the login name ``user`` (``field`` says which), None when one can: the
    login is a verdict's ``actor`` (:func:`schemas.identifiers.check_actor`, 1 to 254 printable characters). Before,
    such a login was let in and every verdict it gave was refused. Told from the name's length alone, never repeating
    it, so the 401 that says it tells nothing of which logins exist, and a setting's error shows no control
    characters nor a huge value."""
    try:
        check_actor(user, field)
    except InvalidRecord as exc:
        return f"{exc.reason}: a verdict records the login name as its actor"
    return None


def _check_login_names(users: Mapping[str, object], username: str | None) -> None:
    """:class:`LoginConfigError` for a configured login name no verdict could be recorded under (:func:`unrecordable`),
    naming the setting and, for ``CG_DASHBOARD__USERS``, the entry's place: before, the dashboard started, and that
    login was refused at every try (or, before that, let in with every verdict refused)."""
    for place, name in enumerate(users, 1):
        if why := unrecordable(name, f"the login name of CG_DASHBOARD__USERS entry {place} of {len(users)}"):
            raise LoginConfigError(why)
        if ":" in name:  # HTTP Basic splits user and password at the first colon: this login could never log in
            raise LoginConfigError(
                f"the login name of CG_DASHBOARD__USERS entry {place} of {len(users)} holds a colon: HTTP Basic "
                "ends the name at the first colon, so it could never log in"
            )
    if username is not None and (why := unrecordable(username, "CG_DASHBOARD__USERNAME")):
        raise LoginConfigError(why)
    if username is not None and ":" in username:
        raise LoginConfigError("CG_DASHBOARD__USERNAME holds a colon: HTTP Basic ends the name at the first colon")


class LoginBackend(AuthenticationBackend):
    """HTTP Basic against the personal logins, ``Bearer`` against the token, a signed link for one image;
    constant-time comparisons. Anything else is an :class:`AuthenticationError` (a 401), whatever its path."""

    def __init__(
        self, dashboard: DashboardSettings, alerts: AlertSettings | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.users: dict[str, str] = {name: _secret(h) or "" for name, h in dashboard.users.items()}
        for encoded in self.users.values():
            _parse_hash(encoded)  # a broken entry fails at start, not at someone's login
        password, token = _secret(dashboard.password), _secret(dashboard.token)
        _check_login_names(dashboard.users, dashboard.username)
        self.single = (_digest(dashboard.username), _digest(password)) if dashboard.username and password else None
        self.known: set[str] = set(self.users) | ({dashboard.username} if dashboard.username and password else set())
        """Every login that exists: a full record of wrong tries never drops one of their locks."""
        self.token = _digest(token) if token else None
        self.image_key = _secret(alerts.image_link_key) if alerts else None
        self.clock = clock
        self._verified: dict[bytes, float] = {}
        self._failures: dict[str, tuple[int, float]] = {}
        """Login -> (wrong passwords, when the window started)."""
        self._checks = threading.BoundedSemaphore(CONCURRENT_CHECKS)
        self._tries = threading.Lock()
        """Guards ``_failures``: a try is counted before its check."""
        self._dummy = hash_password(secrets.token_urlsafe(16))
        """Checked for an unknown login, so the answer takes as long as for a known one (no user enumeration)."""

    @property
    def enabled(self) -> bool:
        return bool(self.users) or self.single is not None or self.token is not None

    def _person(self, user: str, password: str) -> bool:
        """Whether ``user``/``password`` is a personal login or the single one. Both go through the same lockout
        (:meth:`_count_try`) and the same memory of a checked login, so a browser logged in keeps polling while
        someone else's guesses lock its login."""
        single = self.single is not None and secrets.compare_digest(_digest(user), self.single[0])
        if not single and not self.users:
            return False
        encoded = self.users.get(user)
        now = self.clock()
        remembered = hashlib.sha256(f"{user}\0{password}\0{encoded}\0{single}".encode()).digest()
        if self._verified.get(remembered, 0.0) > now:
            return True
        if not self._count_try(user, now):
            return False
        if not self._matches(single, password, encoded):
            return False
        with self._tries:
            self._failures.pop(user, None)
        if len(self._verified) >= MAX_VERIFIED:
            self._verified = {k: t for k, t in self._verified.items() if t > now}
            if len(self._verified) >= MAX_VERIFIED:
                self._verified.clear()
        self._verified[remembered] = now + VERIFIED_FOR_S
        return True

    def _matches(self, single: bool, password: str, encoded: str | None) -> bool:
        """The password check itself, once the try is counted: the single login's, then the personal hash (the
        dummy one for an unknown login, so it costs the same)."""
        if single and self.single is not None and secrets.compare_digest(_digest(password), self.single[1]):
            return True
        if not self.users:
            return False
        with self._checks:
            return verify_password(password, encoded or self._dummy) and encoded is not None

    def _count_try(self, user: str, now: float) -> bool:
        """Whether ``user`` may have a password checked now; if so the try counts as a wrong password until it
        succeeds. Counted before the check, under a lock: tries sent side by side would otherwise all pass the
        lockout while the first of them was still being checked."""
        with self._tries:
            failures, since = self._failures.get(user, (0, now))
            if now - since > FAILURE_WINDOW_S:
                failures, since = 0, now
            if failures >= FAILURES_ALLOWED:
                return False
            if user not in self._failures and len(self._failures) >= MAX_VERIFIED:
                self._forget_tries(now)
            self._failures[user] = (failures + 1, since)
            return True

    def _forget_tries(self, now: float) -> None:
        """Make room in the full ``_failures``: windows that ended, then made-up names, never a known login's
        lock (clearing them all let a guesser unlock a login by trying a thousand names)."""
        self._failures = {u: t for u, t in self._failures.items() if now - t[1] <= FAILURE_WINDOW_S}
        if len(self._failures) >= MAX_VERIFIED:
            self._failures = {u: t for u, t in self._failures.items() if u in self.known}

    def _image_link(self, conn: HTTPConnection) -> bool:
        match = _IMAGE_PATH.match(conn.url.path)
        if match is None or not self.image_key:
            return False
        return opened_by_link(self.image_key, match.group(1), match.group(2), conn.query_params, self.clock())

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser]:
        scheme, _, value = conn.headers.get("authorization", "").partition(" ")
        scheme, value = scheme.lower(), value.strip()
        refused = "login required"
        if scheme == "bearer" and self.token is not None and secrets.compare_digest(_digest(value), self.token):
            return AuthCredentials(["authenticated"]), SimpleUser(TOKEN_USER)
        if scheme == "basic" and (self.single is not None or self.users):
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise AuthenticationError("malformed Basic credentials") from None
            personal = sep and user not in (TOKEN_USER, IMAGE_LINK_USER)
            if personal and (why := unrecordable(user)):  # refused before any check: no scrypt, no lockout try
                personal, refused = False, why
            if personal and await run_in_threadpool(self._person, user, password):  # scrypt off the event loop
                return AuthCredentials(["authenticated"]), SimpleUser(user)
        if self._image_link(conn):
            return AuthCredentials(["case-image"]), SimpleUser(IMAGE_LINK_USER)
        raise AuthenticationError(refused)

    def challenge(self, _conn: HTTPConnection, exc: AuthenticationError) -> Response:
        """The 401: one ``WWW-Authenticate`` challenge per accepted scheme (Basic first, for browsers)."""
        response = PlainTextResponse(f"{exc}\n", status_code=401, headers={"Cache-Control": "no-store"})
        if self.single is not None or self.users:
            response.headers.append("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')
        if self.token is not None:
            response.headers.append("WWW-Authenticate", f'Bearer realm="{REALM}"')
        return response
