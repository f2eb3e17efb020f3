"""Seeded, realistic point-of-sale traffic: the pure logic, no Kafka.

Why a module of its own: the live demo producer, synthetic training history for the fraud model and
the benchmarks all need the *same* traffic, so it must import without a broker, be deterministic for
a seed and be fast (tens of thousands of transactions a second in pure Python, see ``bench`` in
``producers.pos``).

The world: ``stores`` stores (``store-001`` ...) with lanes (``lane-01`` ...) and a few cashiers each;
a customer population with a stable identity (card, e-mail, billing address, device) and a typical
basket size; a fixed product catalogue (the same for every seed, so histories and live traffic share
SKUs) with everyday goods and high-value electronics and jewellery. Legitimate traffic is sales of 1-6
line items and returns of an earlier sale of the same customer. A ``fraud_share`` of transactions
(label 1) follows one of :data:`FRAUD_PATTERNS`.
"""

from __future__ import annotations

import heapq
import random
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from functools import lru_cache, partial
from itertools import accumulate
from math import exp, log
from typing import NamedTuple

from schemas.records import LineItem, PosTransaction

LEGIT = "legit"
CARD_TESTING = "card_testing"
AMOUNT_ANOMALY = "amount_anomaly"
NEW_CARD_HIGH_VALUE = "new_card_high_value"
RETURN_WITHOUT_RECEIPT = "return_without_receipt"
CROSS_STORE_RETURN_MISMATCH = "cross_store_return_mismatch"
UNKNOWN_RECEIPT_RETURN = "unknown_receipt_return"

FRAUD_PATTERNS: dict[str, float] = {
    CARD_TESTING: 0.08,
    AMOUNT_ANOMALY: 0.24,
    NEW_CARD_HIGH_VALUE: 0.22,
    RETURN_WITHOUT_RECEIPT: 0.16,
    CROSS_STORE_RETURN_MISMATCH: 0.18,
    UNKNOWN_RECEIPT_RETURN: 0.12,
}
"""Share of fraud *episodes* by pattern. A card-testing episode is a burst of several transactions,
the others are one transaction each."""

CARD_TESTING_BURST = (5, 14)
"""Inclusive range of transactions in one card-testing burst."""
CARD_TESTING_GAP_MS = 20_000
"""Mean gap between the transactions of a burst: a burst lasts a few minutes."""

DEFAULT_START_MS = int(datetime(2025, 3, 3, 13, 0, tzinfo=UTC).timestamp() * 1000)
"""Monday 08:00 US Eastern: a deterministic default start of generator time."""

HIGH_VALUE = 1000.0
FX = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79}
"""Fixed price conversion for customers paying in another currency (all prices are USD in the catalogue)."""

# Relative traffic by local (US Eastern) hour of day; normalised to mean 1 below.
_HOURLY = (
    0.05,
    0.03,
    0.02,
    0.02,
    0.03,
    0.08,
    0.2,
    0.45,
    0.7,
    0.95,
    1.05,
    1.15,
    1.4,
    1.35,
    1.1,
    1.05,
    1.2,
    1.5,
    1.55,
    1.3,
    1.0,
    0.7,
    0.35,
    0.12,
)
_HOURLY_NORM = tuple(h * 24 / sum(_HOURLY) for h in _HOURLY)
_HOUR_MS = 3_600_000
_SHIFT_MS = 8 * _HOUR_MS
_LOCAL_OFFSET_H = -5

