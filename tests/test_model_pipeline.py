"""The model pipeline (issue 10, item 4): a Hugging Face checkpoint to a quantised GGUF bundle.

Real components: the tiny HF llama (builder.tinyhf, Llama 2 style tokenizer) converted by
llama.cpp's own convert_hf_to_gguf.py from llama-cpp-python's sdist, in the venv the builder
makes (kept in the builder's cache), quantised by llama_model_quantize, its KL-divergence
measured by a real llama.cpp runtime. The native build in .venv dies on quantised kernels on a
VM that advertises AMX, so the KL runs with the portable build (tests/portable_build.py, from
the build cache), as the operator's ``--eval-python`` would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers_cli import (
    APPLIANCE,
    appliance,
    assert_error,
    audit_records,
    builder,
    clean_env,
    ok,
    wait_for,
)
from portable_build import DEMO_LOCK, SLOT_RUNTIME

from builder.convert import CONVERTER_SDIST, GGUF_TYPES
from builder.sbom import _pipeline_properties
from signing.errors import FormatError
from signing.manifest import ModelPipeline

SHA = "a" * 64
RECIPE = """[bundle]
name = "tinyhf"
version = "1.0.0"
[model]
path = "{model}"
quantize = "{quantize}"
[runtime]
backend = "llama.cpp"
context_size = 128
"""


def _pipeline(**changes: object) -> ModelPipeline:
    fields: dict[str, object] = {
        "converter": "llama-cpp-python==0.3.36",
        "converter_sha256": SHA,
        "quantize": "Q8_0",
        "inputs": (("config.json", SHA), ("model.safetensors", SHA)),
        "output_sha256": SHA,
        "kl_nanonats": 1234,
        "kl_tokens": 30,
    } | changes
    return ModelPipeline(**fields)  # type: ignore[arg-type]


def test_pipeline_round_trips_and_summarises() -> None:
    pipeline = _pipeline()
    assert ModelPipeline.from_dict(pipeline.to_dict()) == pipeline
    assert "KL 1.23e-06 nats vs F16 over 30 tokens" in pipeline.summary()
    plain = _pipeline(quantize="F16", kl_nanonats=None, kl_tokens=None)
    assert "kl_nanonats" not in plain.to_dict()
    assert ModelPipeline.from_dict(plain.to_dict()) == plain


@pytest.mark.parametrize(
    "changes",
    [
        {"converter": "llama-cpp-python"},
        {"quantize": "q8"},
        {"inputs": ()},
        {"inputs": (("b", SHA), ("a", SHA))},
        {"inputs": (("../x", SHA),)},
        {"output_sha256": "A" * 64},
        {"kl_nanonats": -1},
        {"kl_nanonats": True},
        {"kl_tokens": None},
    ],
)
def test_pipeline_refuses_bad_fields(changes: dict[str, object]) -> None:
    with pytest.raises(FormatError):
        _pipeline(**changes)


def test_sbom_properties_carry_the_provenance() -> None:
    props = {p.name.split(":", 1)[1]: p.value for p in _pipeline_properties(_pipeline())}
    assert props["pipeline.quantize"] == "Q8_0"
    assert props["pipeline.converter-sha256"] == SHA
    assert props["pipeline.kl-nanonats"] == "1234"


def test_converter_sdist_is_the_locked_one() -> None:
    lock = tomllib.loads(DEMO_LOCK.read_text())
    (pkg,) = [p for p in lock["packages"] if p["name"] == CONVERTER_SDIST.name]
    assert pkg["version"] == CONVERTER_SDIST.version
    assert pkg["sdist"]["hashes"]["sha256"] == CONVERTER_SDIST.sha256
    assert pkg["sdist"]["url"] == CONVERTER_SDIST.url
    assert {"Q8_0", "Q4_K_M", "F16"} <= GGUF_TYPES


def test_unknown_quantisation_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(model="hf", quantize="Q9_X"))
    ok(builder("keygen", tmp_path / "k.key"))
    result = builder("build", recipe, "--key", tmp_path / "k.key", "-o", tmp_path / "b.tar")
    line = assert_error(result, 2, "model.quantize", "unknown quantisation type 'Q9_X'")
    assert "\n" not in line.strip()


@pytest.fixture(scope="module")
def eval_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An interpreter whose llama_cpp is the portable build (numpy and the rest from .venv)."""
    from portable_build import portable_wheel

    base = tmp_path_factory.mktemp("evalenv")
    artifact, cached = portable_wheel(base / "work")
    wheel = base / artifact.filename  # pip reads the wheel's tags from its name
    shutil.copyfile(cached, wheel)
    env = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True)
    site = next((env / "lib").glob("python3.*")) / "site-packages"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel],
        check=True,
    )
    ours = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "zz-builder-venv.pth").write_text(ours + "\n")
    return env / "bin" / "python"


@pytest.mark.slow
def test_hf_checkpoint_becomes_a_q8_bundle(tmp_path: Path, eval_python: Path) -> None:
    from builder.tinyhf import write_tiny_llama_hf

    saved = dict(os.environ)
    try:
        write_tiny_llama_hf(tmp_path / "hf", tokenizer="llama")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(model="hf", quantize="Q8_0"))
    key = tmp_path / "k.key"
    ok(builder("keygen", key))
    bundle = tmp_path / "b.tar"
    env = {"AIRGAP_APPLIANCE_EVAL_PYTHON": str(eval_python)}
    ok(builder("build", recipe, "--key", key, "-o", bundle, env=env, timeout=900))
    info = json.loads(ok(builder("inspect", bundle, "--json")).out)
    pipeline = ModelPipeline.from_dict(info["model"]["pipeline"])
    assert pipeline.quantize == "Q8_0"
    assert pipeline.converter == "llama-cpp-python==0.3.36"
    assert {p for p, _ in pipeline.inputs} >= {"model.safetensors", "tokenizer.json"}
    (gguf,) = [e for e in info["entries"] if e["kind"] == "model"]
    assert gguf["sha256"] == pipeline.output_sha256
    assert pipeline.kl_nanonats is not None
    assert pipeline.kl_nanonats < 10_000_000  # Q8_0 of a tiny model: well under 0.01 nats
    assert "made" in ok(builder("inspect", bundle)).out


@pytest.mark.slow
def test_hf_checkpoint_to_q8_bundle_is_installed_and_served(
    tmp_path: Path, eval_python: Path
) -> None:
    """HF -> GGUF -> Q8_0 -> bundle -> install (health check on) -> serve, through the CLIs and
    the official openai client."""
    import openai

    from builder.tinyhf import write_tiny_llama_hf

    if sys.version_info[:2] != (3, 11):
        pytest.skip("the demo lock (lockfiles/pylock.llamacpp-cpu.toml) is for CPython 3.11")
    saved = dict(os.environ)
    try:
        write_tiny_llama_hf(tmp_path / "hf", tokenizer="llama")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    recipe = tmp_path / "recipe.toml"
    # The slot runs the portable runtime: .venv's native build cannot run quantised kernels
    # on a VM that advertises AMX (docs/adr/0012).
    slot_runtime = SLOT_RUNTIME.format(lock=DEMO_LOCK)
    recipe.write_text(RECIPE.format(model="hf", quantize="Q8_0") + slot_runtime)
    key, root_json, bundle = tmp_path / "k.key", tmp_path / "root.json", tmp_path / "b.tar"
    ok(builder("keygen", key))
    ok(builder("root", "create", "--root-key", key, "--bundle-key", f"{key}.pub",
               "--threshold", "1", "-o", root_json))  # fmt: skip
    env = clean_env(AIRGAP_APPLIANCE_EVAL_PYTHON=str(eval_python))
    ok(builder("build", recipe, "--key", key, "-o", bundle, env=env, timeout=1800))
    host = tmp_path / "host"
    fingerprint = ok(builder("root", "fingerprint", root_json)).out.split()[-1]
    ok(appliance(host, "trust", "init", root_json, "--fingerprint", fingerprint))
    with_health_check = clean_env()
    del with_health_check["APPLIANCE_SKIP_HEALTH_CHECK"]
    ok(appliance(host, "install", bundle, env=with_health_check, timeout=900))
    record = audit_records(host)[-1]
    assert (record["outcome"], record["health_check"]) == ("ok", "ok")
    api_key = ok(appliance(host, "keys", "add", "tester")).out.strip()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [APPLIANCE, "--root", host, "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0, timeout=60
        )

        def answering() -> bool:
            if server.poll() is not None:
                pytest.fail(f"serve exited: {server.stderr.read() if server.stderr else ''}")
            try:
                return [m.id for m in client.models.list()] == ["tinyhf"]
            except openai.APIConnectionError:
                return False

        wait_for(answering, timeout=120, what="serve to answer")
        completion = client.completions.create(
            model="tinyhf", prompt="Hello", max_tokens=4, temperature=0
        )
        assert completion.usage is not None
        assert completion.usage.completion_tokens > 0
        assert isinstance(completion.choices[0].text, str)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        finally:
            server.kill()
