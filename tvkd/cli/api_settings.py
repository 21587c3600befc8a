"""Where the API clients (`tvkd submit/status/cancel`, `tvkd dashboard`) find the API and a key.

The flags win; then the environment and `.env` (through the service's settings when the service
extra is installed, else TVKD_API_URL / TVKD_API_KEY directly); then the key that `tvkd up` made
in TVKD_HOME/api_key, so that a local setup needs no configuration at all.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


def api_settings(url: str | None, key: str | None) -> tuple[str, str]:
    home = Path(os.environ.get("TVKD_HOME", ".tvkd"))
    if url is None or key is None:
        try:
            from service.settings import Settings  # reads .env as well as the environment

            settings = Settings()
            url = url or settings.api_url
            key = key if key is not None else settings.api_key
            home = settings.home_dir
        except ImportError:
            url = url or os.environ.get("TVKD_API_URL", DEFAULT_URL)
            key = key if key is not None else os.environ.get("TVKD_API_KEY", "")
    if not key and (home / "api_key").is_file():
        key = (home / "api_key").read_text().strip()
    return str(url).rstrip("/"), str(key or "")