_US_PLACES = (  # city, state, zip prefix, latitude, longitude
    ("New York", "NY", "100", 40.7128, -74.0060),
    ("Chicago", "IL", "606", 41.8781, -87.6298),
    ("Houston", "TX", "770", 29.7604, -95.3698),
    ("Phoenix", "AZ", "850", 33.4484, -112.0740),
    ("Philadelphia", "PA", "191", 39.9526, -75.1652),
    ("San Antonio", "TX", "782", 29.4241, -98.4936),
    ("San Diego", "CA", "921", 32.7157, -117.1611),
    ("Dallas", "TX", "752", 32.7767, -96.7970),
    ("Seattle", "WA", "981", 47.6062, -122.3321),
    ("Denver", "CO", "802", 39.7392, -104.9903),
    ("Boston", "MA", "021", 42.3601, -71.0589),
    ("Atlanta", "GA", "303", 33.7490, -84.3880),
    ("Miami", "FL", "331", 25.7617, -80.1918),
    ("Portland", "OR", "972", 45.5152, -122.6784),
    ("Minneapolis", "MN", "554", 44.9778, -93.2650),
    ("Nashville", "TN", "372", 36.1627, -86.7816),
    ("Columbus", "OH", "432", 39.9612, -82.9988),
    ("Charlotte", "NC", "282", 35.2271, -80.8431),
    ("Detroit", "MI", "482", 42.3314, -83.0458),
    ("Las Vegas", "NV", "891", 36.1699, -115.1398),
    ("Kansas City", "MO", "641", 39.0997, -94.5786),
    ("Raleigh", "NC", "276", 35.7796, -78.6382),
    ("Salt Lake City", "UT", "841", 40.7608, -111.8910),
    ("Newark", "NJ", "071", 40.7357, -74.1724),
)
_FOREIGN_PLACES = (  # city, region, country, currency, postcode, latitude, longitude
    ("London", "ENG", "GB", "GBP", "SW1A 1AA", 51.5074, -0.1278),
    ("Manchester", "ENG", "GB", "GBP", "M1 1AE", 53.4808, -2.2426),
    ("Edinburgh", "SCT", "GB", "GBP", "EH1 1YZ", 55.9533, -3.1883),
    ("Paris", "IDF", "FR", "EUR", "75001", 48.8566, 2.3522),
    ("Berlin", "BE", "DE", "EUR", "10115", 52.5200, 13.4050),
    ("Madrid", "MD", "ES", "EUR", "28001", 40.4168, -3.7038),
    ("Dublin", "L", "IE", "EUR", "D01", 53.3498, -6.2603),
    ("Amsterdam", "NH", "NL", "EUR", "1012", 52.3676, 4.9041),
)
_FOREIGN_SHARE = 0.07
_DIAL = {"GB": 44, "FR": 33, "DE": 49, "ES": 34, "IE": 353, "NL": 31}
_FIRST = (
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Carlos",
    "Karen",
    "Daniel",
    "Lisa",
    "Matthew",
    "Nancy",
    "Anthony",
    "Sandra",
    "Mark",
    "Ashley",
    "Wei",
    "Emily",
    "Omar",
    "Sofia",
    "Kevin",
    "Aisha",
    "Brian",
    "Olga",
    "Luis",
    "Hannah",
    "Raj",
    "Mia",
)
_LAST = (
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "White",
    "Harris",
    "Sanchez",
    "Clark",
    "Ramirez",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Nguyen",
    "Hill",
)
_JOBS = (
    "Nurse",
    "Software engineer",
    "Teacher",
    "Accountant",
    "Electrician",
    "Chef",
    "Pharmacist",
    "Sales manager",
    "Graphic designer",
    "Mechanic",
    "Lawyer",
    "Student",
    "Retired",
    "Architect",
    "Police officer",
    "Dentist",
    "Data analyst",
    "Carpenter",
    "Journalist",
    "Physiotherapist",
)
_STREETS = (
    "Main St",
    "Oak Ave",
    "Maple Dr",
    "Cedar Ln",
    "Pine St",
    "Elm St",
    "Washington Ave",
    "Lake Rd",
    "Hill St",
    "Park Ave",
    "Sunset Blvd",
    "River Rd",
    "Church St",
    "Highland Ave",
)
_MAIL = ("gmail.com", "yahoo.com", "hotmail.com", "outlook.com", "icloud.com", "aol.com", "proton.me")
_USER_AGENTS = (
    "CheckoutGuardPOS/3.4 (Android 13; SM-T500)",
    "CheckoutGuardPOS/3.4 (iPadOS 17.2; iPad13,1)",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/121.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/121.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_2) AppleWebKit/605.1.15 Version/17.2 Safari/605.1.15",
)
_RISKY_BINS = ("431940", "440393", "485340", "517805", "523236", "546616")
"""Prepaid / frequently abused BINs: over-represented in fraud, yet a few honest customers hold them."""

