"""API keys: the key file, the ``appliance keys`` commands, and 401s from a live server."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner, Result
from server_helpers import (
    HAVE_LLAMA,
    LLAMA_MISSING,
    MODEL_ID,
    LiveServer,
    chat_messages,
    live_server,
    load_model,
    write_model,
)

from appliance.apikeys import KEY_PREFIX, ApiKey, KeyStore, hash_key, key_file, match_key
from appliance.cli import cli
from appliance.server.holder import ModelHolder
from signing.errors import InputError, IntegrityError, StateError

# -- the key file -------------------------------------------------------------------------------


def test_add_returns_a_random_key_and_stores_only_its_hash(tmp_path: Path) -> None:
    store = KeyStore(key_file(tmp_path))
    first, second = store.add("alice"), store.add("bob")
    assert first.startswith(KEY_PREFIX)
    assert len(first) >= len(KEY_PREFIX) + 43  # 32 random bytes, base64url
    assert first != second
    raw = store.path.read_text()
    assert first not in raw
    assert second not in raw
    assert hash_key(first) in raw
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert [k.name for k in store.list()] == ["alice", "bob"]
    assert store.verify(first) == "alice"
    assert store.verify(second) == "bob"
    assert store.verify(first + "x") is None
    assert store.verify("") is None


def test_revoke_removes_the_key(tmp_path: Path) -> None:
    store = KeyStore(key_file(tmp_path))
    key = store.add("alice")
    store.revoke("alice")
    assert store.verify(key) is None
    assert store.list() == []
    with pytest.raises(InputError, match="no API key named 'alice'"):
        store.revoke("alice")


def test_names_are_unique_and_plain(tmp_path: Path) -> None:
    store = KeyStore(key_file(tmp_path))
    store.add("svc.batch-1")
    with pytest.raises(InputError, match="exists already"):
        store.add("svc.batch-1")
    for bad in ("", "has space", "../x", "-dash", "x" * 65):
        with pytest.raises(InputError, match="key name"):
            store.add(bad)


def test_a_damaged_key_file_is_refused(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    path.write_text('{"version": 1, "keys": [{"name": "a", "sha256": "zz", "created": "t"}]}')
    with pytest.raises(IntegrityError, match="damaged"):
        KeyStore(path).list()
    path.write_text("not json")
    with pytest.raises(IntegrityError, match="damaged"):
        KeyStore(path).list()


def test_match_looks_at_every_key_and_returns_the_first_match() -> None:
    keys = [
        ApiKey(name="a", sha256=hash_key("k1"), created="t"),
        ApiKey(name="b", sha256=hash_key("k2"), created="t"),
        ApiKey(name="c", sha256=hash_key("k2"), created="t"),  # a duplicate hash
    ]
    assert match_key(keys, "k2") == "b"
    assert match_key(keys, "k1") == "a"
    assert match_key(keys, "k3") is None
    assert match_key([], "k1") is None


# -- the CLI ------------------------------------------------------------------------------------


def appliance(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keys_commands(tmp_path: Path) -> None:
    runner = CliRunner()

    def keys(*args: str) -> Result:
        return runner.invoke(cli, ["--root", str(tmp_path), "keys", *args], catch_exceptions=False)

    added = keys("add", "alice")
    assert added.exit_code == 0
    key = added.stdout.strip()
    assert key.startswith(KEY_PREFIX)
    assert "cannot be shown again" in added.stderr
    listed = keys("list", "--json")
    (entry,) = json.loads(listed.stdout)
    assert entry["name"] == "alice"
    assert key not in listed.stdout
    assert KeyStore(key_file(tmp_path)).verify(key) == "alice"
    assert "alice  created" in keys("list").stdout
    assert keys("revoke", "alice").exit_code == 0
    assert KeyStore(key_file(tmp_path)).list() == []


def test_keys_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    KeyStore(key_file(tmp_path)).add("alice")
    again = appliance(tmp_path, "keys", "add", "alice")
    assert again.returncode == 2
    assert again.stderr == "error: an API key named 'alice' exists already; revoke it first\n"


def test_serve_refuses_to_start_without_keys(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--root", str(tmp_path), "serve", "--port", "0"])
    assert isinstance(result.exception, StateError)
    assert "no API keys" in str(result.exception)
    assert "appliance keys add" in str(result.exception)


# -- the server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    if not HAVE_LLAMA:
        pytest.skip(LLAMA_MISSING)
    base = tmp_path_factory.mktemp("auth")
    holder = ModelHolder(load_model(write_model(base / "tiny.gguf"), parallel=1))
    with live_server(base / "root", holder, max_concurrency=1) as live:
        yield live
    holder.close()


def test_no_key_is_401(server: LiveServer) -> None:
    with server.http(key=None) as http:
        response = http.post(
            "/v1/chat/completions", json={"model": MODEL_ID, "messages": chat_messages()}
        )
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {
        "error": {
            "message": "missing API key: send it as 'Authorization: Bearer <key>'",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


@pytest.mark.parametrize("header", ["Basic dXNlcjpwdw==", "Bearer", "Bearer sk-air-wrong", ""])
def test_wrong_or_malformed_key_is_401(server: LiveServer, header: str) -> None:
    with server.http(key=None, headers={"Authorization": header}) as http:
        response = http.get("/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_bad_key_through_the_openai_client(server: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        server.client(key="sk-air-not-a-key").models.list()
    assert caught.value.status_code == 401
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "invalid_api_key"


def test_unauthenticated_requests_never_reach_the_model(server: LiveServer) -> None:
    before = server.metric("appliance_prompt_tokens_total")
    with pytest.raises(openai.AuthenticationError):
        server.client(key="sk-air-nope").chat.completions.create(
            model=MODEL_ID, messages=chat_messages(), max_tokens=2
        )
    assert server.metric("appliance_prompt_tokens_total") == before


def test_new_and_revoked_keys_take_effect_without_restart(server: LiveServer) -> None:
    store = server.keys()
    key = store.add("short-lived")
    client = server.client(key=key)
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    store.revoke("short-lived")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    # the other keys still work
    assert server.client().models.list().data[0].id == MODEL_ID
    entries = server.log_entries()
    assert entries[-2]["key"] is None
    assert entries[-2]["status"] == 401
    assert entries[-1]["key"] == "tester"


def test_a_damaged_key_file_fails_closed(server: LiveServer) -> None:
    path = server.keys().path
    good = path.read_bytes()
    try:
        path.write_text("{broken")
        with pytest.raises(openai.AuthenticationError):
            server.client().models.list()
    finally:
        path.write_bytes(good)
    assert server.client().models.list().data[0].id == MODEL_ID
