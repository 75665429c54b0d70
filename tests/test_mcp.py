"""MCP for AI agents, through the official SDK's own client: streamable HTTP at /mcp on a real loopback server, and
stdio from `zstudio mcp` as a subprocess (forwarding to a server, or loading the tiny checkpoint itself)."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import sys
from pathlib import Path

import anyio
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from PIL import Image

from helpers import FINAL, TOKEN, Running, wait_for
from zstudio.engine import Generator
from zstudio.outputs import read_metadata
from zstudio.params import GenerationParams
from zstudio.server.app import create_app
from zstudio.server.guard import REFUSED_HEADER

SRC = Path(__file__).resolve().parents[1] / "src"
TOOLS = {"generate_image", "upscale_image", "list_history", "get_image", "server_status"}
REQUEST = {"prompt": "红色圆形", "width": 256, "height": 128, "num_inference_steps": 1, "seed": 7}


@pytest.fixture(scope="module")
def mcp_generator(tiny_dir):
    return Generator(model=str(tiny_dir), device="cpu").load()


def decoded(content) -> Image.Image:
    assert content.type == "image" and content.mime_type == "image/png"
    return Image.open(io.BytesIO(base64.b64decode(content.data)))


async def generate_and_check(session: ClientSession, outputs: Path | None) -> str:
    """Call generate_image as an agent would; check the image, the reply's text, and the saved file. Its name."""
    result = await session.call_tool("generate_image", REQUEST)
    assert not result.is_error, result.content
    text, image = result.content
    assert decoded(image).size == (256, 128)
    name = text.text.split("\t")[0]
    assert "seed=7" in text.text and f"zstudio://images/{name}" in text.text
    assert result.structured_content["params"]["seed"] == 7
    if outputs is not None:
        params = read_metadata(outputs / name)["params"]
        assert (params["prompt"], params["width"], params["height"], params["seed"]) == ("红色圆形", 256, 128, 7)
    return name


async def bad_width_names_the_field(session: ClientSession) -> None:
    for value, expected in ((1000, "width: 1000 is not a multiple of 16; use 992 or 1008"), ("abc", "width: ")):
        result = await session.call_tool("generate_image", {"prompt": "x", "width": value})
        assert result.is_error and result.content[0].text.startswith(expected)
        assert "\n" not in result.content[0].text


def test_http_tools_resources_and_errors(mcp_generator, tmp_path):
    outputs = tmp_path / "outputs"
    runner = Running(create_app(mcp_generator, outputs, token=TOKEN, ui=False, state=tmp_path / "state"))

    async def agent(url: str) -> None:
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
        async with http, streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = {tool.name: tool for tool in (await session.list_tools()).tools}
                assert set(tools) == TOOLS
                arguments = tools["generate_image"].input_schema["properties"]
                assert set(arguments) == {f.name for f in dataclasses.fields(GenerationParams)}
                assert arguments["width"]["multipleOf"] == 16 and arguments["width"]["description"]
                name = await generate_and_check(session, outputs)
                await bad_width_names_the_field(session)

                history = (await session.call_tool("list_history", {"limit": 5})).content[0].text
                assert name in history and "红色圆形" in history
                again = await session.call_tool("get_image", {"name": name})
                assert not again.is_error and decoded(again.content[1]).size == (256, 128)
                missing = await session.call_tool("get_image", {"name": "outputs_20260101000000.png"})
                assert missing.is_error and missing.content[0].text.startswith("name: ")
                assert '"status": "ok"' in (await session.call_tool("server_status", {})).content[0].text

                recent = (await session.read_resource("zstudio://images")).contents[0]
                assert f"zstudio://images/{name}" in recent.text
                blob = (await session.read_resource(f"zstudio://images/{name}")).contents[0]
                assert base64.b64decode(blob.blob) == (outputs / name).read_bytes()

    with runner as client:
        anyio.run(agent, f"{runner.url}/mcp")
        # The gate in front of every route covers /mcp: no token, no MCP.
        hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        refused = client.post("/mcp", json=hello, headers={"Accept": "application/json, text/event-stream"})
        assert refused.status_code == 401 and refused.headers[REFUSED_HEADER] == "token"
        foreign = client.post("/mcp", json=hello, headers={"Authorization": f"Bearer {TOKEN}", "Host": "evil.example"})
        assert foreign.status_code == 400 and foreign.headers[REFUSED_HEADER] == "host"


def stdio_params(*args: str) -> StdioServerParameters:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    return StdioServerParameters(command=sys.executable, args=["-m", "zstudio.cli", "mcp", *args], env=env)


async def stdio_agent(params: StdioServerParameters, errors: Path, outputs: Path | None) -> None:
    with errors.open("w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                assert {tool.name for tool in (await session.list_tools()).tools} == TOOLS
                await generate_and_check(session, outputs)
                await bad_width_names_the_field(session)


def test_stdio_forwards_to_a_running_server(mcp_generator, tmp_path):
    outputs = tmp_path / "outputs"
    runner = Running(create_app(mcp_generator, outputs, token=TOKEN, ui=False, state=tmp_path / "state"))
    with runner as client:
        params = stdio_params("--server", runner.url, "--token", TOKEN)
        try:
            anyio.run(stdio_agent, params, tmp_path / "stderr.txt", outputs)
        finally:
            print((tmp_path / "stderr.txt").read_text())
        assert client.get("/api/v1/history", headers={"Authorization": f"Bearer {TOKEN}"}).json()["total"] == 1


def test_stdio_loads_the_engine_itself(tiny_dir, tmp_path):
    outputs = tmp_path / "outputs"
    params = stdio_params("--model", str(tiny_dir), "--device", "cpu", "--outputs", str(outputs),
                          "--state", str(tmp_path / "state"))  # fmt: skip
    try:
        anyio.run(stdio_agent, params, tmp_path / "stderr.txt", outputs)
    finally:
        print((tmp_path / "stderr.txt").read_text())


def test_sdk_client_without_the_token_cannot_connect(mcp_generator, tmp_path):
    runner = Running(create_app(mcp_generator, tmp_path / "outputs", token=TOKEN, ui=False, state=tmp_path / "s"))

    async def agent(url: str) -> None:
        async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
            with anyio.fail_after(20):
                await session.initialize()

    with runner:
        with pytest.raises(Exception) as refused:  # an ExceptionGroup from the client's task groups
            anyio.run(agent, f"{runner.url}/mcp")
        assert refused.group_contains(MCPError, depth=None, match="error response")


def test_an_abandoned_call_cancels_its_job(mcp_generator, tmp_path):
    runner = Running(create_app(mcp_generator, tmp_path / "outputs", ui=False, state=tmp_path / "state"))
    long_job = {"prompt": "x", "width": 768, "height": 768, "num_inference_steps": 100}  # many seconds on a CPU

    async def impatient_agent(url: str) -> None:
        async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            with pytest.raises(MCPError, match="[Tt]imed out"):
                await session.call_tool("generate_image", long_job, read_timeout_seconds=1.0)

    with runner as client:
        anyio.run(impatient_agent, f"{runner.url}/mcp")
        job = wait_for(lambda: (j := client.get("/api/v1/history").json()["items"][0])["status"] in FINAL and j)
        assert job["status"] == "cancelled" and job["step"] < 100