# Catalogue: category, sku code, count, median USD price, log-sigma, min, max.
_CATEGORIES = (
    ("grocery", "gro", 160, 4.0, 0.6, 0.5, 40.0),
    ("household", "hou", 70, 8.0, 0.6, 1.0, 80.0),
    ("health_beauty", "hea", 60, 11.0, 0.6, 2.0, 120.0),
    ("apparel", "app", 80, 30.0, 0.6, 5.0, 300.0),
    ("toys", "toy", 40, 22.0, 0.7, 3.0, 250.0),
    ("home_garden", "hom", 60, 35.0, 0.8, 3.0, 600.0),
    ("sporting_goods", "spo", 40, 45.0, 0.8, 5.0, 800.0),
    ("electronics", "ele", 60, 120.0, 1.0, 5.0, 950.0),
    ("jewelry", "jew", 25, 120.0, 0.9, 15.0, 900.0),
)
_HIGH_VALUE_SKUS = (("electronics", "ele", 18, 1000.0, 2800.0), ("jewelry", "jew", 6, 1100.0, 5000.0))
_GIFT_CARDS = (10.0, 25.0, 50.0, 100.0, 200.0)
_CATALOGUE_SEED = 20250303
_BASKET_SIZE_WEIGHTS = (30, 25, 18, 12, 9, 6)  # 1..6 line items
_NEIGHBOURHOOD = 20
"""Items are drawn among the SKUs whose price is closest to the per-item budget, +/- this many."""


@dataclass(frozen=True, slots=True)
class Catalogue:
    """Every SKU as a quantity-1 USD :class:`LineItem`, plus price-sorted pools for basket building."""

    products: tuple[LineItem, ...]
    everyday: tuple[int, ...]
    """Indexes of SKUs under ``HIGH_VALUE``, sorted by price."""
    everyday_prices: tuple[float, ...]
    high_value_electronics: tuple[int, ...]
    high_value: tuple[int, ...]
    by_price: tuple[int, ...]
    """All SKUs sorted by price."""
    by_price_prices: tuple[float, ...]
    small: tuple[int, ...]
    """SKUs of at most 5.00: what card testers buy."""
    returnable: tuple[int, ...]
    """Mid/high value apparel, electronics, jewellery, home: what is "returned" without a receipt."""


@lru_cache(maxsize=1)
def catalogue() -> Catalogue:
    """The product catalogue; fixed (its own seed) so every generator sells the same SKUs."""
    rng = random.Random(_CATALOGUE_SEED)
    products: list[LineItem] = []
    for name, code, count, median, sigma, lo, hi in _CATEGORIES:
        for _ in range(count):
            price = min(hi, max(lo, rng.lognormvariate(0.0, sigma) * median))
            price = round(price, 0) - 0.01 if price > 20 else round(price, 2)
            products.append(LineItem(f"sku-{code}-{len(products):04d}", name, 1, max(price, 0.29)))
    for name, code, count, lo, hi in _HIGH_VALUE_SKUS:
        for _ in range(count):
            products.append(LineItem(f"sku-{code}-{len(products):04d}", name, 1, round(rng.uniform(lo, hi), 0) - 0.01))
    for value in _GIFT_CARDS:
        products.append(LineItem(f"sku-gif-{len(products):04d}", "gift_cards", 1, value))

    def sort_by_price(idx: list[int]) -> tuple[int, ...]:
        return tuple(sorted(idx, key=lambda i: (products[i].unit_price, i)))

    everyday = sort_by_price([i for i, p in enumerate(products) if p.unit_price < HIGH_VALUE])
    by_price = sort_by_price(list(range(len(products))))
    return Catalogue(
        products=tuple(products),
        everyday=everyday,
        everyday_prices=tuple(products[i].unit_price for i in everyday),
        high_value_electronics=tuple(
            i for i, p in enumerate(products) if p.category == "electronics" and p.unit_price >= HIGH_VALUE
        ),
        high_value=tuple(i for i, p in enumerate(products) if p.unit_price >= HIGH_VALUE),
        by_price=by_price,
        by_price_prices=tuple(products[i].unit_price for i in by_price),
        small=tuple(i for i, p in enumerate(products) if p.unit_price <= 5.0),
        returnable=tuple(
            i
            for i, p in enumerate(products)
            if p.unit_price >= 60 and p.category in ("apparel", "electronics", "jewelry", "home_garden")
        ),
    )


IDENTITY_FIELDS = (
    "customer_id",
    "card_bin",
    "card_token",
    "customer_email",
    "customer_name",
    "customer_job",
    "billing_phone",
    "ip_address",
    "user_agent",
    "billing_street",
    "billing_city",
    "billing_state",
    "billing_zip",
    "billing_country",
    "billing_latitude",
    "billing_longitude",
)
"""The customer-identity fields of a PosTransaction, in record order; identities are tuples of these."""
_BIN, _TOKEN = 1, 2
_HEAD_FIELDS = (
    "transaction_id",
    "event_time",
    "store_id",
    "lane_id",
    "kind",
    "amount",
    "currency",
    "cashier_id",
    "original_transaction_id",
    "items",
    "payment_method",
)
_TAIL_FIELDS = ("product_category", "label")
_POSITIONAL = tuple(f.name for f in fields(PosTransaction)) == _HEAD_FIELDS + IDENTITY_FIELDS + _TAIL_FIELDS
"""Building records positionally is ~30 % faster; fall back to keywords if the record's fields move."""
_new_transaction: Callable[..., PosTransaction] = PosTransaction
"""PosTransaction, called with an unpacked ``Identity`` (a tuple, for speed) whose values are ``object`` to the
type checker: an identity's field types are set where identities are built, not checked at this call."""

