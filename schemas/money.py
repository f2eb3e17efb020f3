"""How an amount reads in its currency, for people: the alert messages and the alerts' summaries (the scoring job's,
which the dashboard shows) alike. Here, at the bottom, so both give one amount the same figure.
"""

from __future__ import annotations

MINOR_UNITS: dict[str, int] = {
    **{code: 0 for code in ("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI")},
    **{code: 0 for code in ("VND", "VUV", "XAF", "XOF", "XPF")},
    **{code: 3 for code in ("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND")},
    **{code: 4 for code in ("CLF", "UYW")},
}
"""ISO 4217 currencies whose smallest unit is not the cent (every other code: 2 decimals). Two decimals for all
showed a 12.345 KWD refund as 12.35 KWD, a fils off the amount the dashboard and the index show."""
MONEY_DECIMALS = 4
"""Most decimals an amount is shown with (ISO 4217's largest minor unit, as the dashboard rounds money)."""


def money(amount: float, currency: str) -> str:
    """``amount`` with its currency's decimals (``1,500 JPY``, ``12.345 KWD``, ``1,234.50 EUR``), and more, up to
    :data:`MONEY_DECIMALS`, when the amount has them: a digit the currency does not have is shown, not rounded
    away (``9.999 EUR`` is not ``10.00``)."""
    for decimals in range(MINOR_UNITS.get(currency.strip().upper(), 2), MONEY_DECIMALS):
        if round(amount, decimals) == round(amount, MONEY_DECIMALS):
            break
    else:
        decimals = MONEY_DECIMALS
    return f"{amount:,.{decimals}f}"
