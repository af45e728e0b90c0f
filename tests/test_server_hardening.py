"""Limits of ``appliance serve`` against callers who try to lock it up (docs/adr/0009).

Each test is one reproduction that used to work: long prompts that tied up the run slots in
llama.cpp's tokenizer, connections that never finish a request head (with the open-file limit
lowered, so that they would exhaust it), a lone surrogate that gave a 500, and unauthenticated
bodies that were parsed before the 401. Real server on loopback, real llama.cpp, real sockets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from server_helpers import (
    MODEL_ID,
    LiveServer,
    chat_messages,
    live_server,
    load_model,
    requires_llama,
    wait_for,
    write_model,
)
from test_server_tls import make_pki, trusting

from appliance.server.holder import ModelHolder
from appliance.service import ServiceSpec, render_unit

pytestmark = requires_llama

SMALL_CONTEXT = 1024  # prompts that fit are prefilled in a moment, even on one thread
LONG_PROMPT = 300_000  # characters: well under the 4 MiB body limit
GREEDY: dict[str, Any] = {"temperature": 0.0, "seed": 1}
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def holder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelHolder]:
    path = write_model(tmp_path_factory.mktemp("hardening") / "tiny.gguf", context=SMALL_CONTEXT)
    made = ModelHolder(load_model(path, parallel=2, context=SMALL_CONTEXT))
    yield made
    made.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, holder: ModelHolder) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("hardening-root")
    with live_server(root, holder, max_concurrency=2, header_timeout_s=2.0) as live:
        yield live


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    assert isinstance(exc.body, dict), exc.body
    return exc.body


# -- 5: long prompts are refused before they are tokenized ------------------------------------


def test_long_prompts_do_not_lock_out_other_clients(server: LiveServer) -> None:
    # Two prompts of 300k characters on a server with two run slots. The tiny model's
    # vocabulary is all bytes, so llama.cpp's tokenizer takes its quadratic path on every
    # character ("é": two byte tokens): tens of seconds each, holding both slots, before
    # the context check. Refused untokenized, they cost nothing.
    client = server.client()
    refused: list[openai.BadRequestError] = []

    def long_chat() -> None:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=MODEL_ID, messages=chat_messages("é" * LONG_PROMPT), max_tokens=1
            )
        refused.append(caught.value)

    def long_completion() -> None:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=MODEL_ID, prompt="é" * LONG_PROMPT, max_tokens=1)
        refused.append(caught.value)

    attackers = [threading.Thread(target=long_chat), threading.Thread(target=long_completion)]
    for thread in attackers:
        thread.start()
    reply = client.chat.completions.create(
        model=MODEL_ID, messages=chat_messages(), max_tokens=4, **GREEDY
    )
    for thread in attackers:
        thread.join(timeout=60)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert len(refused) == 2
    for error in refused:
        assert error.status_code == 400
        assert error_of(error)["code"] == "context_length_exceeded"
        assert error_of(error)["type"] == "invalid_request_error"
        assert "bytes" in error_of(error)["message"]  # decided on bytes, not on tokens
    logged = [e for e in server.log_entries() if e["error"] == "context_length_exceeded"]
    assert [e["prompt_tokens"] for e in logged[-2:]] == [0, 0]


def test_the_byte_bound_never_refuses_a_prompt_that_fits(server: LiveServer) -> None:
    client = server.client()
    # Every character of this prompt is one byte and one token: it fits with room for one.
    fits = "a" * (SMALL_CONTEXT - 8)
    reply = client.completions.create(model=MODEL_ID, prompt=fits, max_tokens=1, **GREEDY)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > SMALL_CONTEXT - 8
    # Twice as long: within the byte bound, so it is tokenized and refused on its token count.
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL_ID, prompt=fits * 2, max_tokens=1)
    assert error_of(caught.value)["code"] == "context_length_exceeded"
    assert "tokens" in error_of(caught.value)["message"]


def test_long_embedding_inputs_are_refused_before_tokenizing(server: LiveServer) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL_ID, input=["short", "é" * LONG_PROMPT])
    assert error_of(caught.value)["code"] == "context_length_exceeded"
    assert len(client.embeddings.create(model=MODEL_ID, input="short").data) == 1


def test_a_client_that_leaves_the_queue_gives_up_its_place(tmp_path: Path) -> None:
    # Until the backend has taken a prompt (waiting for a slot, tokenizing) the route used
    # to watch nothing: a client gone meanwhile kept its place until a slot came free.
    made = ModelHolder(load_model(write_model(tmp_path / "long.gguf"), parallel=1))
    try:
        with live_server(tmp_path / "root", made, max_concurrency=1, max_queue=1) as live:
            running = live.client().chat.completions.create(
                model=MODEL_ID,
                messages=chat_messages(),
                max_tokens=16000,
                stream=True,
                **GREEDY,  # never picks the end token: runs for many seconds
            )
            next(iter(running))  # the one slot is taken, for many seconds

            def give_up_while_queued() -> None:
                with pytest.raises(httpx.TimeoutException), live.http(timeout=1.0) as http:
                    http.post(
                        "/v1/chat/completions",
                        json={"model": MODEL_ID, "messages": chat_messages(), "max_tokens": 2},
                    )

            leaver = threading.Thread(target=give_up_while_queued)
            leaver.start()
            leaver.join(timeout=30)
            wait_for(
                lambda: live.metric("appliance_queue_depth") == 0,
                timeout_s=15,
                what="the request of the client that left to leave the queue",
            )
            assert live.metric("appliance_in_flight") == 1  # the stream still runs
            running.close()
            wait_for(lambda: live.metric("appliance_in_flight") == 0, timeout_s=15, what="idle")
    finally:
        made.close()


# -- 8: a lone surrogate is a 400 naming the field ---------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": '
            '[{"type": "text", "text": "ok"}, {"type": "text", "text": "\\udfff"}]}]}',
            "messages[0].content[1].text",
        ),
        ("/v1/completions", '{"model": "tiny", "prompt": "\\ud800"}', "prompt"),
        ("/v1/completions", '{"model": "tiny", "prompt": ["x\\udc00"]}', "prompt[0]"),
        ("/v1/embeddings", '{"model": "tiny", "input": "\\ud800"}', "input"),
        ("/v1/embeddings", '{"model": "tiny", "input": ["a", "b\\ud83d"]}', "input[1]"),
        ("/v1/embeddings", '{"model": "tiny\\ud800", "input": "a"}', "model"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(
    server: LiveServer, caplog: pytest.LogCaptureFixture, path: str, body: str, param: str
) -> None:
    caplog.set_level(logging.ERROR)
    with server.http(headers={"Content-Type": "application/json"}) as http:
        response = http.post(path, content=body.encode("ascii"))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param in error["message"]
    assert "surrogate" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert not caplog.records  # no traceback in the server log
    # A well-formed pair is text, and fine.
    with server.http() as http:
        pair = {"model": MODEL_ID, "prompt": "\U0001f600", "max_tokens": 1}
        assert http.post("/v1/completions", json=pair).status_code == 200


# -- 12a: the key comes before the body ------------------------------------------------------


def test_unauthenticated_bodies_are_not_parsed(server: LiveServer) -> None:
    with server.http(key=None, headers={"Content-Type": "application/json"}) as http:
        not_json = http.post("/v1/chat/completions", content=b"{not json")
        huge = http.post("/v1/completions", content=b"x" * (5 * 1024 * 1024))
    for response in (not_json, huge):  # was: 400 invalid_json, 413
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    with server.http(headers={"Content-Type": "application/json"}) as http:
        assert http.post("/v1/chat/completions", content=b"{not json").status_code == 400


def test_a_body_never_sent_is_not_waited_for(server: LiveServer) -> None:
    # Headers that announce a body, then nothing: the 401 comes at once, not after a body.
    with _connect(server.url) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n"
        )
        sock.settimeout(20)
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 401 ")


# -- 6: connections that never finish a request head --------------------------------------------


def test_incomplete_request_heads_are_closed_after_the_header_timeout(
    server: LiveServer,
) -> None:
    timeout_s = server.settings.header_timeout_s
    slack_s = 15.0  # a loaded CI box; the point is "closed", not "closed fast"
    silent = [_connect(server.url) for _ in range(3)]
    partial = [_connect(server.url) for _ in range(3)]
    for sock in partial:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    # A keep-alive connection that made a request, then trickles the next head byte by byte:
    # each byte used to cancel uvicorn's keep-alive timer for good.
    trickler = _connect(server.url)
    trickler.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    trickler.settimeout(20)
    answer = b""
    while not answer.endswith(b'{"status":"ok"}'):  # all of it: what is left unread looks open
        answer += trickler.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200 ")
    opened = time.monotonic()
    assert server.client().models.list().data[0].id == MODEL_ID  # others are served meanwhile
    waiting = {*silent, *partial}
    next_head = iter(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 200)
    while (waiting or not _closed(trickler)) and time.monotonic() - opened < timeout_s + slack_s:
        waiting = {sock for sock in waiting if not _closed(sock)}
        if not _closed(trickler):
            with contextlib.suppress(OSError):  # closed since the look above
                trickler.send(bytes([next(next_head)]))
        time.sleep(0.25)
    assert not waiting, f"{len(waiting)} connections without a request head still open"
    assert _closed(trickler)
    for sock in [*silent, *partial, trickler]:
        sock.close()
    assert server.client().models.list().data[0].id == MODEL_ID


SERVE_WITH_FEW_FILES = r"""
import json, resource, sys
from pathlib import Path