Identity = tuple[object, ...]


def identity_dict(identity: Identity) -> dict[str, object]:
    return dict(zip(IDENTITY_FIELDS, identity, strict=True))


def _replace_card(identity: Identity, card_bin: str | None, card_token: str | None) -> Identity:
    out = list(identity)
    out[_BIN], out[_TOKEN] = card_bin, card_token
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Store:
    index: int
    store_id: str
    city: str
    state: str
    lanes: tuple[str, ...]
    cashiers: tuple[str, ...]
    """More cashiers than lanes: lanes change hands every 8-hour shift."""


class _Sale(NamedTuple):
    transaction_id: str
    event_time: int
    store: int
    customer: int
    items: tuple[LineItem, ...]
    currency: str
    cash: bool


@dataclass(slots=True)
class Customer:
    """A shopper with a stable identity. ``card`` / ``cash`` are the identity tuples
    (:data:`IDENTITY_FIELDS`) used when paying by card or in cash (no card fields)."""

    index: int
    customer_id: str
    home_store: int
    typical_spend: float
    """Median basket in USD: the norm an amount anomaly is far above."""
    currency: str
    card: Identity
    cash: Identity


_RECENT_SALES = 4096
"""Recent sales whose receipts a fraudster may get hold of (cross-store return fraud)."""
_YOUNG_CAP = 200_000
"""Sales younger than the minimum return age kept as future return candidates (bounded memory)."""
_RETURNABLE_CAP = 50_000


