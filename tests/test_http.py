"""The HTTP listener: a real `diffucode serve --http` in a subprocess, spoken to by real clients.

The `openai` package (plain and streamed, with suffix), the exact JSON bodies llama.vscode and
Continue post (from ggml-org/llama.vscode src/llama-server.ts `createRequestPayload`, and
continuedev/continue core/llm/llms/Ollama.ts `_getGenerateOptions` and OpenAI.ts `_streamFim`),
curl, and aiohttp for concurrent streams. Every answer is checked against the same request sent
over the socket: one scheduler and one model serve both.
"""

import asyncio
import json
import shutil
import socket
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from daemon_helpers import Daemon

from diffucode.daemon.engine.tiny import write_tiny_checkpoint
from diffucode.daemon.errors import InputError
from diffucode.daemon.rpc.snippets import snippet_block
from diffucode.daemon.serve.http import http_address, http_token

BEFORE, AFTER = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("http-model"))


class HttpDaemon(Daemon):
    def __init__(self, model, workdir, *extra):
        self.port = free_port()
        self.http_token_file = workdir / "http.token"
        super().__init__(model, workdir, "--no-watch", "--http", f"127.0.0.1:{self.port}",
                         "--http-token-file", str(self.http_token_file), *extra)
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = self.http_token_file.read_text().strip()

    def post(self, path, body, token=None, raw: bytes | None = None, headers=None, timeout=60):
        """(status, headers, body bytes) of one POST; errors are answers too."""
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.token if token is None else token}",
            **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def get(self, path, token=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def status(self):
        conn = self.connect()
        try:
            return conn.call("status")
        finally:
            conn.close()

    def socket_infill(self, before, after, **sampling):
        conn = self.connect()
        try:
            err, result = conn.reply(conn.request("infill", {"before": before, "after": after,
                                                              "sampling": {"max_new_tokens": TOKENS, **sampling}}))
        finally:
            conn.close()
        assert err is None, err
        return result["text"]


@pytest.fixture(scope="module")
def daemon(model_dir, tmp_path_factory):
    d = HttpDaemon(model_dir, tmp_path_factory.mktemp("http-daemon"))
    yield d
    d.stop()


def sse(data: bytes) -> list:
    """The payloads of `data:` events, JSON-decoded ([DONE] kept as the string)."""
    out = []
    for line in data.decode().split("\n"):
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_health_public_everything_else_needs_the_token(daemon):
    assert daemon.get("/health") == (200, {"status": "ok"})
    assert stat.S_IMODE(daemon.http_token_file.stat().st_mode) == 0o600 and len(daemon.token) >= 32
    for token in (None, "wrong-token"):
        status, body = daemon.get("/v1/models", token)
        assert status == 401 and body["error"]["type"] == "authentication_error"
        status, _, raw = daemon.post("/infill", {"input_prefix": "x"}, token=token or "")
        assert status == 401 and "Bearer" in json.loads(raw)["error"]["message"]
    status, body = daemon.get("/v1/models", daemon.token)
    assert status == 200 and body["object"] == "list" and body["data"][0]["object"] == "model"


def test_openai_package_plain_streamed_and_alternatives(daemon):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.token, max_retries=0, timeout=60)
    plain = client.completions.create(model="diffucode", prompt=BEFORE, suffix=AFTER, max_tokens=TOKENS)
    choice = plain.choices[0]
    assert plain.object == "text_completion" and choice.index == 0 and choice.finish_reason in ("stop", "length")
    assert choice.text == daemon.socket_infill(BEFORE, AFTER)  # the same scheduler and model as the socket
    assert plain.usage.completion_tokens <= TOKENS
    # the prompt: the code before and after the model saw, in tokens
    assert plain.usage.prompt_tokens > 0 and plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    stream = client.completions.create(model="diffucode", prompt=BEFORE, suffix=AFTER, max_tokens=TOKENS,
                                       stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason

    three = client.completions.create(model="diffucode", prompt=BEFORE, suffix=AFTER, max_tokens=TOKENS, n=3)
    # an infill with n > 1: the daemon's alternatives, distinct, ranked best first, the greedy one among them
    texts = [c.text for c in three.choices]
    assert [c.index for c in three.choices] == list(range(len(texts))) and 1 <= len(texts) <= 3
    assert len(set(texts)) == len(texts) and choice.text in texts

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=daemon.url + "/v1", api_key="nope", max_retries=0).completions.create(
            model="diffucode", prompt=BEFORE, suffix=AFTER, max_tokens=TOKENS)