tests, model, root, files, header_timeout, cert, key = sys.argv[1:8]
resource.setrlimit(resource.RLIMIT_NOFILE, (int(files), int(files)))
tls = {"tls_cert": Path(cert), "tls_key": Path(key)} if cert else {}
sys.path.insert(0, tests)
from server_helpers import live_server, load_model
from appliance.server.connections import connection_limits
from appliance.server.holder import ModelHolder

holder = ModelHolder(load_model(Path(model), parallel=1, context=1024))
limits = connection_limits(None)
timeout = float(header_timeout)
with live_server(Path(root), holder, max_concurrency=1, header_timeout_s=timeout, **tls) as live:
    print(json.dumps({"url": live.url, "key": live.key, "cap": limits.max_connections}))
    sys.stdout.flush()
    sys.stdin.read()  # serve until the test closes our stdin
holder.close()
"""


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_a_flood_of_incomplete_connections_does_not_starve_keyed_clients(
    tmp_path: Path, tls: bool
) -> None:
    """With TLS, the flood never finishes a handshake: the cap counts connections from
    accept(), not from the end of their handshake (appliance.server.connections)."""
    files = 256  # the open-file limit of the server: the flood is larger than that
    model = write_model(tmp_path / "tiny.gguf", context=SMALL_CONTEXT)
    pki = make_pki(tmp_path) if tls else None
    log_path = tmp_path / "server.log"
    with (
        log_path.open("w") as log,
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                SERVE_WITH_FEW_FILES,
                str(TESTS),
                str(model),
                str(tmp_path / "root"),
                str(files),
                "3600",  # deadlines far away: only the cap can save the keyed client
                str(pki.cert) if pki else "",
                str(pki.key) if pki else "",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        ) as child,
    ):
        assert child.stdin is not None
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 120)
        assert ready, "the server did not start"
        started = json.loads(child.stdout.readline())
        cap = started["cap"]
        assert cap < files
        flood: list[socket.socket] = []
        try:
            for _ in range(files + 100):
                try:
                    sock = _connect(started["url"], timeout_s=5.0)
                    # Half a request head, or the first bytes of a TLS ClientHello.
                    sock.sendall(b"\x16\x03\x01" if tls else b"GET /v1/models HTTP/1.1\r\n")
                except OSError:
                    continue  # the listen queue is full: the flood is not what we test
                flood.append(sock)
            assert len(flood) > cap
            client = openai.OpenAI(
                base_url=started["url"] + "/v1",
                api_key=started["key"],
                max_retries=0,
                timeout=60,
                http_client=httpx.Client(verify=trusting(pki)) if pki else None,
            )
            assert client.models.list().data[0].id == MODEL_ID
            reply = client.chat.completions.create(
                model=MODEL_ID, messages=chat_messages(), max_tokens=4, **GREEDY
            )
            assert reply.choices[0].finish_reason in ("stop", "length")
            # The oldest incomplete connections were closed to make room; never more than the
            # cap stay open.
            wait_for(
                lambda: sum(not _closed(sock) for sock in flood) <= cap,
                timeout_s=30,
                what="the connections over the cap to be closed",
            )
            assert not _closed(flood[-1])  # the newest are the ones kept
            assert _closed(flood[0])
        finally:
            for sock in flood:
                sock.close()
            child.stdin.close()
            child.wait(timeout=60)
    server_log = log_path.read_text()
    assert "out of system resource" not in server_log  # accept() never hit EMFILE
    assert "Too many open files" not in server_log


def test_the_unit_lifts_the_open_file_limit(tmp_path: Path) -> None:
    unit = render_unit(ServiceSpec(root=tmp_path))
    assert "LimitNOFILE=65536" in unit.splitlines()


# -- helpers ----------------------------------------------------------------------------------


def test_a_tls_handshake_is_inside_the_head_deadline(tmp_path: Path, holder: ModelHolder) -> None:
    """A connection that never finishes its handshake is closed at the head deadline, not at
    asyncio's 60 s handshake timeout; a real client is served meanwhile."""
    pki = make_pki(tmp_path)
    with live_server(
        tmp_path / "root", holder, header_timeout_s=1.0, tls_cert=pki.cert, tls_key=pki.key
    ) as live:
        silent, partial = _connect(live.url), _connect(live.url)
        partial.sendall(b"\x16\x03\x01\x00")
        opened = time.monotonic()
        with httpx.Client(verify=trusting(pki)) as http:
            assert live.client(http_client=http).models.list().data[0].id == MODEL_ID
        wait_for(
            lambda: _closed(silent) and _closed(partial),
            timeout_s=20.0,  # a loaded CI box; asyncio alone would wait 60 s
            what="the connections without a finished handshake to be closed",
        )
        assert time.monotonic() - opened < 30.0
        silent.close()
        partial.close()


def _connect(url: str, *, timeout_s: float = 10.0) -> socket.socket:
    host, port = url.removeprefix("http://").removeprefix("https://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout_s)


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (end of stream or reset); nothing is read."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except OSError:
        return True
    return data == b""