class PosGenerator(Iterator[PosTransaction]):
    """Endless, deterministic POS transactions in event-time order.

    ``next()`` gives a :class:`PosTransaction`; :meth:`next_with_pattern` also says which fraud
    pattern (or ``"legit"``) made it, for evaluation per pattern. Transaction ids are
    ``tx-<seed>-<n>``, n counting up (skipping the numbers reserved as forged receipts, so those are
    never issued). Memory is bounded (capped buffers of recent sales), so it can run forever.

    Keep ``customers`` large relative to the rate: with too few customers for the traffic, honest
    shoppers come back every few seconds and look like velocity fraud.
    """

    def __init__(
        self,
        seed: int = 0,
        stores: int = 8,
        lanes_per_store: int = 6,
        customers: int = 5000,
        fraud_share: float = 0.03,
        start_time_ms: int = DEFAULT_START_MS,
        tx_per_second: float = 20.0,
        return_share: float = 0.06,
        min_return_age_ms: int = _HOUR_MS,
        diurnal: bool = True,
    ) -> None:
        """``tx_per_second`` is the mean arrival rate in *event* time over all stores (shaped by
        hour of day when ``diurnal``); ``return_share`` is the share of legit arrivals that try to
        return an earlier sale at least ``min_return_age_ms`` old (a sale otherwise)."""
        if stores < 1 or lanes_per_store < 1 or customers < 2:
            raise ValueError("need at least 1 store, 1 lane per store and 2 customers")
        if not 0.0 <= fraud_share <= 1.0:
            raise ValueError(f"fraud_share must be within [0, 1], got {fraud_share}")
        if not 0.0 <= return_share <= 1.0:
            raise ValueError(f"return_share must be within [0, 1], got {return_share}")
        if tx_per_second <= 0:
            raise ValueError(f"tx_per_second must be positive, got {tx_per_second}")
        self.seed = seed
        self.fraud_share = fraud_share
        self.return_share = return_share
        self.min_return_age_ms = min_return_age_ms
        self._rng = random.Random(seed)
        self._random = self._rng.random
        self._cat = catalogue()
        self._mean_gap_ms = 1000.0 / tx_per_second
        self._hourly = _HOURLY_NORM if diurnal else (1.0,) * 24
        self._clock = int(start_time_ms)
        self._next_arrival = float(start_time_ms)
        self._pending: list[tuple[int, int, Callable[[int], PosTransaction]]] = []
        self._pending_seq = 0
        self._counter = 0
        self._id_prefix = f"tx-{seed}-"
        self._extra_identities = 0
        self._items: dict[tuple[int, int, str], LineItem] = {}
        self._recent_sales: deque[_Sale] = deque(maxlen=_RECENT_SALES)
        self._young: deque[_Sale] = deque(maxlen=_YOUNG_CAP)
        self._returnable: list[_Sale] = []
        self.stores = tuple(self._make_store(i, lanes_per_store) for i in range(stores))
        self.customers = tuple(self._make_customer(i) for i in range(customers))
        self._customer_cum = list(accumulate(self._rng.lognormvariate(0.0, 0.6) for _ in range(customers)))
        self._pattern_names = list(FRAUD_PATTERNS)
        self._pattern_cum = list(accumulate(FRAUD_PATTERNS.values()))
        lo, hi = CARD_TESTING_BURST
        mean_len = sum(w * ((lo + hi) / 2 if n == CARD_TESTING else 1) for n, w in FRAUD_PATTERNS.items())
        mean_len /= sum(FRAUD_PATTERNS.values())
        # An arrival starts a fraud episode (mean_len transactions) with probability q, else it is one
        # legit transaction: fraud share f = q*L / (q*L + 1 - q)  =>  q = f / (L*(1 - f) + f).
        self._episode_p = fraud_share / (mean_len * (1.0 - fraud_share) + fraud_share)
        self._basket_cum = list(accumulate(_BASKET_SIZE_WEIGHTS))
        self._builders: dict[str, Callable[[int], PosTransaction]] = {
            CARD_TESTING: self._card_testing,
            AMOUNT_ANOMALY: self._amount_anomaly,
            NEW_CARD_HIGH_VALUE: self._new_card_high_value,
            RETURN_WITHOUT_RECEIPT: self._return_without_receipt,
            CROSS_STORE_RETURN_MISMATCH: self._cross_store_return_mismatch,
            UNKNOWN_RECEIPT_RETURN: self._unknown_receipt_return,
        }

    @property
    def clock_ms(self) -> int:
        """Event time of the last transaction returned (the start time before the first)."""
        return self._clock

    # ------------------------------------------------------------------ population

    def _make_store(self, i: int, lanes: int) -> Store:
        city, state, *_ = _US_PLACES[i % len(_US_PLACES)]
        return Store(
            index=i,
            store_id=f"store-{i + 1:03d}",
            city=city,
            state=state,
            lanes=tuple(f"lane-{j + 1:02d}" for j in range(lanes)),
            cashiers=tuple(f"cashier-{i + 1:03d}-{j + 1:02d}" for j in range(lanes + 2)),
        )

    def _identity(self, customer_id: str, near_store: int | None) -> tuple[Identity, str]:
        """Card-paying identity of a new person and the currency they pay in; ``near_store=None``
        lets them live near any store or (sometimes) abroad."""
        rng = self._rng
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        street = f"{rng.randrange(1, 9999)} {rng.choice(_STREETS)}"
        if near_store is None and rng.random() < _FOREIGN_SHARE:
            city, state, country, currency, zipcode, lat, lon = rng.choice(_FOREIGN_PLACES)
            phone = f"+{_DIAL[country]} {rng.randrange(10**8, 10**9)}"
        else:
            if near_store is None:
                near_store = rng.randrange(len(self.stores))
            city, state, zip3, lat, lon = _US_PLACES[near_store % len(_US_PLACES)]
            country, currency = "US", "USD"
            zipcode = f"{zip3}{rng.randrange(0, 100):02d}"
            phone = f"+1-{rng.randrange(200, 999)}-{rng.randrange(200, 999)}-{rng.randrange(0, 10000):04d}"
        card_bin = rng.choice(_RISKY_BINS) if rng.random() < 0.02 else self._random_bin()
        ip = (
            f"{rng.choice((24, 50, 67, 73, 98, 108, 172, 184, 203))}.{rng.randrange(0, 256)}."
            f"{rng.randrange(0, 256)}.{rng.randrange(1, 255)}"
        )
        email = f"{first}.{last}{rng.randrange(1, 100)}@{rng.choice(_MAIL)}".lower()
        identity = (
            customer_id,
            card_bin,
            self._card_token(),
            email,
            f"{first} {last}",
            rng.choice(_JOBS),
            phone,
            ip,
            rng.choice(_USER_AGENTS),
            street,
            city,
            state,
            zipcode,
            country,
            round(lat + rng.uniform(-0.15, 0.15), 4),
            round(lon + rng.uniform(-0.15, 0.15), 4),
        )
        return identity, currency

    def _random_bin(self) -> str:
        rng = self._rng
        brand = rng.random()
        if brand < 0.55:
            return f"4{rng.randrange(0, 100000):05d}"
        if brand < 0.85:
            return f"5{rng.randrange(1, 6)}{rng.randrange(0, 10000):04d}"
        if brand < 0.95:
            return f"3{rng.choice((4, 7))}{rng.randrange(0, 10000):04d}"
        return f"6011{rng.randrange(0, 100):02d}"

    def _card_token(self) -> str:
        return f"tok_{self._rng.getrandbits(64):016x}"

    def _make_customer(self, i: int) -> Customer:
        rng = self._rng
        home = rng.randrange(len(self.stores))
        card, currency = self._identity(f"cust-{i + 1:06d}", None if rng.random() < 0.5 else home)
        spend = min(400.0, max(5.0, rng.lognormvariate(0.0, 0.6) * 40.0))
        return Customer(i, str(card[0]), home, round(spend, 2), currency, card, _replace_card(card, None, None))

    def _new_identity(self) -> tuple[Identity, str]:
        """A person outside the population (a walk-in with a card never seen before)."""
        self._extra_identities += 1
        n = len(self.customers) + self._extra_identities
        return self._identity(f"cust-{n:06d}", self._rng.randrange(len(self.stores)))

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> PosGenerator:
        return self

    def __next__(self) -> PosTransaction:
        return self.next_with_pattern()[0]

    def next_with_pattern(self) -> tuple[PosTransaction, str]:
        """The next transaction in event-time order and the pattern that made it."""
        pending = self._pending
        if pending and pending[0][0] <= self._next_arrival:
            t, _, build = heapq.heappop(pending)
            self._clock = t
            return build(t), CARD_TESTING
        t = int(self._next_arrival)
        self._clock = t
        rnd = self._random
        hour = (t // _HOUR_MS + _LOCAL_OFFSET_H) % 24
        self._next_arrival += -log(1.0 - rnd()) * self._mean_gap_ms / self._hourly[hour]
        if rnd() < self._episode_p:
            name = self._pattern_names[bisect_right(self._pattern_cum, rnd() * self._pattern_cum[-1])]
            return self._builders[name](t), name
        return self._legit(t), LEGIT

    # ------------------------------------------------------------------ helpers

    def _pick_customer(self) -> Customer:
        cum = self._customer_cum
        return self.customers[bisect_right(cum, self._random() * cum[-1])]

    def _pick_store(self) -> Store:
        return self.stores[int(self._random() * len(self.stores))]

    def _other_store(self, store: int) -> int:
        n = len(self.stores)
        return (store + 1 + int(self._random() * (n - 1))) % n

    def _item(self, product: int, quantity: int, currency: str) -> LineItem:
        """Line items are immutable, so one object per (SKU, quantity, currency) is shared."""
        key = (product, quantity, currency)
        item = self._items.get(key)
        if item is None:
            base = self._cat.products[product]
            price = base.unit_price if currency == "USD" else round(base.unit_price * FX[currency], 2)
            item = LineItem(base.sku, base.category, quantity, price)
            self._items[key] = item
        return item

    def _near(self, pool: tuple[int, ...], prices: tuple[float, ...], budget: float, spread: int) -> int:
        """A SKU among the ``spread`` cheaper or dearer ones around ``budget`` (the catalogue is
        sparse at the top, so big budgets need a narrow spread to stay near their price)."""
        i = bisect_left(prices, budget) + int((self._random() - 0.5) * (2 * spread))
        return pool[0 if i < 0 else min(i, len(pool) - 1)]

    def _tx(
        self,
        t: int,
        store: Store,
        lane: int,
        kind: str,
        items: tuple[LineItem, ...],
        identity: Identity,
        currency: str,
        label: int,
        payment: str = "card",
        original: str | None = None,
    ) -> PosTransaction:
        amount = 0.0
        top, top_value = items[0], -1.0
        for it in items:
            value = it.quantity * it.unit_price
            amount += value
            if value > top_value:
                top, top_value = it, value
        self._counter += 1
        cashiers = store.cashiers
        head = (
            self._id_prefix + str(self._counter),
            t,
            store.store_id,
            store.lanes[lane],
            kind,
            round(amount, 2),
            currency,
            cashiers[(lane + t // _SHIFT_MS) % len(cashiers)],
            original,
            items,
            payment,
        )
        if _POSITIONAL:
            return _new_transaction(*head, *identity, top.category, label)
        return _new_transaction(
            **dict(zip(_HEAD_FIELDS, head, strict=True)),
            **identity_dict(identity),
            product_category=top.category,
            label=label,
        )

    def _lane(self, store: Store) -> int:
        return int(self._random() * len(store.lanes))

    # ------------------------------------------------------------------ legit traffic

    def _legit(self, t: int) -> PosTransaction:
        rnd = self._random
        if rnd() < self.return_share:
            tx = self._legit_return(t)
            if tx is not None:
                return tx
        cum = self._customer_cum
        cust = self.customers[bisect_right(cum, rnd() * cum[-1])]
        stores = self.stores
        store = stores[cust.home_store] if rnd() < 0.85 else stores[int(rnd() * len(stores))]
        n = bisect_right(self._basket_cum, rnd() * self._basket_cum[-1]) + 1
        budget = cust.typical_spend * exp(self._rng.gauss(0.0, 0.4)) / n
        cat = self._cat
        pool, prices, products = cat.everyday, cat.everyday_prices, cat.products
        last = len(pool) - 1
        cache = self._items
        currency = cust.currency
        start = bisect_left(prices, budget) - _NEIGHBOURHOOD
        items = []
        for _ in range(n):
            i = start + int(rnd() * (2 * _NEIGHBOURHOOD))
            p = pool[0 if i < 0 else (last if i > last else i)]
            qty = 1 if products[p].unit_price > 15 or rnd() < 0.75 else 2 + int(rnd() * 2)
            items.append(cache.get((p, qty, currency)) or self._item(p, qty, currency))
        if rnd() < 0.004:  # the occasional honest big-ticket purchase
            items[0] = self._item(cat.high_value[int(rnd() * len(cat.high_value))], 1, currency)
        pay = rnd()
        cash = pay < 0.08
        payment = "cash" if cash else "mobile_wallet" if pay < 0.15 else "card"
        basket = tuple(items)
        tx = self._tx(
            t,
            store,
            int(rnd() * len(store.lanes)),
            "SALE",
            basket,
            cust.cash if cash else cust.card,
            currency,
            0,
            payment,
        )
        sale = _Sale(tx.transaction_id, t, store.index, cust.index, basket, currency, cash)
        self._young.append(sale)
        self._recent_sales.append(sale)
        return tx

    def _legit_return(self, t: int) -> PosTransaction | None:
        """Part of an earlier sale (old enough), returned by the customer who bought it, mostly at
        the store it was bought in. ``None`` when no sale is old enough yet."""
        young, returnable = self._young, self._returnable
        oldest_ok = t - self.min_return_age_ms
        while young and young[0].event_time <= oldest_ok:
            sale = young.popleft()
            if len(returnable) < _RETURNABLE_CAP:
                returnable.append(sale)
            else:  # keep a uniform sample of the returnable sales, in bounded memory
                returnable[int(self._random() * _RETURNABLE_CAP)] = sale
        if not returnable:
            return None
        rng = self._rng
        i = int(rng.random() * len(returnable))
        sale = returnable[i]
        returnable[i] = returnable[-1]  # a sale is returned at most once
        returnable.pop()
        cust = self.customers[sale.customer]
        k = 1 + int(rng.random() * len(sale.items))
        items = tuple(rng.sample(sale.items, k)) if k < len(sale.items) else sale.items
        store_idx = sale.store
        if len(self.stores) > 1 and rng.random() < 0.15:
            store_idx = self._other_store(sale.store)
        store = self.stores[store_idx]
        return self._tx(
            t,
            store,
            self._lane(store),
            "RETURN",
            items,
            cust.cash if sale.cash else cust.card,
            sale.currency,
            0,
            "cash" if sale.cash else "card",
            original=sale.transaction_id,
        )

    # ------------------------------------------------------------------ fraud patterns

    def _card_testing(self, t: int) -> PosTransaction:
        """A stolen card probed with many tiny purchases at one store within minutes."""
        rng = self._rng
        identity, _ = self._new_identity()
        if rng.random() < 0.6:
            identity = _replace_card(identity, rng.choice(_RISKY_BINS), identity[_TOKEN])  # type: ignore[arg-type]
        store = self._pick_store()
        lanes = (self._lane(store), self._lane(store))
        size = rng.randint(*CARD_TESTING_BURST)
        build: Callable[[int], PosTransaction] = partial(self._card_test_tx, store, lanes, identity)
        when = t
        for _ in range(size - 1):
            when += 1000 + int(rng.expovariate(1.0) * CARD_TESTING_GAP_MS)
            self._pending_seq += 1
            heapq.heappush(self._pending, (when, self._pending_seq, build))
        return build(t)

    def _card_test_tx(self, store: Store, lanes: tuple[int, int], identity: Identity, t: int) -> PosTransaction:
        small = self._cat.small
        item = self._item(small[int(self._random() * len(small))], 1, "USD")
        return self._tx(t, store, lanes[int(self._random() * 2)], "SALE", (item,), identity, "USD", 1)

    def _amount_anomaly(self, t: int) -> PosTransaction:
        """A known customer's card spending many times their usual basket (stolen card, takeover)."""
        rng = self._rng
        cust = self._pick_customer()
        store = self.stores[cust.home_store] if rng.random() < 0.5 else self._pick_store()
        n = 1 + int(rng.random() * 3)
        budget = max(400.0, cust.typical_spend * rng.uniform(10.0, 25.0)) / n
        cat = self._cat
        items = tuple(
            self._item(self._near(cat.by_price, cat.by_price_prices, budget, 3), 1, cust.currency) for _ in range(n)
        )
        return self._tx(t, store, self._lane(store), "SALE", items, cust.card, cust.currency, 1)

    def _new_card_high_value(self, t: int) -> PosTransaction:
        """High-value electronics on a card never seen before, under a known customer's name."""
        rng = self._rng
        cust = self._pick_customer()
        card_bin = rng.choice(_RISKY_BINS) if rng.random() < 0.5 else self._random_bin()
        identity = _replace_card(cust.card, card_bin, self._card_token())
        pool = self._cat.high_value_electronics
        n = 2 if rng.random() < 0.3 else 1
        items = tuple(self._item(pool[int(rng.random() * len(pool))], 1, cust.currency) for _ in range(n))
        store = self._pick_store()
        return self._tx(t, store, self._lane(store), "SALE", items, identity, cust.currency, 1)

    def _returned_goods(self, currency: str) -> tuple[LineItem, ...]:
        pool = self._cat.returnable
        rnd = self._random
        n = 2 if rnd() < 0.3 else 1
        return tuple(self._item(pool[int(rnd() * len(pool))], 1, currency) for _ in range(n))

    def _return_without_receipt(self, t: int) -> PosTransaction:
        """Goods "returned" with no receipt at all, often refunded in cash."""
        rng = self._rng
        if rng.random() < 0.6:
            cust = self._pick_customer()
            card, cash, currency = cust.card, cust.cash, cust.currency
        else:
            card, currency = self._new_identity()
            cash = _replace_card(card, None, None)
        in_cash = rng.random() < 0.5
        store = self._pick_store()
        return self._tx(
            t,
            store,
            self._lane(store),
            "RETURN",
            self._returned_goods(currency),
            cash if in_cash else card,
            currency,
            1,
            "cash" if in_cash else "card",
        )

    def _cross_store_return_mismatch(self, t: int) -> PosTransaction:
        """Someone else's receipt (a sale at store A) used to "return" its goods at store B."""
        rng = self._rng
        sales = self._recent_sales
        if not sales or len(self.stores) < 2:
            return self._return_without_receipt(t)
        sale = sales[int(rng.random() * len(sales))]
        cust = self._pick_customer()
        while cust.index == sale.customer:
            cust = self.customers[int(rng.random() * len(self.customers))]
        by_value = sorted(sale.items, key=lambda i: -i.quantity * i.unit_price)
        items = tuple(by_value[: 1 + int(rng.random() * 2)])
        store = self.stores[self._other_store(sale.store)]
        return self._tx(
            t, store, self._lane(store), "RETURN", items, cust.card, sale.currency, 1, original=sale.transaction_id
        )

    def _unknown_receipt_return(self, t: int) -> PosTransaction:
        """A return quoting a receipt number that was never issued (forged or made up)."""
        self._counter += 1  # reserve a number: no transaction will ever carry this id
        forged = self._id_prefix + str(self._counter)
        cust = self._pick_customer()
        store = self._pick_store()
        return self._tx(
            t,
            store,
            self._lane(store),
            "RETURN",
            self._returned_goods(cust.currency),
            cust.card,
            cust.currency,
            1,
            original=forged,
        )
