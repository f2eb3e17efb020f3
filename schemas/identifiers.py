"""What an identifier may look like, checked where it enters the pipeline.

Identifiers travel into URL paths (Meraki serials are built from store and lane ids), object keys,
index ids and Webex cards. Escaping at every use is still required; the strict patterns here make
sure a hostile id is a dead letter at the edge instead of a path an API key is sent to.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from schemas.errors import InvalidRecord

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""Store, lane, cashier and camera-serial parts: letters, digits, ``-`` and ``_``, at most 64."""
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
"""Transaction, receipt, customer, subject and case ids: no ``/``, ``?``, ``#``, ``%``, spaces or
controls; at most 128; the first character alphanumeric (so never ``.`` or ``..``)."""
ALERT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,511}")
"""An alert id: the characters of :data:`ID_RE`, but up to 512, since the scoring job builds it from other ids
(``blocked:<transaction>``, ``watchlist:entrance:<serial>:<oid>:<time>:<subject>``: up to about 320)."""
SERIAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
"""A Meraki camera serial (``Q2MV-ABCD-1234``) or one the project builds from store and lane names."""
CASE_ID_RE = re.compile(r"case-[0-9a-f]{12}")
"""Every case id (``schemas.records.case_id_for``: ``case-`` and twelve hex digits), in lower case."""


def check(value: object, field: str, pattern: re.Pattern[str] = ID_RE) -> str:
    """``value`` if it is a string matching ``pattern`` entirely; else :class:`InvalidRecord` ``invalid_id``.

    The reason names the field and the length, never the value itself (it may be a hostile payload
    and it is logged).
    """
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        size = len(value) if isinstance(value, str) else 0
        shown = type(value).__name__ if not isinstance(value, str) else f"{size}-character string"
        raise InvalidRecord("invalid_id", f"{field} is not a valid identifier ({shown}; allowed: {pattern.pattern})")
    return value


def shown_id(value: str, otherwise: str | None = None) -> str:
    """``value`` where it is an id (:data:`ID_RE`), to name a rejected record on a terminal or in a report; else
    ``otherwise``, or its length alone: a hostile id may hold a terminal escape, start a spreadsheet formula, or be
    a megabyte long."""
    if ID_RE.fullmatch(value):
        return value
    return otherwise or f"an id of {len(value)} characters, not shown"


TEXT_MAX = 128
"""The longest free-text label a record may carry (a line item's sku or category, a product category)."""


def check_text(value: object, field: str, max_len: int = TEXT_MAX) -> str:
    """``value`` if it is a string of 1 to ``max_len`` printable characters (spaces and punctuation allowed: a
    category is "Home & Garden", a sku may hold a slash); else :class:`InvalidRecord` ``invalid_id``, naming the field
    and the length, never the value. Stricter than this refused real shops' labels; looser let a 200 000-character
    category or a terminal escape through."""
    if not isinstance(value, str) or not 0 < len(value) <= max_len or not value.isprintable():
        size = len(value) if isinstance(value, str) else 0
        shown = type(value).__name__ if not isinstance(value, str) else f"{size}-character string"
        raise InvalidRecord(
            "invalid_id", f"{field} is not a valid label ({shown}; allowed: 1 to {max_len} printable characters)"
        )
    return value


CARD_TOKEN_MAX = 256
"""The longest card token a transaction may carry. Tokens are opaque and each processor has its own shape (``tok_``
and 16 hex digits, ``pm_`` and 24 letters, a 16 to 19 digit network token, a base64 reference), all far below this."""
EMAIL_MAX = 254
"""The longest e-mail address: RFC 5321's longest path (256 octets) less its angle brackets."""
IP_TEXT_MAX = 64
"""The longest IP address text: a full IPv6 address (45 characters) with a zone (``%eth0``) fits."""
IP_LIST_MAX = 16
"""The most elements an ``ip_address`` list may hold (the client and the proxies an X-Forwarded-For header names: a
real one holds a handful)."""
IP_LIST_TEXT_MAX = 1024
"""The longest ``ip_address`` list text: 16 IPv4 addresses with spaces take about 250 characters, long IPv6 ones
about 750."""
_IPV4_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_HIDDEN_NODE_RE = re.compile(r"unknown|_[A-Za-z0-9._-]+", re.IGNORECASE)
"""A list element naming no address: ``unknown`` (a proxy that did not know its client) or an RFC 7239 obfuscated
identifier (``_hidden``, ``_abc123``: a node that would not disclose its address)."""


def _shown(value: object) -> str:
    """What a reason says of a refused value: its length or type, never the value (it may be hostile, and is logged)."""
    return f"{len(value)}-character string" if isinstance(value, str) else type(value).__name__


