"""Production front (nginx + supervisord, readiness-gated) and the Modal deployment; templates ship beside this file."""

from __future__ import annotations

from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent
