"""The PostgreSQL server the suites make their schemas in."""

from __future__ import annotations

import os

POSTGRES_URL = os.environ.get("SAFETRAIN_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
