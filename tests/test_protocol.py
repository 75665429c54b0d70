"""The typed HTTP protocol: /openapi.json documents request and response bodies, and real answers match it."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest
from pydantic import BaseModel

from helpers import SMALL, Running, wait_done
from zstudio.params import MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE, GenerationParams
from zstudio.server.app import create_app
from zstudio.server.protocol import Accepted, GenerationRequest, Health, HistoryPage, InvalidRequest, Job, UsedParams


@pytest.fixture(scope="module")
def served(generator, tmp_path_factory):
    runner = Running(create_app(generator, tmp_path_factory.mktemp("protocol-outputs"), ui=False))
    client = runner.__enter__()
    yield client
    runner.__exit__(None, None, None)


def matches(model: type[BaseModel], data: dict) -> None:
    """`data` is valid for `model` and has no key the model does not document."""
    model.model_validate(data)
    assert set(data) <= set(model.model_fields), set(data) - set(model.model_fields)


def schema_of(spec: dict, path: str, method: str, status: str) -> str:
    content = spec["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
    return content["$ref"].rsplit("/", 1)[1]


def test_request_fields_are_the_parameters_types_fields():
    names = [f.name for f in dataclasses.fields(GenerationParams)]
    assert list(GenerationRequest.model_fields) == names
    assert list(UsedParams.model_fields) == names


def test_openapi_types_request_and_response_bodies(served):
    spec = served.get("/openapi.json").json()
    body = spec["paths"]["/api/v1/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/GenerationRequest")
    width = spec["components"]["schemas"]["GenerationRequest"]["properties"]["width"]
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE)
    expected = {
        ("/api/v1/generations", "post", "202"): "Accepted",
        ("/api/v1/generations", "post", "422"): "InvalidRequest",
        ("/api/v1/generations", "post", "429"): "ErrorBody",
        ("/api/v1/generations/{job_id}", "get", "200"): "Job",
        ("/api/v1/generations/{job_id}", "get", "404"): "ErrorBody",
        ("/api/v1/generations/{job_id}", "delete", "200"): "Job",
        ("/api/v1/history", "get", "200"): "HistoryPage",
        ("/api/v1/history/{job_id}", "delete", "200"): "Deleted",
        ("/api/v1/health", "get", "200"): "Health",
        ("/api/v1/health", "get", "503"): "Health",
        ("/v1/images/generations", "post", "200"): "OpenAIImagesResponse",
        ("/v1/images/generations", "post", "400"): "OpenAIError",
    }
    assert {key: schema_of(spec, *key) for key in expected} == expected
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # every 422 is documented in our shape
    params = spec["components"]["schemas"]["UsedParams"]["properties"]
    assert (
        params["num_images"]["maximum"] == GenerationRequest.model_json_schema()["properties"]["num_images"]["maximum"]
    )


def test_real_answers_match_their_documented_types(served):
    accepted = served.post("/api/v1/generations", json={"prompt": "红色圆形", **SMALL, "num_inference_steps": 1})
    assert accepted.status_code == 202
    matches(Accepted, accepted.json())
    job = wait_done(served, accepted.json()["id"])
    matches(Job, job)
    matches(UsedParams, job["params"])
    page = served.get("/api/v1/history").json()
    matches(HistoryPage, page)
    for item in page["items"]:
        matches(Job, item)
    health = served.get("/api/v1/health").json()
    matches(Health, health)
    bad = served.post("/api/v1/generations", json={"prompt": "x", "width": 1000})
    assert bad.status_code == 422
    matches(InvalidRequest, bad.json())
    assert bad.json()["detail"][0]["loc"] == ["body", "width"]


def test_a_client_generated_from_the_schema_is_typed(served, tmp_path, monkeypatch):
    """datamodel-code-generator turns /openapi.json into pydantic models that check what the server checks."""
    codegen = pytest.importorskip("datamodel_code_generator")
    source = codegen.generate(
        served.get("/openapi.json").text,
        input_file_type=codegen.InputFileType.OpenAPI,
        output_model_type=codegen.DataModelType.PydanticV2BaseModel,
    )
    (tmp_path / "generated_client.py").write_text(source)
    spec = importlib.util.spec_from_file_location("generated_client", tmp_path / "generated_client.py")
    client = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "generated_client", client)  # pydantic resolves annotations through it
    spec.loader.exec_module(client)
    request = client.GenerationRequest(prompt="红色圆形", width=256, height=256, num_inference_steps=1)
    with pytest.raises(ValueError):
        client.GenerationRequest(prompt="x", width=1000)  # not a multiple of 16, as the server says
    accepted = served.post("/api/v1/generations", json=request.model_dump(mode="json", exclude_none=True))
    job = client.Job.model_validate(wait_done(served, client.Accepted.model_validate(accepted.json()).id))
    assert job.status.value == "done" and job.images[0].url.startswith("/api/v1/images/")
