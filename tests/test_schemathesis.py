"""A bounded schemathesis run against the live server's OpenAPI document (issue 17): every
documented operation gets generated requests, fitting the schema and not, and none may be
answered with a 5xx.

Bounded for CI: a few examples per operation and mode, derandomized (the same cases every
run), answers capped at a few tokens (the server's ``answer_max_tokens`` is 7 and generated
``max_tokens`` are clamped to 4). Schemathesis's pytest plugin is not used (it does not run
on this pytest); the operations' strategies are driven by hypothesis directly."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from tests.conftest import H

EXAMPLES = 10  # per operation and mode


def _bounded(body):
    if isinstance(body, dict):
        for k in ("max_tokens", "max_completion_tokens"):
            if k in body:
                body[k] = 4
        if body.get("n") not in (None, 1):
            body["n"] = 1
    return body


@pytest.mark.schemathesis
def test_no_server_errors(guarded_server):
    url = guarded_server.url
    api = schemathesis.openapi.from_url(url + "/openapi.json", headers=H, timeout=30)
    operations = [r.ok() for r in api.get_all_operations()]
    assert len(operations) >= 10
    seen: dict[tuple[str, str], set[int]] = {}
    failures: list[tuple] = []
    calls: list[int] = []

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                derandomize=True,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                case.body = _bounded(case.body)
                r = case.call(base_url=url, headers=H, timeout=120)
                seen.setdefault((case.method, case.path), set()).add(r.status_code)
                calls.append(r.status_code)
                if r.status_code >= 500:
                    failures.append((case.method, case.path, case.body, r.status_code, r.text))

            try:
                run()
            except Unsatisfiable:  # nothing to break in an operation without input
                assert mode == GenerationMode.NEGATIVE, (op.method, op.path)
    assert guarded_server.proc.poll() is None, guarded_server.log_tail()
    assert not failures, failures[:5]
    assert len(seen) == len(operations), seen
    assert len(calls) >= 8 * len(operations), len(calls)
