"""Property-based run of the OpenAPI surface with schemathesis against a real server: no input may cause a
5xx, and every answer must match the documented statuses, content types and schemas.

Checks: every default one but "schema-valid request accepted", since a schema cannot say what makes an
uploaded file a valid network or dataset (random bytes in a schema-valid multipart body are rightly 415/422).
Every operation is fuzzed with schema-valid and schema-violating requests (``MAX_EXAMPLES`` of each), once
with generated path ids and once with the id of a real model; there is no stateful phase. Requests carry
the key of a throwaway tenant that owns that one model, so they reach past authentication.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.api.main import create_app
from tests.conftest import flush_namespace

MAX_EXAMPLES = int(os.environ.get("KRONLAP_FUZZ_EXAMPLES", "8"))
THROWAWAY_KEY = "fuzz-tenant-key-" + "f" * 24
AUTH = {"Authorization": f"Bearer {THROWAWAY_KEY}"}

schemathesis.serializer.alias("application/x-npy", "application/octet-stream")  # predict's binary body


@pytest.fixture(scope="module")
def api(tmp_path_factory, make_settings, redis_url, redis_namespace, run_server, exporters) -> Iterator[tuple]:
    flush_namespace(redis_url, redis_namespace)
    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "data"
    settings = make_settings(
        data_dir,
        api_keys={THROWAWAY_KEY: "fuzz"},
        max_request_bytes=256 * 1024,
        max_upload_bytes=1024 * 1024,
        max_predict_inputs=64,
        max_predict_samples=50,
    )
    with run_server(create_app(settings)) as server:
        torch.manual_seed(0)
        onnx = exporters["onnx"](torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.zeros(1, 4))
        r = httpx.post(f"{server.url}/v1/models", files={"file": ("m.onnx", onnx)}, headers=AUTH, timeout=60)
        assert r.status_code == 201, r.text
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json"), r.json()["id"]
    flush_namespace(redis_url, redis_namespace)


def _fuzz(operation, mode: GenerationMode, path_parameters: dict | None, failures: list[str]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=[Phase.explicit, Phase.generate],
    )
    def run(case) -> None:
        case.call_and_validate(headers=AUTH, timeout=60, excluded_checks=[positive_data_acceptance])

    try:
        run()
    except Unsatisfiable:  # nothing in this operation's request can be made schema-violating
        pass
    except (Exception, BaseExceptionGroup) as exc:  # every failing operation is reported, not only the first
        failures.append(f"{operation.label} [{mode.value}, ids={path_parameters}]: {exc}")


@pytest.mark.slow
def test_no_5xx_and_answers_match_the_schema(api) -> None:
    schema, model_id = api
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:
        names = {p.name for p in operation.path_parameters}
        real = {"model_id": model_id} if names == {"model_id"} else None
        negatable = operation.body or operation.query
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if negatable else (GenerationMode.POSITIVE,):
            for ids in (None, real) if real else (None,):
                _fuzz(operation, mode, ids, failures)
    assert not failures, "\n\n".join(failures)
