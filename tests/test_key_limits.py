"""Scopes and limits of API keys: the key file, the limiter, ``appliance keys``, and a live
server answering 403 and 429 (with ``Retry-After``) to the official ``openai`` client."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from click.testing import CliRunner, Result
from server_helpers import (
    HAVE_LLAMA,
    LLAMA_MISSING,
    MODEL_ID,
    TEST_KEY_NAME,
    LiveServer,
    chat_messages,
    live_server,
    load_model,
    write_model,
)

from appliance.apikeys import KeyLimits, KeyStore, key_file
from appliance.cli import cli
from appliance.server.holder import ModelHolder
from appliance.server.ratelimit import (
    BUCKET_S,
    KeyLimiter,
    RequestRateError,
    TokenQuotaError,
)
from appliance.server.requestlog import RequestLog
from signing.errors import InputError, IntegrityError


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


# -- the limiter --------------------------------------------------------------------------------


def test_requests_per_minute_is_a_bucket_of_rpm_refilled_over_a_minute() -> None:
    clock = Clock()
    limiter = KeyLimiter(clock=clock)
    limits = KeyLimits(rpm=3)
    for _ in range(3):
        limiter.admit("a", limits)
    with pytest.raises(RequestRateError) as caught:
        limiter.admit("a", limits)
    assert caught.value.status == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.type == "requests"
    assert caught.value.headers() == {"Retry-After": "20"}  # one request per 20 s comes back
    limiter.admit("b", limits)  # another key has its own bucket
    clock.now += 15
    with pytest.raises(RequestRateError) as caught:
        limiter.admit("a", limits)
    assert caught.value.retry_after_s == 5
    clock.now += 5
    limiter.admit("a", limits)  # the refill came
    clock.now += 3600
    for _ in range(3):  # a full bucket again, never more than rpm
        limiter.admit("a", limits)
    with pytest.raises(RequestRateError):
        limiter.admit("a", limits)
    limiter.admit("a", KeyLimits())  # no limit: always admitted


def test_tokens_per_day_is_a_rolling_window_of_hourly_buckets() -> None:
    clock = Clock(start=10 * BUCKET_S + 100)  # 100 s into an hour
    limiter = KeyLimiter(clock=clock)
    limits = KeyLimits(tokens_per_day=100)
    limiter.admit("a", limits)
    limiter.charge("a", 60)
    clock.now += 2 * BUCKET_S
    limiter.admit("a", limits)
    limiter.charge("a", 50)  # 110: this request crossed the limit, and ran to its end
    assert limiter.tokens_used("a") == 110
    with pytest.raises(TokenQuotaError) as caught:
        limiter.admit("a", limits)
    assert caught.value.type == "tokens"
    # The first 60 tokens leave the window 24 h after the start of their hour: 100 s + 2 h ago.
    assert caught.value.retry_after_s == 22 * BUCKET_S - 100
    clock.now += 22 * BUCKET_S - 100
    assert limiter.tokens_used("a") == 50
    limiter.admit("a", limits)
    clock.now += 3 * BUCKET_S
    assert limiter.tokens_used("a") == 0


def test_restored_tokens_expire_when_their_hour_leaves_the_window() -> None:
    clock = Clock(start=50 * BUCKET_S + 600)  # 10 min into an hour
    limiter = KeyLimiter(clock=clock)
    charged = limiter.restore(
        [
            ("a", 23 * BUCKET_S, 40),  # ended 23 h ago: leaves the window within the hour
            ("a", 60.0, 30),  # a minute ago
            ("b", 24 * BUCKET_S, 99),  # a day ago: out of the window, nothing charged
            ("c", 5.0, 0),
        ]
    )
    assert charged == 1
    assert (limiter.tokens_used("a"), limiter.tokens_used("b")) == (70, 0)
    with pytest.raises(TokenQuotaError) as caught:
        limiter.admit("a", KeyLimits(tokens_per_day=70))
    assert caught.value.retry_after_s <= BUCKET_S  # the 23 h old tokens go first
    clock.now += BUCKET_S
    assert limiter.tokens_used("a") == 30
    limiter.admit("a", KeyLimits(tokens_per_day=70))


def test_the_request_log_gives_the_last_days_usage_across_rotated_files(tmp_path: Path) -> None:
    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)

    def at(hours_ago: float, key: str | None, tokens: int, latency_ms: int = 0) -> dict[str, Any]:
        time = (now - timedelta(hours=hours_ago)).isoformat().replace("+00:00", "Z")
        return {
            "time": time,
            "key": key,
            "route": "/v1/chat/completions",
            "status": 200,
            "prompt_tokens": tokens,
            "completion_tokens": 1,
            "latency_ms": latency_ms,
        }

    log = RequestLog(tmp_path / "requests.jsonl", max_bytes=600)  # a few records per file
    log.open()
    try:
        for entry in [
            at(30, "a", 1000),  # in a file wholly before the window: not even read
            at(29, "a", 1000),
            at(25, "a", 1000),
            at(24.01, "a", 9, latency_ms=60_000),  # ended within the window
            at(23, "a", 9),
            at(2, None, 50),  # a public path: no key
            at(1, "b", 4),
            at(0.5, "a", 9),
            at(-1, "b", 4),  # from a clock ahead: counted as now
        ]:
            log.write(entry)
    finally:
        log.close()
    assert len(log.files.rotated()) >= 2
    used: dict[str, int] = {}
    for key, age, tokens in log.recent_usage(24 * 3600.0, now=now):
        assert 0 <= age < 24 * 3600
        used[key] = used.get(key, 0) + tokens
    assert used == {"a": 30, "b": 10}
    assert RequestLog(tmp_path / "x.jsonl", sinks=("stdout",)).recent_usage(86400.0) == []


def test_a_refused_request_counts_nothing() -> None:
    clock = Clock()
    limiter = KeyLimiter(clock=clock)
    limiter.charge("a", 10)
    both = KeyLimits(rpm=1, tokens_per_day=10)
    with pytest.raises(TokenQuotaError):
        limiter.admit("a", both)
    limiter.admit("a", KeyLimits(rpm=1))  # the refusal above took no request from the bucket


def test_the_limiter_is_exact_under_threads() -> None:
    limiter = KeyLimiter(clock=Clock())  # time stands still: no refill during the race
    limits = KeyLimits(rpm=500)
    admitted: list[int] = []
    refused: list[int] = []

    def hammer() -> None:
        for _ in range(100):
            try:
                limiter.admit("shared", limits)
            except RequestRateError:
                refused.append(1)
            else:
                admitted.append(1)
                limiter.charge("shared", 1)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(admitted), len(refused)) == (500, 300)
    assert limiter.tokens_used("shared") == 500


# -- the key file -------------------------------------------------------------------------------


def test_scopes_match_groups_and_path_prefixes_at_a_boundary() -> None:
    limits = KeyLimits(scopes=("embeddings", "/v1/models"), models=("tiny",))
    assert limits.allows_path("/v1/embeddings")
    assert limits.allows_path("/api/embed")
    assert limits.allows_path("/api/embeddings")
    assert limits.allows_path("/v1/models")
    assert limits.allows_path("/v1/models/tiny")
    assert not limits.allows_path("/v1/modelsx")
    assert not limits.allows_path("/v1/chat/completions")
    assert not limits.allows_path("/metrics")
    assert KeyLimits(scopes=("/api/embed",)).allows_path("/api/embed")
    assert not KeyLimits(scopes=("/api/embed",)).allows_path("/api/embeddings")
    assert KeyLimits(scopes=("ollama",)).allows_path("/api/version")
    assert limits.allows_model("tiny")
    assert limits.allows_model("tiny:latest")  # Ollama's default tag
    assert not limits.allows_model("tiny:q8")
    assert not limits.allows_model("other")
    assert KeyLimits().allows_path("/anything")
    assert KeyLimits().allows_model("anything")
    with pytest.raises(InputError, match="rpm must be a whole number of at least 1"):
        KeyLimits(rpm=0)
    with pytest.raises(InputError, match="tokens per day must be a whole number of at least 1"):
        KeyLimits(tokens_per_day=-1)
    with pytest.raises(InputError, match="neither a path prefix"):
        KeyLimits(scopes=("chats",))
    with pytest.raises(InputError, match="model id"):
        KeyLimits(models=("has space",))


def test_old_key_files_read_as_unrestricted_and_scoped_files_are_version_2(
    tmp_path: Path,
) -> None:
    path = key_file(tmp_path)
    store = KeyStore(path)
    store.add("plain")
    assert json.loads(path.read_text())["version"] == 1  # what older appliances read
    (plain,) = store.list()
    assert plain.limits == KeyLimits()
    store.add("batch", KeyLimits(scopes=("embeddings",), rpm=60))
    doc = json.loads(path.read_text())
    assert doc["version"] == 2  # older appliances refuse it rather than drop its limits
    assert doc["keys"][0] == {k: doc["keys"][0][k] for k in ("name", "sha256", "created")}
    assert doc["keys"][1]["scopes"] == ["embeddings"]
    assert doc["keys"][1]["rpm"] == 60
    assert "tokens_per_day" not in doc["keys"][1]
    changed = store.update_limits("batch", lambda _old: KeyLimits())
    assert changed.limits == KeyLimits()
    assert json.loads(path.read_text())["version"] == 1
    with pytest.raises(InputError, match="no API key named 'nobody'"):
        store.update_limits("nobody", lambda old: old)


@pytest.mark.parametrize(
    "entry",
    [
        {"rpm": "60"},
        {"rpm": 0},
        {"tokens_per_day": True},
        {"scopes": "chat"},
        {"scopes": ["nonsense"]},
        {"models": [1]},
    ],
)
def test_damaged_limits_are_refused(tmp_path: Path, entry: dict[str, Any]) -> None:
    path = key_file(tmp_path)
    KeyStore(path).add("a", KeyLimits(rpm=1))
    doc = json.loads(path.read_text())
    doc["keys"][0].update(entry)
    path.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="damaged"):
        KeyStore(path).list()


# -- appliance keys -----------------------------------------------------------------------------


def test_keys_create_limit_and_list(tmp_path: Path) -> None:
    runner = CliRunner()

    def keys(*args: str) -> Result:
        return runner.invoke(cli, ["--root", str(tmp_path), "keys", *args], catch_exceptions=False)

    assert keys("add", "plain").exit_code == 0
    made = keys(
        "create", "alice", "--scope", "chat,embeddings", "--scope", "/v1/models",
        "--model", MODEL_ID, "--rpm", "60", "--tokens-per-day", "100000",
    )  # fmt: skip
    assert made.exit_code == 0
    key = made.stdout.strip()
    assert KeyStore(key_file(tmp_path)).verify(key) == "alice"
    listed = keys("list").stdout.splitlines()
    assert listed[0].startswith("plain  created ")
    assert listed[0].endswith("  scopes=any models=any rpm=unlimited tokens/day=unlimited")
    assert listed[1].endswith(
        f"  scopes=chat,embeddings,/v1/models models={MODEL_ID} rpm=60 tokens/day=100000"
    )
    changed = keys("limit", "alice", "--rpm", "10", "--clear", "scope", "--clear", "model")
    assert changed.stdout == ("API key 'alice': scopes=any models=any rpm=10 tokens/day=100000\n")
    entries = {e["name"]: e for e in json.loads(keys("list", "--json").stdout)}
    assert entries["alice"]["rpm"] == 10
    assert entries["alice"]["tokens_per_day"] == 100000
    assert entries["alice"]["scopes"] == []
    assert entries["plain"] == {
        "name": "plain",
        "created": entries["plain"]["created"],
        "scopes": [],
        "models": [],
        "rpm": None,
        "tokens_per_day": None,
    }
    assert KeyStore(key_file(tmp_path)).verify(key) == "alice"  # the same key, new limits


def test_keys_limit_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    KeyStore(key_file(tmp_path)).add("alice")

    def appliance(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance", "--root", str(tmp_path), "keys", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    expected = {
        ("limit", "alice"): (
            "nothing to change: give --scope, --model, --rpm, --tokens-per-day or --clear"
        ),
        ("limit", "alice", "--rpm", "5", "--clear", "rpm"): (
            "--clear rpm and --rpm at once: give one of them"
        ),
        ("limit", "bob", "--rpm", "5"): "no API key named 'bob'",
        ("create", "bob", "--scope", "everything"): (
            "scope 'everything' is neither a path prefix ('/v1/chat') nor one of chat, "
            "completions, embeddings, models, openai, ollama, metrics, health, docs"
        ),
    }
    for args, message in expected.items():
        result = appliance(*args)
        assert (result.returncode, result.stderr) == (2, f"error: {message}\n"), args
    assert appliance("limit", "alice", "--rpm", "0").returncode == 2  # click's range check


# -- a live server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    if not HAVE_LLAMA:
        pytest.skip(LLAMA_MISSING)
    base = tmp_path_factory.mktemp("limits")
    holder = ModelHolder(load_model(write_model(base / "tiny.gguf"), parallel=1))
    with live_server(base / "root", holder, max_concurrency=1) as live:
        yield live
    holder.close()


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    assert isinstance(exc.body, dict), exc.body
    return exc.body


def test_rpm_answers_429_with_retry_after(server: LiveServer) -> None:
    key = server.keys().add("rpm3", KeyLimits(rpm=3))
    client = server.client(key=key)
    for _ in range(3):
        assert [m.id for m in client.models.list()] == [MODEL_ID]
    with pytest.raises(openai.RateLimitError) as caught:
        client.models.list()
    assert caught.value.status_code == 429
    retry_after = int(caught.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 20  # one request comes back every 60/3 s
    body = error_of(caught.value)
    assert body["code"] == "rate_limit_exceeded"
    assert body["type"] == "requests"
    assert body["message"] == (
        "Rate limit reached for key 'rpm3' on requests per min (RPM): Limit 3."
    )
    entry = server.last_entry("/v1/models")
    assert (entry["key"], entry["status"], entry["error"]) == ("rpm3", 429, "rate_limit_exceeded")
    server.client().models.list()  # other keys are not touched
    # The operator lifts the limit; the running server applies it on the next request.
    server.keys().update_limits("rpm3", lambda _old: KeyLimits())
    client.models.list()


def test_tokens_per_day_answers_429_once_used_up(server: LiveServer) -> None:
    key = server.keys().add("tpd", KeyLimits(tokens_per_day=8))
    client = server.client(key=key)
    first = client.chat.completions.create(
        model=MODEL_ID, messages=chat_messages(), max_tokens=3, temperature=0
    )
    assert first.usage is not None
    assert first.usage.total_tokens >= 8, "the test needs one request to use up the quota"
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL_ID, messages=chat_messages(), max_tokens=1)
    body = error_of(caught.value)
    assert (body["code"], body["type"]) == ("rate_limit_exceeded", "tokens")
    assert body["message"] == (
        "Rate limit reached for key 'tpd' on tokens per day (TPD): "
        f"Limit 8, Used {first.usage.total_tokens}."
    )
    assert 22 * 3600 < int(caught.value.response.headers["retry-after"]) <= 24 * 3600


def test_a_restart_keeps_the_days_tokens(tmp_path: Path) -> None:
    if not HAVE_LLAMA:
        pytest.skip(LLAMA_MISSING)
    holder = ModelHolder(load_model(write_model(tmp_path / "tiny.gguf"), parallel=1))
    root = tmp_path / "root"
    try:
        with live_server(root, holder, max_concurrency=1) as first:
            key = first.keys().add("tpd", KeyLimits(tokens_per_day=8))
            reply = first.client(key=key).chat.completions.create(
                model=MODEL_ID, messages=chat_messages(), max_tokens=3, temperature=0
            )
            assert reply.usage is not None and reply.usage.total_tokens >= 8
            first.keys().revoke(TEST_KEY_NAME)  # the next live_server makes its own
        with live_server(root, holder, max_concurrency=1) as second:
            with pytest.raises(openai.RateLimitError) as caught:
                second.client(key=key).models.list()
            assert error_of(caught.value)["message"] == (
                "Rate limit reached for key 'tpd' on tokens per day (TPD): "
                f"Limit 8, Used {reply.usage.total_tokens}."
            )
    finally:
        holder.close()


def test_streamed_tokens_count_too(server: LiveServer) -> None:
    key = server.keys().add("tpd-stream", KeyLimits(tokens_per_day=4))
    client = server.client(key=key)
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=chat_messages(), max_tokens=3, stream=True
    )
    assert list(stream)
    with pytest.raises(openai.RateLimitError):
        client.models.list()


def test_out_of_scope_endpoints_are_403(server: LiveServer) -> None:
    key = server.keys().add("chat-only", KeyLimits(scopes=("chat",)))
    client = server.client(key=key)
    answer = client.chat.completions.create(model=MODEL_ID, messages=chat_messages(), max_tokens=1)
    assert answer.choices
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.models.list()
    assert caught.value.status_code == 403
    assert error_of(caught.value) == {
        "message": "the API key 'chat-only' may not use /v1/models (its scopes: chat)",
        "type": "permission_error",
        "param": None,
        "code": "endpoint_not_allowed",
    }
    with server.http(key=key) as http:
        ollama = http.get("/api/tags")
        metrics = http.get("/metrics")
    assert ollama.status_code == 403
    assert ollama.json() == {
        "error": "the API key 'chat-only' may not use /api/tags (its scopes: chat)"
    }
    assert metrics.status_code == 403


def test_out_of_scope_models_are_403(server: LiveServer) -> None:
    key = server.keys().add("other-model", KeyLimits(models=("other",)))
    client = server.client(key=key)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model=MODEL_ID, messages=chat_messages(), max_tokens=1)
    assert error_of(caught.value) == {
        "message": f"the API key 'other-model' may not use the model {MODEL_ID!r}",
        "type": "permission_error",
        "param": "model",
        "code": "model_not_allowed",
    }
    with pytest.raises(openai.PermissionDeniedError):
        client.models.retrieve(MODEL_ID)
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model=MODEL_ID, input="hello")
    with server.http(key=key) as http:
        show = http.post("/api/show", json={"name": MODEL_ID})
    assert show.status_code == 403
    assert show.json() == {"error": f"the API key 'other-model' may not use the model {MODEL_ID!r}"}
    # A model it may use, named with Ollama's default tag, passes the scope.
    allowed = server.keys().add("tiny-only", KeyLimits(models=(MODEL_ID,)))
    with server.http(key=allowed) as http:
        assert http.post("/api/show", json={"model": MODEL_ID + ":latest"}).status_code != 403
    answer = server.client(key=allowed).chat.completions.create(
        model=MODEL_ID, messages=chat_messages(), max_tokens=1
    )
    assert answer.choices
    entry = server.last_entry("/v1/embeddings")
    assert (entry["key"], entry["status"], entry["error"]) == (
        "other-model",
        403,
        "model_not_allowed",
    )


def test_a_bad_body_from_a_scoped_key_is_still_the_routes_400(server: LiveServer) -> None:
    key = server.keys().add("scoped-400", KeyLimits(models=(MODEL_ID,)))
    with server.http(key=key) as http:
        broken = http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )
        deep = http.post("/v1/chat/completions", content=b"[" * 100_000)
    assert broken.status_code == 400
    assert broken.json()["error"]["code"] == "invalid_json"
    assert deep.status_code == 400
