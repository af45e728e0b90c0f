"""The hardware preflight (docs/preflight.md): the pure checks with host facts built directly,
the signed ``requires`` object, one real run on this host through the CLI, and an install
refused by the preflight before it writes anything."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from helpers_cli import World, appliance, assert_error, audit_records, get_world, ok
from simulator import BundleSimulator, Host
from test_parsers_total import MANIFEST_BYTES

from appliance.hostfacts import gather
from appliance.preflight import NO_DRIVER, Check, GpuFacts, HostFacts, check, require_fit
from builder.hostreqs import glibc_of_wheel, nvcc_version
from signing.canonical import encode_canonical
from signing.errors import FormatError, HostUnfitError
from signing.manifest import BundleManifest
from signing.requirements import (
    X86_64_LEVELS,
    CpuRequirement,
    GpuRequirement,
    HostRequirements,
    x86_64_level,
)

GIB = 1 << 30
HOST_PY = f"{sys.version_info.major}.{sys.version_info.minor}"

H100 = GpuFacts(
    index=0,
    name="NVIDIA H100 80GB HBM3",
    compute_capability=(9, 0),
    memory_total_bytes=80 * GIB,
    memory_free_bytes=79 * GIB,
)
A10 = GpuFacts(1, "NVIDIA A10", (8, 6), 24 * GIB, 23 * GIB)
FACTS = HostFacts(
    cpu_arch="x86_64",
    cpu_flags=X86_64_LEVELS["x86-64-v3"] | {"aes"},
    memory_total_bytes=64 * GIB,
    memory_available_bytes=60 * GIB,
    disk_free_bytes=500 * GIB,
    disk_path="/var/lib/appliance",
    python="3.11",
    glibc="2.36",
    gpus=(H100,),
    driver_version="550.54.14",
    cuda_driver_version="12.4",
    gpu_problem=None,
)
GPU = GpuRequirement(
    cuda_architectures=("80", "86", "90"), cuda_version="12.4", memory_bytes=20 * GIB,
    cpu_fallback=False,
)  # fmt: skip
REQUIRES = HostRequirements(
    memory_bytes=16 * GIB,
    disk_bytes=30 * GIB,
    cpu=CpuRequirement(arch="x86_64", level="x86-64-v3", flags=("aes",)),
    gpu=GPU,
    glibc="2.28",
    python="3.11",
)


def failed(requires: HostRequirements, facts: HostFacts) -> dict[str, Check]:
    return {c.name: c for c in check(requires, facts) if not c.ok}


# -- the pure checks ----------------------------------------------------------------------------


def test_a_fitting_host_passes_every_check() -> None:
    checks = check(REQUIRES, FACTS)
    assert [c.name for c in checks] == [
        "cpu architecture", "cpu level", "cpu features", "memory", "disk", "python", "glibc",
        "gpu compute capability", "nvidia driver", "gpu memory",
    ]  # fmt: skip
    assert all(c.ok and not c.fix for c in checks)
    require_fit(checks, bundle="demo 1.0.0")  # does not raise


def test_a_gpu_too_small() -> None:
    small = replace(H100, memory_free_bytes=12 * GIB)
    bad = failed(REQUIRES, replace(FACTS, gpus=(small,)))
    assert list(bad) == ["gpu memory"]
    where = "on GPU 0 NVIDIA H100 80GB HBM3 (9.0)"
    assert bad["gpu memory"].found == f"12.0 GiB free of 80.0 GiB {where}"
    assert bad["gpu memory"].needed == "20.0 GiB free on one GPU"
    assert "quantised model" in bad["gpu memory"].fix


def test_a_driver_too_old() -> None:
    old = replace(FACTS, driver_version="535.54.03", cuda_driver_version="12.2")
    bad = failed(REQUIRES, old)
    assert list(bad) == ["nvidia driver"]
    assert bad["nvidia driver"].found == "driver 535.54.03 (CUDA 12.2)"
    assert bad["nvidia driver"].needed == "CUDA 12.4 or newer"
    assert bad["nvidia driver"].fix == (
        "upgrade the NVIDIA driver to one for CUDA 12.4 (550.54.14 or newer)"
    )


def test_the_wrong_compute_capability() -> None:
    """A build for 8.x and 9.0 does not run on a Turing (7.5) GPU; 8.6 runs on 8.9, not 8.0."""
    turing = GpuFacts(0, "Quadro RTX 8000", (7, 5), 48 * GIB, 47 * GIB)
    bad = failed(REQUIRES, replace(FACTS, gpus=(turing,)))
    assert list(bad) == ["gpu compute capability"]
    assert bad["gpu compute capability"].needed == "sm_80, sm_86, sm_90"
    assert bad["gpu compute capability"].fix == 'rebuild with cuda_architectures naming "75"'
    only_86 = replace(REQUIRES, gpu=replace(GPU, cuda_architectures=("86",)))
    ada = GpuFacts(0, "NVIDIA L4", (8, 9), 24 * GIB, 23 * GIB)
    ampere = GpuFacts(0, "NVIDIA A100", (8, 0), 80 * GIB, 79 * GIB)
    assert not failed(only_86, replace(FACTS, gpus=(ada,)))
    assert "gpu compute capability" in failed(only_86, replace(FACTS, gpus=(ampere,)))
    arch_specific = replace(REQUIRES, gpu=replace(GPU, cuda_architectures=("90a",)))
    assert not failed(arch_specific, FACTS)
    blackwell = GpuFacts(0, "NVIDIA B200", (10, 0), 180 * GIB, 170 * GIB)
    assert "gpu compute capability" in failed(arch_specific, replace(FACTS, gpus=(blackwell,)))


def test_one_fitting_gpu_of_several_is_enough_and_its_memory_counts() -> None:
    turing = GpuFacts(0, "Tesla T4", (7, 5), 16 * GIB, 15 * GIB)
    facts = replace(FACTS, gpus=(turing, replace(A10, memory_free_bytes=10 * GIB)))
    bad = failed(REQUIRES, facts)
    assert list(bad) == ["gpu memory"]  # the A10 fits the build, but is too small
    assert "on GPU 1 NVIDIA A10 (8.6)" in bad["gpu memory"].found


def test_a_missing_cpu_feature_and_a_low_cpu_level() -> None:
    v2_host = replace(FACTS, cpu_flags=X86_64_LEVELS["x86-64-v2"])
    bad = failed(REQUIRES, v2_host)
    assert list(bad) == ["cpu level", "cpu features"]
    assert bad["cpu level"].found == "x86-64-v2"
    assert bad["cpu level"].needed == "x86-64-v3"
    assert bad["cpu level"].fix.startswith("lacks abm, avx, avx2, bmi1, bmi2, f16c, fma, movbe,")
    assert "cpu_level = 'x86-64-v2'" in bad["cpu level"].fix
    assert bad["cpu features"].found == "missing aes"
    arm = failed(REQUIRES, replace(FACTS, cpu_arch="aarch64"))
    assert arm["cpu architecture"].found == "aarch64"
    assert "cpu level" not in arm  # another architecture's level says nothing


def test_x86_64_levels_follow_the_psabi() -> None:
    assert x86_64_level(set()) is None
    assert x86_64_level(X86_64_LEVELS["x86-64-v4"]) == "x86-64-v4"
    # A CPU with AVX-512 but without MOVBE is no v3, and so no v4 either.
    assert x86_64_level(X86_64_LEVELS["x86-64-v4"] - {"movbe"}) == "x86-64-v2"
    assert {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} == (
        X86_64_LEVELS["x86-64-v4"] - X86_64_LEVELS["x86-64-v3"]
    )


def test_a_disk_too_full_and_too_little_memory() -> None:
    facts = replace(FACTS, disk_free_bytes=10 * GIB, memory_total_bytes=8 * GIB)
    bad = failed(REQUIRES, facts)
    assert list(bad) == ["memory", "disk"]
    assert bad["disk"].found == "10.0 GiB free at /var/lib/appliance"
    assert bad["disk"].fix.startswith("free 20.0 GiB at /var/lib/appliance")
    assert bad["memory"].fix == "add 8.0 GiB of RAM, or pick a smaller model"
    unknown = failed(REQUIRES, replace(FACTS, memory_total_bytes=None, disk_free_bytes=None))
    assert list(unknown) == ["memory", "disk"]  # what cannot be read fails closed


def test_glibc_too_old_and_no_glibc() -> None:
    old = failed(REQUIRES, replace(FACTS, glibc="2.17"))
    assert list(old) == ["glibc"]
    assert old["glibc"].needed == "2.28 or newer"
    assert "manylinux_2_17" in old["glibc"].fix
    assert list(failed(REQUIRES, replace(FACTS, glibc=None))) == ["glibc"]
    newer = replace(REQUIRES, glibc="2.9")  # compared as versions, not as text
    assert not failed(newer, FACTS)


def test_python_mismatch() -> None:
    bad = failed(REQUIRES, replace(FACTS, python="3.12"))
    assert list(bad) == ["python"]
    assert bad["python"].fix == "rebuild for Python 3.12, or run the appliance on 3.11"


@pytest.mark.parametrize("fallback", [True, False])
def test_no_gpu_passes_only_with_cpu_fallback(fallback: bool) -> None:
    requires = replace(REQUIRES, gpu=replace(GPU, cpu_fallback=fallback))
    none = replace(FACTS, gpus=(), driver_version=None, cuda_driver_version=None)
    none = replace(none, gpu_problem=NO_DRIVER)
    checks = {c.name: c for c in check(requires, none)}
    assert checks["gpu"].ok is fallback
    assert checks["gpu"].found.startswith(NO_DRIVER)
    assert "nvidia driver" not in checks and "gpu memory" not in checks
    if not fallback:
        assert "cpu_fallback" in checks["gpu"].fix
        with pytest.raises(HostUnfitError) as caught:
            require_fit(checks.values(), bundle="demo 1.0.0")
        assert caught.value.exit_code == 11
        assert "gpu: found no NVIDIA driver, needs NVIDIA GPU (sm_80, sm_86, sm_90)" in str(
            caught.value
        )


def test_a_gpu_that_does_not_fit_fails_even_with_cpu_fallback() -> None:
    requires = replace(REQUIRES, gpu=replace(GPU, cpu_fallback=True))
    turing = GpuFacts(0, "Tesla T4", (7, 5), 16 * GIB, 15 * GIB)
    bad = failed(requires, replace(FACTS, gpus=(turing,)))
    assert "gpu compute capability" in bad
    assert "CUDA_VISIBLE_DEVICES=''" in bad["gpu compute capability"].fix


def test_the_refusal_names_every_failure_on_one_bounded_line() -> None:
    worst = replace(
        FACTS, cpu_arch="aarch64", memory_total_bytes=1, disk_free_bytes=1, python="3.9",
        glibc="2.5", gpus=(GpuFacts(0, "x" * 5000, (7, 0), 1, 1),), cuda_driver_version="11.0",
    )  # fmt: skip
    checks = check(REQUIRES, worst)
    with pytest.raises(HostUnfitError) as caught:
        require_fit(checks, bundle="demo 1.0.0")
    line = caught.value.diagnostics()
    assert "\n" not in line and len(line) <= 1000
    assert line.startswith("this host cannot run demo 1.0.0: 8 preflight check(s) failed: ")
    assert all(len(c.found) <= 120 for c in checks)


def test_gathered_facts_of_this_host() -> None:
    """The real sources of this host; without a GPU driver the verdict is 'no NVIDIA driver'."""
    facts = gather(Path("/nonexistent/appliance/root"))
    assert facts.python == HOST_PY
    assert facts.disk_path == "/" and facts.disk_free_bytes
    assert facts.memory_total_bytes and facts.memory_total_bytes > GIB
    if facts.gpus:  # pragma: no cover - a host with an NVIDIA GPU
        assert facts.driver_version and facts.cuda_driver_version and facts.gpu_problem is None
    else:
        assert facts.gpu_problem is not None
    hidden = gather(Path("/"), with_gpu=True)
    assert hidden.cpu_flags == facts.cpu_flags


# -- the signed object --------------------------------------------------------------------------


def test_requires_round_trips_and_old_manifests_stay_valid() -> None:
    sim = BundleSimulator()
    manifest, _ = sim.manifest()
    assert manifest.requires is None and "requires" not in manifest.to_dict()
    signed = replace(manifest, requires=replace(REQUIRES, python=None))
    again = BundleManifest.from_bytes(signed.to_bytes())
    assert again == signed and again.to_bytes() == signed.to_bytes()
    assert json.loads(signed.to_bytes())["requires"]["gpu"] == {
        "cpu_fallback": False, "cuda_architectures": ["80", "86", "90"],
        "cuda_version": "12.4", "memory_bytes": 20 * GIB,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cpu": {"arch": "x86_64", "flags": []}}, "flags must be a non-empty list"),
        ({"cpu": {"arch": "aarch64", "level": "x86-64-v3"}}, "needs arch x86_64"),
        ({"cpu": {"arch": "x86_64", "flags": ["sse", "avx"]}}, "sorted and without dup"),
        ({"memory_bytes": True}, "memory_bytes must be a non-negative integer"),
        ({"glibc": "2.28.1"}, "glibc must look like '2.28'"),
        ({"gpu": dict(GPU.to_dict(), cuda_architectures=["90", "100", "86"])}, "sorted"),
        ({"gpu": dict(GPU.to_dict(), cpu_fallback=1)}, "cpu_fallback must be true or false"),
        ({"gpu": dict(GPU.to_dict(), cuda_architectures=["sm_90"])}, "'sm_90' is not a valid name"),
        ({"python": "3.12"}, "requires.python '3.12' is not the environment's"),
    ],
)
def test_requires_is_parsed_strictly(change: dict[str, object], message: str) -> None:
    doc = json.loads(MANIFEST_BYTES)  # with an environment for Python 3.11, and requires
    doc["requires"] = doc["requires"] | change
    with pytest.raises(FormatError, match=message):
        BundleManifest.from_bytes(encode_canonical(doc))


def test_builder_reads_the_glibc_floor_from_wheel_tags() -> None:
    assert glibc_of_wheel("a-1-py3-none-any.whl") is None
    assert glibc_of_wheel("a-1-cp311-cp311-manylinux_2_28_x86_64.whl") == "2.28"
    both = "a-1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    assert glibc_of_wheel(both) == "2.17"
    assert glibc_of_wheel("a-1-cp311-cp311-manylinux1_x86_64.whl") == "2.5"
    assert glibc_of_wheel("a-1-cp311-cp311-musllinux_1_2_x86_64.whl") is None
    out = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.48"
    assert nvcc_version(out) == "13.0"


# -- through the CLI, on this host --------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return get_world(tmp_path_factory)


def test_preflight_of_a_built_bundle_on_this_host(world: World, tmp_path: Path) -> None:
    host = world.new_host(tmp_path / "host")
    shown = ok(appliance(host, "preflight", world.bundles["1.0.0"]))
    assert "demo 1.0.0 on this host" in shown.out
    assert "memory" in shown.out and "disk" in shown.out and "FAIL" not in shown.out
    report = ok(appliance(host, "preflight", world.bundles["1.0.0"], "--json")).json()
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == ["memory", "disk"]
    requires = report["requires"]
    assert requires["disk_bytes"] >= World.MODEL_SIZE and requires["memory_bytes"] > 0
    assert audit_records(host)[-1]["event"] == "preflight"
    assert audit_records(host)[-1]["outcome"] == "ok"


def test_preflight_refuses_a_head_that_does_not_verify(world: World, tmp_path: Path) -> None:
    host = world.new_host(tmp_path / "host")
    bad = tmp_path / "bad.tar"
    data = bytearray(world.bundles["1.0.0"].read_bytes())
    at = data.index(b'"name":"demo"')
    data[at + 8 : at + 12] = b"dema"  # the signed manifest changed: signatures fail
    bad.write_bytes(bytes(data))
    assert_error(appliance(host, "preflight", bad), 3)
    assert audit_records(host)[-1]["outcome"] == "refused"


def test_install_is_refused_by_the_preflight_before_writing(tmp_path: Path) -> None:
    """A bundle whose signed requirements this host cannot meet (Python of another minor, a
    terabyte of RAM): refused with one line per failure; slots and staging unchanged."""
    sim = BundleSimulator()
    host = Host(tmp_path / "host", tmp_path / "bundles", sim)
    host.trust_init()
    other_py = f"3.{sys.version_info.minor + 1}"
    manifest, payload = sim.manifest(version="2.0.0")
    unfit = HostRequirements(memory_bytes=1 << 50, disk_bytes=1, python=other_py)
    data = sim.bundle_bytes(replace(manifest, requires=unfit), payload)
    before = host.snapshot()
    staging = sorted((host.root / "staging").iterdir()) if (host.root / "staging").exists() else []
    with pytest.raises(HostUnfitError) as caught:
        host.install(data)
    message = caught.value.diagnostics()
    assert "2 preflight check(s) failed: memory: found " in message
    assert f"python: found {HOST_PY}, needs {other_py}" in message
    assert host.snapshot() == before
    after = sorted((host.root / "staging").iterdir()) if (host.root / "staging").exists() else []
    assert after == staging
    record = host.last_audit()
    assert record["outcome"] == "refused" and record["event"] == "install"
    assert "preflight check(s) failed" in record["error"]


def test_install_with_skip_preflight_is_logged(world: World, tmp_path: Path) -> None:
    host = world.new_host(tmp_path / "host")
    ok(appliance(host, "install", world.bundles["1.0.0"], "--skip-preflight"))
    record = audit_records(host)[-1]
    assert record["outcome"] == "ok" and record["skip_preflight"] is True