def check_card_token(value: object, field: str = "card_token") -> str:
    """``value`` if it is 1 to :data:`CARD_TOKEN_MAX` printable characters, else :class:`InvalidRecord` ``invalid_id``
    naming the field and the length. No format: processors' tokens differ, and one a shop really gets must pass."""
    if isinstance(value, str) and 0 < len(value) <= CARD_TOKEN_MAX and value.isprintable():
        return value
    allowed = f"1 to {CARD_TOKEN_MAX} printable characters"
    raise InvalidRecord("invalid_id", f"{field} is not a card token ({_shown(value)}; allowed: {allowed})")


def check_email(value: object, field: str = "customer_email") -> str:
    """``value`` if it has the shape of one e-mail address (a name, ``@``, a domain; at most :data:`EMAIL_MAX` printable
    characters, no spaces), else :class:`InvalidRecord` ``invalid_id`` naming the field and the length. Only the shape:
    unlike :func:`check_address` (a case owner, who must not be a lookalike of a colleague), a shopper's address is
    an identity as the shop took it, an international one (``josé@exämple.de``) or a quoted name included."""
    if isinstance(value, str) and len(value) <= EMAIL_MAX and value.isprintable() and " " not in value:
        local, _, domain = value.rpartition("@")
        if local and domain:
            return value
    raise InvalidRecord(
        "invalid_id",
        f"{field} is not an e-mail address ({_shown(value)}; allowed: name@domain, at most {EMAIL_MAX} printable "
        "characters without spaces)",
    )


def _one_ip_address(value: str) -> bool:
    """Whether ``value`` is one IPv4 address (zero-padded octets too) or one IPv6 address (a zone, an embedded IPv4)."""
    if len(value) > IP_TEXT_MAX or not value.isprintable() or " " in value:
        return False
    if _IPV4_RE.fullmatch(value):
        return all(int(octet) <= 255 for octet in value.split("."))
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return True


def _is_port(text: str) -> bool:
    """Whether ``text`` is a TCP port, 0 to 65535 in ASCII digits."""
    return _PORT_RE.fullmatch(text) is not None and int(text) <= 65535


def _address_in(element: str) -> str | None:
    """The address one list element names, without the port or brackets a proxy may add (``1.2.3.4:5678``,
    ``[2001:db8::1]:443``, ``[2001:db8::1]``), else ``None``. A bare IPv6 address is taken whole, never split at its
    last ``:``: ``2001:db8::1`` is that address, not ``2001:db8:`` and port 1, so a port needs the brackets."""
    if element.startswith("["):
        inner, bracket, rest = element[1:].partition("]")
        port_ok = rest == "" or (rest[:1] == ":" and _is_port(rest[1:]))
        ipv6 = not _IPV4_RE.fullmatch(inner) and _one_ip_address(inner)
        return inner if bracket and port_ok and ipv6 else None
    if element.count(":") == 1:  # an IPv6 address has at least two: this is IPv4 and a port, or nothing
        host, _, port = element.partition(":")
        return host if _IPV4_RE.fullmatch(host) and _one_ip_address(host) and _is_port(port) else None
    return element if _one_ip_address(element) else None


def canonical_ip(address: str) -> str:
    """One spelling per host, so one client keys one profile however a POS or proxy wrote it: IPv4 without zero padding
    (``010.001.002.003`` is ``10.1.2.3``), IPv6 compressed in lower case (``2001:0DB8:0:0::1`` is ``2001:db8::1``), its
    zone kept, and an IPv4-mapped IPv6 address as its IPv4 address (``::ffff:192.0.2.128``, a dual-stack socket's way of
    writing an IPv4 client). ``address`` is one :func:`_one_ip_address` accepted."""
    if _IPV4_RE.fullmatch(address):
        return ".".join(str(int(octet)) for octet in address.split("."))
    parsed = ipaddress.IPv6Address(address)
    return str(parsed.ipv4_mapped) if parsed.ipv4_mapped is not None and not parsed.scope_id else str(parsed)


