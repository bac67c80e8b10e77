"""Operations on the live app state (model swap) shared by admin routes and signals."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def swap_model(app, name: str | None) -> str:
    """Load ``name`` (or the configured model) beside the running one, then swap it in on the
    engine's worker between requests and free the old one. Blocking; call in a thread."""
    from server.app import load_model

    settings = app.state.settings
    if name:
        settings = settings.model_copy(
            update={"model": settings.model.model_copy(update={"model": name})}
        )
    new = load_model(settings)
    engine = app.state.engine

    def _swap():
        old = engine.model
        engine.model = new
        return old

    old = engine.run_exclusive(_swap)
    try:
        old.llm.close()
    except Exception:  # noqa: BLE001
        pass
    app.state.settings = settings
    app.state.loaded_at = time.time()
    log.info("model swapped: %s -> %s", old.id, new.id)
    return new.id