def test_llama_vscode_infill_body(daemon):
    # llama.vscode src/llama-server.ts createRequestPayload(noPredict=false), n_predict kept small
    chunks = [{"filename": "util/math.py", "text": "def square(x):\n    return x * x\n"}]
    body = {"input_prefix": "def add(a, b):\n", "input_suffix": "\n\nprint(add(1, 2))\n", "input_extra": chunks,
            "prompt": "    return ", "n_predict": TOKENS, "top_k": 40, "top_p": 0.99, "stream": False,
            "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": 4,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 30000}
    status, headers, raw = daemon.post("/infill", body)
    assert status == 200, raw
    data = json.loads(raw)
    # what llama.vscode reads: content, then its status bar's fields
    assert isinstance(data["content"], str) and data["stop"] is True and data["truncated"] is False
    assert isinstance(data["tokens_cached"], int) and data["generation_settings"]["n_ctx"] > 0
    for key in ("prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second"):
        assert isinstance(data["timings"][key], (int, float)), key
    assert data["tokens_evaluated"] == data["timings"]["prompt_n"] > 0
    long = {"input_prefix": "x = 1\n" * 2000, "input_suffix": AFTER, "n_predict": 4}  # more than the model's positions
    status, _, raw = daemon.post("/infill", long)
    assert status == 200 and json.loads(raw)["truncated"] is True
    # input_extra laid out as the language server lays out snippets, before the prefix and prompt
    before = snippet_block("util/math.py", chunks[0]["text"], "python", 10**6) + BEFORE
    assert data["content"] == daemon.socket_infill(before, AFTER, top_k=40, top_p=0.99)

    streamed = daemon.post("/infill", {**body, "stream": True})
    events = sse(streamed[2])
    assert streamed[0] == 200 and events[-1]["stop"] is True and "[DONE]" not in events
    assert "".join(e["content"] for e in events) == data["content"]

    # the ring-buffer warm-up llama.vscode sends (noPredict): answered at once, nothing run
    warm = {"input_prefix": "", "input_suffix": "", "input_extra": chunks, "prompt": "", "n_predict": 0,
            "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1}
    status, _, raw = daemon.post("/infill", warm)
    assert status == 200 and json.loads(raw)["content"] == ""


def test_continue_ollama_and_fim_bodies(daemon):
    # Continue core/llm/llms/Ollama.ts: /api/show first (FIM when the template mentions .Suffix)
    status, _, raw = daemon.post("/api/show", {"name": "diffucode"})
    assert status == 200 and ".Suffix" in json.loads(raw)["template"]
    # _getGenerateOptions(options, prefix, suffix): stream defaults to true in Ollama
    body = {"model": "diffucode", "prompt": BEFORE, "suffix": AFTER, "raw": True,
            "options": {"temperature": 0, "top_p": 0.9, "top_k": 40, "num_predict": TOKENS,
                        "stop": ["\n\n\n"], "num_ctx": 4096, "min_p": 0.05},
            "keep_alive": 1800}
    status, headers, raw = daemon.post("/api/generate", body)
    assert status == 200 and headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in raw.decode().splitlines() if line]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] in ("stop", "length")
    assert all(line["done"] is False for line in lines[:-1])
    text = "".join(line["response"] for line in lines)
    expected = daemon.socket_infill(BEFORE, AFTER, top_p=0.9, top_k=40)
    assert text == expected.split("\n\n\n")[0]
    status, _, raw = daemon.post("/api/generate", {**body, "stream": False})
    assert status == 200 and json.loads(raw)["response"] == text
    assert json.loads(raw)["prompt_eval_count"] > 0 and lines[-1]["prompt_eval_count"] > 0

    # OpenAI.ts _streamFim: POST <apiBase>fim/completions, reads choices[0].delta.content
    fim = {"model": "diffucode", "prompt": BEFORE, "suffix": AFTER, "max_tokens": TOKENS, "temperature": 0,
           "top_p": 1, "frequency_penalty": 0, "presence_penalty": 0, "stop": [], "stream": True}
    status, _, raw = daemon.post("/v1/fim/completions", fim)
    events = sse(raw)
    assert status == 200 and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"]["content"] for e in events[:-1]) == daemon.socket_infill(BEFORE, AFTER)