def check_ip_address(value: object, field: str = "ip_address") -> str:
    """The client's address in ``value``: ``value`` itself when it is one IPv4 address (zero-padded octets too, as
    some logs write them) or one IPv6 address (with a zone, an embedded IPv4), without the port or brackets a proxy
    may write around it (:func:`_address_in`); the first address of a comma-separated list, as an X-Forwarded-For
    header gives it (``203.0.113.7, 10.0.0.2``: the client, then each proxy), skipping ``unknown`` and RFC 7239
    obfuscated elements (:data:`_HIDDEN_NODE_RE`), when every one of its at most :data:`IP_LIST_MAX` elements is an
    address or one of those and the whole is at most :data:`IP_LIST_TEXT_MAX` characters. Else :class:`InvalidRecord`
    ``invalid_id`` naming the field and the length, a value naming no address at all too (nothing to key a profile
    by). Refused, such values dead-lettered the sales of every shop behind a proxy; one element that is none of these
    makes the list a forgery or garbage. The address is returned in its :func:`canonical_ip` spelling."""
    if isinstance(value, str) and len(value) <= IP_LIST_TEXT_MAX and value.count(",") < IP_LIST_MAX:
        parts = [part.strip(" ") for part in value.split(",")]
        addresses = [_address_in(part) for part in parts]
        unnamed = [part for part, address in zip(parts, addresses, strict=True) if address is None]
        if all(_HIDDEN_NODE_RE.fullmatch(part) for part in unnamed):
            client = next((address for address in addresses if address is not None), None)
            if client is None:
                reason = f"{field} names no IP address ({_shown(value)}; only unknown or obfuscated elements)"
                raise InvalidRecord("invalid_id", reason)
            return canonical_ip(client)
    raise InvalidRecord(
        "invalid_id",
        f"{field} is not an IP address ({_shown(value)}; allowed: IPv4 or IPv6, with a port or [brackets], or a "
        f"comma-separated list of at most {IP_LIST_MAX} of them, the client first)",
    )


COMMAND_ID_MAX = 512
"""The longest command id: the bot's is the Webex message id (base64, about 80 to 110 characters; the bot takes one of
up to 512 from Webex), the case page's ``dashboard-`` and 32 hex digits, the case service's ``learn:<case id>``."""


def check_command_id(value: object, field: str = "command_id") -> str:
    """``value`` if it is 1 to :data:`COMMAND_ID_MAX` printable characters without spaces, else :class:`InvalidRecord`
    ``invalid_id`` naming the length. Not :data:`ID_RE`: a Webex id is base64 and may hold ``/``, ``+`` or ``=``. The
    services key a command's audit event by it and copy it in, so a signed one of a megabyte made one of a megabyte."""
    if isinstance(value, str) and 0 < len(value) <= COMMAND_ID_MAX and value.isprintable() and " " not in value:
        return value
    allowed = f"1 to {COMMAND_ID_MAX} printable characters without spaces"
    raise InvalidRecord("invalid_id", f"{field} is not a command id ({_shown(value)}; allowed: {allowed})")


ACTOR_MAX = EMAIL_MAX
"""The longest actor of a command: an e-mail address (:data:`EMAIL_MAX`) or a Webex person id (base64, about 80
characters), the bot's actor when Webex gives no address, fits."""


def check_actor(value: object, field: str = "actor") -> str:
    """``value`` if it is 1 to :data:`ACTOR_MAX` printable characters, else :class:`InvalidRecord` ``invalid_id`` naming
    the length. No shape: an address, a Webex id and a dashboard login all pass. The services copy a command's actor
    into its audit event and the case, so a signed one of a megabyte made each of them a megabyte."""
    if isinstance(value, str) and 0 < len(value) <= ACTOR_MAX and value.isprintable():
        return value
    allowed = f"1 to {ACTOR_MAX} printable characters"
    raise InvalidRecord("invalid_id", f"{field} is not a command's actor ({_shown(value)}; allowed: {allowed})")


IMAGE_KINDS = ("checkout", "entrance", "reference")
"""What a stored image is of: a checkout or entrance snapshot, or a subject's reference photo (its folder, or the first
part of its object key, in the image store)."""
IMAGE_KEY_RE = re.compile(r"[A-Za-z0-9_:@%-][A-Za-z0-9._:@%-]{0,254}")
"""An image's file or object name: never ``.``/``..`` or hidden (first character), no ``/``, ``\\``, NUL or newline."""
IMAGE_REF_RE = re.compile(
    r"(?:file:|s3://[A-Za-z0-9][A-Za-z0-9._-]{0,254}/)(?:" + "|".join(IMAGE_KINDS) + ")/" + IMAGE_KEY_RE.pattern
)
"""An image ref as the image store writes it (``infra.clients.image_store``): ``file:<kind>/<key>`` or
``s3://<bucket>/<kind>/<key>``, a kind of :data:`IMAGE_KINDS` and a key of :data:`IMAGE_KEY_RE`. Any bucket name,
an old one with capitals or ``_`` too: which buckets a store may read is its settings' say, not a record's."""


def check_image_ref(value: object, field: str = "image ref") -> str:
    """``value`` if it has the shape of an image ref (:data:`IMAGE_REF_RE`), else :class:`InvalidRecord` ``invalid_id``
    naming the field and the length, never the value. A record copies the ref on (a case, its index, a ``LEARN``
    command): one the image store could not have written names no image to show, learn from or delete."""
    if isinstance(value, str) and IMAGE_REF_RE.fullmatch(value):
        return value
    allowed = "file:<kind>/<key> or s3://<bucket>/<kind>/<key>, the kind " + " or ".join(IMAGE_KINDS)
    raise InvalidRecord("invalid_id", f"{field} is not an image ref ({_shown(value)}; allowed: {allowed})")


