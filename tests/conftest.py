"""Every test tier: a developer's ``.env`` never changes what a test sees (CI has none).

``get_settings()`` reads ``CG_ENV_FILE`` (default: the repo's ``.env``); empty means no file. The
environment itself still applies, so CI's port variables reach the end-to-end tests and their children.
"""

from __future__ import annotations

import os

os.environ["CG_ENV_FILE"] = ""
