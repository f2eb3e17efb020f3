"""Who runs a tool, for the ``actor`` / ``published_by`` / ``decided_by`` it records when not told (``--by``).

:func:`getpass.getuser` reads ``LOGNAME``/``USER``/``LNAME``/``USERNAME`` and then the password database; a
container started with a user id that has no passwd entry and none of those variables makes it raise
(``KeyError``, ``OSError`` from Python 3.13), which killed ``rules publish`` and ``models promote`` with a
traceback. The numeric id still says who it was.
"""

from __future__ import annotations

import getpass
import os


def os_user() -> str:
    """The login name, else ``uid:<n>`` (the process's user id) when the system has no name for it."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"
