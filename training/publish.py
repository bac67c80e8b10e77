"""Hand a published model to a running server: POST /admin/reload (authenticated)."""

from __future__ import annotations

import logging
import os

import httpx

from training.config import PublishStep

log = logging.getLogger(__name__)


def notify_server(cfg: PublishStep, model_id: str) -> bool:
    if not cfg.server:
        return False
    key = os.environ.get(cfg.admin_key_env, "")
    r = httpx.post(
        cfg.server.rstrip("/") + "/admin/reload",
        json={"model": model_id},
        headers={"Authorization": f"Bearer {key}"},
        timeout=300,
    )
    if r.status_code != 200:
        raise RuntimeError(f"server reload failed: {r.status_code} {r.text}")
    log.info("server %s now serves %s", cfg.server, model_id)
    return True