def check_name(value: object, field: str) -> str:
    """A store/lane/cashier name (see :data:`NAME_RE`)."""
    return check(value, field, NAME_RE)


def check_case_id(value: object, field: str = "case id") -> str:
    """A case id (see :data:`CASE_ID_RE`): one of any other shape names no case, so nothing need be looked up."""
    return check(value, field, CASE_ID_RE)


def check_serial(value: object, field: str = "camera serial") -> str:
    """A camera serial (see :data:`SERIAL_RE`)."""
    return check(value, field, SERIAL_RE)


_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_{|}~-]+)*")
"""An address's part before ``@``, RFC 5322's dot-atom in ASCII (no backtick: it would end a code span)."""
_ASCII_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
LATIN_LOOKALIKES = frozenset(
    "аеокорсухіјѕԁԛԝһӏԍъьАВЕКМНОРСТХІЈЅԌԚԜҮ"  # Cyrillic
    "αικνοπρτυχΑΒΕΖΗΙΚΜΝΟΡΤΥΧ"  # Greek
    "օսոհզցԳՕՍ"  # Armenian
)
"""Letters of other scripts that read as Latin ones: a domain label made of them alone (Cyrillic ``аррӏе``) is a
lookalike of a Latin one."""
_SCRIPT_GROUPS = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "KATAKANA-HIRAGANA": "CJK", "HANGUL": "CJK"}
"""Scripts written together (Japanese mixes kanji and kana, Korean hangul and hanja): one script here."""


def _script(char: str) -> str:
    """The script of a letter, from its Unicode name (``CYRILLIC SMALL LETTER A`` -> ``CYRILLIC``)."""
    first = unicodedata.name(char, "?").split(" ")[0]
    return _SCRIPT_GROUPS.get(first, first)


def _label_problem(label: str) -> str | None:
    """Why a domain label is no real one, or a lookalike of another; None when it is fine."""
    if label.isascii():
        return None if _ASCII_LABEL.fullmatch(label) else "its domain is not a domain name"
    if unicodedata.normalize("NFKC", label) != label:
        return "its domain holds characters that stand for others (full-width, styled or combined letters)"
    if any(not (unicodedata.category(c)[0] in "LM" or c in "-0123456789") for c in label):
        return "its domain holds characters no domain name has"
    scripts = {_script(c) for c in label if unicodedata.category(c).startswith("L")}
    if len(scripts) > 1:
        return f"its domain mixes {' and '.join(sorted(s.title() for s in scripts))} letters (a lookalike?)"
    if "LATIN" not in scripts and all(c in LATIN_LOOKALIKES or not c.isalpha() for c in label):
        return "its domain is written in letters that look Latin but are not (a lookalike?)"
    try:
        label.encode("idna")
    except UnicodeError:
        return "its domain is not a domain name"
    return None


def check_address(person: str) -> str:
    """``person`` when it is one real e-mail address, else :class:`InvalidRecord` ``bad_command`` with the reason
    (the case service's ``assign``, checked by the bot and the case page too before they publish one).

    The owner is who the case page and the audit say has the case: a lookalike of a colleague's address
    (Cyrillic ``а`` for Latin ``a``, a zero-width joiner, a right-to-left override) would read as theirs. So the
    part before ``@`` is plain ASCII; the domain is ASCII, or an international name that IDNA encodes, whose
    labels each keep to one script and are not made of Latin lookalikes alone."""
    person = (person or "").strip()
    if not person or any(c.isspace() for c in person):
        raise InvalidRecord("bad_command", "assign needs one person (an e-mail address)")
    problem: str | None = None
    local, at, domain = person.rpartition("@")
    if any(not c.isprintable() for c in person):
        problem = "it holds invisible or control characters"
    elif len(person) > 254 or not at or not local or not domain or len(local) > 64:
        problem = "it is not an e-mail address (name@domain)"
    elif not local.isascii():
        problem = "the part before @ must be plain ASCII (a lookalike letter?)"
    elif not _LOCAL_PART.fullmatch(local):
        problem = "the part before @ is not an e-mail name"
    else:
        labels = domain.removesuffix(".").split(".")
        problems = [_label_problem(label) if label else "its domain is not a domain name" for label in labels]
        problem = next((p for p in problems if p), None)
    if problem:
        raise InvalidRecord("bad_command", f"assign needs one person's e-mail address, and {problem}")
    return person