def test_zed_and_other_fim_formatted_prompts(daemon):
    # Zed crates/edit_prediction: open_ai_compatible_api posts RawCompletionRequest {model, prompt,
    # max_tokens, temperature, stop, environment} with the prompt laid out by format_fim_prompt (qwen)
    stops = ["<|endoftext|>", "<|file_separator|>", "<|fim_pad|>", "<|fim_prefix|>", "<|fim_middle|>",
             "<|fim_suffix|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<PRE>", "<SUF>", "<MID>",
             "[PREFIX]", "[SUFFIX]"]
    zed = {"model": "diffucode", "prompt": f"<|fim_prefix|>{BEFORE}<|fim_suffix|>{AFTER}<|fim_middle|>",
           "max_tokens": TOKENS, "temperature": None, "stop": stops, "environment": None}
    status, _, raw = daemon.post("/v1/completions", zed)
    expected = daemon.socket_infill(BEFORE, AFTER)
    assert status == 200 and json.loads(raw)["choices"][0]["text"] == expected
    # llm.nvim and the like: DeepSeek markers in a raw Ollama prompt
    ollama = {"model": "diffucode", "prompt": f"<\uff5cfim\u2581begin\uff5c>{BEFORE}<\uff5cfim\u2581hole\uff5c>"
                                              f"{AFTER}<\uff5cfim\u2581end\uff5c>",
              "raw": True, "stream": False, "options": {"num_predict": TOKENS}}
    status, _, raw = daemon.post("/api/generate", ollama)
    assert status == 200 and json.loads(raw)["response"] == expected


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl(daemon):
    out = subprocess.run(["curl", "-sS", "--fail-with-body", f"{daemon.url}/infill",
                          "-H", f"Authorization: Bearer {daemon.token}", "-H", "Content-Type: application/json",
                          "-d", json.dumps({"input_prefix": BEFORE, "input_suffix": AFTER, "n_predict": TOKENS})],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    assert json.loads(out.stdout)["content"] == daemon.socket_infill(BEFORE, AFTER)


def test_wrong_types_name_the_field_unknown_fields_are_ignored(daemon):
    cases = [("/v1/completions", {"prompt": "x", "max_tokens": "8"}, "max_tokens"),
             ("/v1/completions", {"prompt": 3}, "prompt"),
             ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
             ("/infill", {"input_prefix": "x", "input_extra": [{"filename": "a.py", "text": 5}]},
              "input_extra[0].text"),
             ("/infill", {"input_prefix": "x", "n_predict": True}, "n_predict"),
             ("/api/generate", {"prompt": "x", "options": {"temperature": "hot"}}, "options.temperature")]
    for path, body, name in cases:
        status, _, raw = daemon.post(path, body)
        assert status == 400, (path, body, raw)
        assert name in raw.decode() and "Traceback" not in raw.decode()
    status, _, raw = daemon.post("/v1/completions", {"prompt": "x", "max_tokens": 100000})
    message = json.loads(raw)["error"]["message"]
    assert status == 413 and "max_tokens" in message and "1024" in message
    status, _, raw = daemon.post("/v1/completions", None, raw=b"{not json")
    assert status == 400 and "not JSON" in json.loads(raw)["error"]["message"]
    extra = {"prompt": BEFORE, "suffix": AFTER, "max_tokens": TOKENS, "logit_bias": {"1": 2}, "best_of": 1,
             "user": "me", "frobnicate": [1, {"a": None}]}
    status, _, raw = daemon.post("/v1/completions", extra)
    assert status == 200 and json.loads(raw)["choices"][0]["text"] == daemon.socket_infill(BEFORE, AFTER)


def test_closing_the_connection_cancels_within_a_step(daemon):
    def lines(text):
        return [line for line in daemon.log_text().splitlines() if text in line]

    before = daemon.status()["counters"]["cancelled"]
    stops_before, closes_before = len(lines("cancelled after")), len(lines("the client went away after"))
    body = json.dumps({"prompt": "x", "suffix": "y", "max_tokens": 1000, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", daemon.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + daemon.token.encode() + b"\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert s.recv(4096).startswith(b"HTTP/1.1 200")  # headers come first; the canvas is still denoising
    deadline = time.monotonic() + 30
    while daemon.status()["queue"]["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    s.close()
    # the log says when the server saw the close, and when the model thread stopped (the status
    # counters are read without a lock, so the log is the exact record of both)
    while len(lines("cancelled after")) == stops_before or len(lines("the client went away after")) == closes_before:
        assert time.monotonic() < deadline, "closing the connection did not cancel the request"
        time.sleep(0.05)
    at_close = int(lines("the client went away after")[-1].split("went away after ")[1].split()[0])
    stopped = int(lines("cancelled after")[-1].split("cancelled after ")[1].split()[0])
    assert "the HTTP client disconnected" in lines("cancelled after")[-1]
    assert at_close <= stopped <= at_close + 2 < 1000, (at_close, stopped)  # stopped within one step
    status = daemon.status()
    assert status["counters"]["cancelled"] == before + 1 and status["queue"]["running"] == 0
    assert daemon.socket_infill(BEFORE, AFTER) is not None  # the model thread is free again


def test_a_newer_request_of_a_group_supersedes_the_older(daemon):
    old = {}
    body = {"prompt": "x", "suffix": "y", "max_tokens": 1000}
    post = threading.Thread(target=lambda: old.update(reply=daemon.post(
        "/v1/completions", body, headers={"X-Diffucode-Group": "file:///a.py"})))
    post.start()
    deadline = time.monotonic() + 30
    while daemon.status()["queue"]["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status, _, raw = daemon.post("/v1/completions", {"prompt": BEFORE, "suffix": AFTER, "max_tokens": TOKENS},
                                 headers={"X-Diffucode-Group": "file:///a.py"})
    post.join(60)
    assert status == 200
    status, _, raw = old["reply"]
    assert status == 503 and "superseded" in json.loads(raw)["error"]["message"]


def test_concurrent_streams(daemon):
    aiohttp = pytest.importorskip("aiohttp")

    async def one(session, i):
        body = {"prompt": BEFORE, "suffix": AFTER + str(i), "max_tokens": TOKENS, "stream": True}
        async with session.post(daemon.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            return sse(await r.read())

    async def main():
        headers = {"Authorization": f"Bearer {daemon.token}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            return await asyncio.gather(*(one(session, i) for i in range(8)))

    for events in asyncio.run(main()):
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_address_and_token_rules(tmp_path):
    with pytest.raises(InputError, match="loopback"):
        http_address("0.0.0.0:8012", tmp_path / "t")
    with pytest.raises(InputError, match="HOST:PORT"):
        http_address("8012", tmp_path / "t")
    assert http_address("0.0.0.0:8012", tmp_path / "t", allow_remote=True).host == "0.0.0.0"
    assert http_address("[::1]:8012", tmp_path / "t").host == "::1"
    path = tmp_path / "sub" / "token"
    token = http_token(path)  # created, private, and the same on the next start
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and http_token(path) == token
    path.chmod(0o644)
    with pytest.raises(InputError, match="chmod 600"):
        http_token(path)
