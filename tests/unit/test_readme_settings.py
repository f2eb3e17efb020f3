"""Every ``CG_*`` variable the README names is a real setting (or one of the few documented variables
that are read outside ``Settings``), so a deployer copying a name from it configures something."""

from __future__ import annotations

import re

from pydantic import BaseModel

from infra.settings import REPO_ROOT, Settings

NOT_SETTINGS = {
    "CG_SETUP__BROWSER": "infra/install.sh: install Chromium or not",
    "CG_ENV_FILE": "which .env file the settings load",
}
"""Variables read before or outside the settings object."""

TOKEN = re.compile(r"(?<![A-Za-z0-9_])(CG_[A-Z0-9_]*[A-Z0-9])(_\*)?")
ABBREVIATED = re.compile(r"…__([A-Z0-9_]*[A-Z0-9])(_\*)?")


def _paths(model: type[BaseModel], prefix: str = "CG_") -> set[str]:
    out: set[str] = set()
    for name, field in model.model_fields.items():
        path = prefix + name.upper()
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out |= _paths(kind, path + "__")
        else:
            out.add(path)
    return out


SETTINGS = _paths(Settings)


def _known(name: str, wildcard: bool) -> bool:
    if name in NOT_SETTINGS:
        return True
    if wildcard:
        return any(p.startswith(name + "_") for p in SETTINGS)
    return name in SETTINGS


def test_every_cg_variable_in_the_readme_is_a_setting():
    text = (REPO_ROOT / "README.md").read_text()
    unknown = sorted({m[0] for m in TOKEN.finditer(text) if not _known(m[1], bool(m[2]))})
    assert not unknown, f"README names settings that do not exist: {unknown}"


def _abbreviations(text: str) -> list[tuple[str, bool, str, str]]:
    """Each ``…__B`` in ``text`` as (full name, wildcard, as written, group): the ``…__`` stands for the group of
    the last full name before it (``CG_SMTP__STARTTLS``, ``…__SSL``)."""
    group, out = None, []
    for m in re.finditer(f"{TOKEN.pattern}|{ABBREVIATED.pattern}", text):
        if m[1]:
            if "__" in m[1]:
                group = m[1].rsplit("__", 1)[0]
        elif group is not None:
            out.append((f"{group}__{m[3]}", bool(m[4]), m[0], group))
    return out


def test_abbreviated_names_belong_to_the_group_named_before_them():
    text = (REPO_ROOT / "README.md").read_text()
    unknown = {
        f"{written} (after {group})" for name, wild, written, group in _abbreviations(text) if not _known(name, wild)
    }
    assert not unknown, f"README abbreviates settings that do not exist: {sorted(unknown)}"


def test_the_checker_knows_the_settings_tree():
    assert {"CG_KAFKA__BOOTSTRAP_SERVERS", "CG_STACK_DIR", "CG_BIND_HOST", "CG_WEBEX__BOT_TOKEN"} <= SETTINGS
    assert _known("CG_KAFKA__SASL", wildcard=True) and not _known("CG_KAFKA__SASL", wildcard=False)
    assert not _known("CG_WEBEX__TOKEN", wildcard=False)


def test_every_supervisor_setting_is_in_the_readme():
    """Production mode's settings are all documented: ``CG_SUPERVISOR__PROBE_TIMEOUT_S`` was not, so a deployer with a
    slow host could not find why its services were restarted for want of an answer."""
    text = (REPO_ROOT / "README.md").read_text()
    named = {m[1] for m in TOKEN.finditer(text)}
    missing = sorted(p for p in SETTINGS if p.startswith("CG_SUPERVISOR__") and p not in named)
    assert not missing, f"README does not name: {missing}"


def test_every_setting_is_in_the_readme():
    """Each setting a deployer can set is named in the README, in full or as ``…__B`` after a sibling, or under a
    ``CG_X__A_*`` wildcard: 27 were named nowhere (``CG_SMTP__TIMEOUT_S``, ``CG_JOB__CONSUMER_GROUP``, ...), so a
    deployer learnt of them, and of their defaults, only from the code."""
    text = (REPO_ROOT / "README.md").read_text()
    mentions = [(m[1], bool(m[2])) for m in TOKEN.finditer(text)]
    mentions += [(name, wild) for name, wild, _, _ in _abbreviations(text)]
    exact = {name for name, wild in mentions if not wild}
    wildcards = tuple(name + "_" for name, wild in mentions if wild)
    missing = sorted(p for p in SETTINGS if p not in exact and not p.startswith(wildcards))
    assert not missing, f"README does not name {len(missing)} settings: {missing}"
