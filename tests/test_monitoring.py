"""The monitoring that ships: metric names, the dashboard, the alert rules, GPU figures.

Real components throughout: Debian's ``promtool`` checks the alert rules; a real ``appliance
serve`` process serves a slot installed by the real installer (the tiny generated GGUF, run by
llama-server); a real Prometheus on loopback scrapes it with an API key limited to /metrics,
loads the shipped rules and answers queries over its HTTP API. The GPU collector runs against
this machine's NVML as it is: with no GPU (or no driver) it must export nothing and fail nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import HAVE_LLAMA, LLAMA_MISSING, wait_for, write_model
from simulator import BundleSimulator, Host

from appliance.canary import ACTIVE, CANARY
from appliance.installer import InstallOptions
from appliance.monitoring import ALERTS, DASHBOARD, FILES
from appliance.runtime.base import RuntimeSettings
from appliance.server import gpumetrics
from appliance.server.gpumetrics import GpuCollector
from appliance.server.metrics import ServerMetrics
from appliance.server.record import RequestRecord

PROMETHEUS_MISSING = (
    "promtool/prometheus are not installed (Debian: apt-get install prometheus; "
    "scripts/setup.sh installs it when run as root)"
)
requires_prometheus = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason=PROMETHEUS_MISSING,
)
RUNTIME = {"backend": "llama.cpp", "context_size": 256}
CLI = [sys.executable, "-m", "appliance"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def exported(tmp_path: Path) -> Path:
    """The files as the operator gets them: written by the real CLI."""
    out = tmp_path / "monitoring"
    done = subprocess.run(
        [*CLI, "monitoring", "export", str(out)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    return out


# -- PromQL: the metric names an expression reads ----------------------------------------------

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
}
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The series names ``expr`` selects (strings, matchers, ranges, groupings and function
    calls taken out first)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        if match.group() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        if match.start() > 0 and text[match.start() - 1].isdigit():  # 1e3, 0.5
            continue
        names.add(match.group())
    return names


def test_metric_names_of_an_expression() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (slot, le) (rate(a:b_bucket{job=~"$job", x="by(y)"}'
        "[$__rate_interval]))) / on (job) group_left c_total + 1.5 * up and bool d"
    )
    assert metric_names(expr) == {"a:b_bucket", "c_total", "up", "d"}


def dashboard_exprs(path: Path) -> list[str]:
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    exprs = []
    for panel in dashboard["panels"]:
        exprs.extend(t["expr"] for t in panel.get("targets", ()))
    return exprs


def alert_exprs(path: Path) -> list[str]:
    rules = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


# -- files and promtool (no server needed) -----------------------------------------------------


@requires_prometheus
def test_promtool_accepts_the_shipped_alert_rules(tmp_path: Path) -> None:
    rules = exported(tmp_path) / ALERTS
    done = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", done.stdout)
    assert found is not None, done.stdout
    assert int(found.group(1)) == len(alert_exprs(rules)) >= 10


def test_the_dashboard_covers_what_operators_watch(tmp_path: Path) -> None:
    path = exported(tmp_path) / DASHBOARD
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["__inputs"][0]["pluginId"] == "prometheus"
    titles = " | ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("p99", "first token", "tokens per second", "queue", "429", "error rate",
                  "by slot", "gpu utilisation", "gpu memory"):  # fmt: skip
        assert topic in titles, topic
    names = set().union(*map(metric_names, dashboard_exprs(path)))
    assert {"appliance:e2e_request_latency_seconds_bucket", *gpumetrics.METRIC_NAMES} <= names


def test_export_refuses_an_unwritable_directory_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    done = subprocess.run(
        [*CLI, "monitoring", "export", str(blocker / "sub")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert done.stderr.startswith("error: cannot write the monitoring files")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# -- GPU figures -------------------------------------------------------------------------------


def nvml_works() -> bool:
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_without_a_gpu_the_collector_exports_nothing_and_says_why() -> None:
    if nvml_works():
        pytest.skip("this machine has a working NVML: the GPU path is tested by the serve test")
    registry = CollectorRegistry()
    collector = GpuCollector()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert "appliance:gpu" not in text
    assert collector.unavailable is not None
    assert collector.unavailable.startswith(("NVML:", "nvidia-ml-py"))
    assert "appliance:gpu" not in generate_latest(registry).decode()  # asked once, not failing


def test_without_nvidia_ml_py_the_collector_exports_nothing() -> None:
    """A host without the [gpu] extra: the module cannot be imported at all."""
    code = (
        "import sys; sys.modules['pynvml'] = None\n"
        "from prometheus_client import CollectorRegistry, generate_latest\n"
        "from appliance.server.gpumetrics import GpuCollector\n"
        "r = CollectorRegistry(); c = GpuCollector(); r.register(c)\n"
        "assert b'appliance:gpu' not in generate_latest(r)\n"
        "print(c.unavailable)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "nvidia-ml-py is not installed"


class _NvmlOfTwoGpus:
    """The few NVML calls :func:`gpumetrics.read_gpus` makes, answering for two GPUs (a
    stand-in for the NVIDIA driver, which this machine lacks; not for our own code)."""

    class NVMLError(Exception):
        pass

    @dataclass
    class _Memory:
        used: int
        total: int

    @dataclass
    class _Rates:
        gpu: int
        memory: int

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 - NVML's names
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:  # noqa: N802
        return self._Memory(used=(handle + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:  # noqa: N802
        return self._Rates(gpu=40 + 50 * handle, memory=10)

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:  # noqa: N802 - old bindings: bytes
        return f"GPU-{handle:04d}".encode()

    def nvmlDeviceGetName(self, handle: int) -> str:  # noqa: N802
        return "NVIDIA H100 80GB HBM3"


def test_gpu_readings_become_the_documented_series() -> None:
    readings = gpumetrics.read_gpus(_NvmlOfTwoGpus())
    samples = {
        (s.name, s.labels["gpu"]): (s.value, s.labels)
        for family in gpumetrics.families(readings)
        for s in family.samples
    }
    assert samples[(gpumetrics.UTILIZATION, "1")][0] == pytest.approx(0.9)
    assert samples[(gpumetrics.MEMORY_USED, "0")][0] == 2**30
    assert samples[(gpumetrics.MEMORY_TOTAL, "1")][0] == 80 * 2**30
    assert samples[(gpumetrics.UTILIZATION, "0")][1] == {
        "gpu": "0",
        "uuid": "GPU-0000",
        "name": "NVIDIA H100 80GB HBM3",
    }
    assert {name for name, _ in samples} == set(gpumetrics.METRIC_NAMES)


# -- labels: which slot answered ---------------------------------------------------------------


@dataclass
class _Loaded:
    """What the metrics read of a served backend: its model id and the settings it was loaded
    with (a stand-in for a loaded model; the metrics code under test is real)."""

    model_id: str
    settings: RuntimeSettings


def _loaded(model_id: str, slot: str) -> _Loaded:
    settings = RuntimeSettings(
        backend="llama.cpp", model_path=Path("m.gguf"), model_id=model_id, slot=Path("s") / slot
    )
    return _Loaded(model_id, settings)


def test_requests_are_labelled_by_the_slot_that_answered() -> None:
    serving = {ACTIVE: _loaded("demo", "slot-a"), CANARY: _loaded("demo-next", "slot-b")}
    metrics = ServerMetrics(
        queue_depth=lambda: 3, in_flight=lambda: 1, serving=lambda: serving, capacity=4, gpus=False
    )
    for slot in (ACTIVE, CANARY, None):  # None: a request that reached no model (a 401)
        record = RequestRecord(method="POST", path="/v1/chat/completions", slot=slot)
        record.route, record.status = "/v1/chat/completions", 200 if slot else 401
        record.completion_tokens = 5
        metrics.observe_request(record)
        if slot:
            metrics.observe_generation(record, "finished")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }

    def get(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), -1.0)

    route = "/v1/chat/completions"
    canary = {"model_name": "demo-next", "slot": CANARY}
    active = {"model_name": "demo", "slot": ACTIVE}
    assert get("appliance:http_requests_total", route=route, status="200", **canary) == 1
    assert get("appliance:http_requests_total", route=route, status="401", **active) == 1
    assert get("appliance:generation_tokens_total", **canary) == 5
    assert get("appliance:generation_tokens_total", **active) == 5
    assert get("appliance:slot_info", slot_id="slot-b", **canary) == 1
    assert get("appliance:slot_info", slot_id="slot-a", **active) == 1
    assert get("appliance:num_requests_waiting", model_name="demo") == 3
    assert get("appliance:kv_cache_usage_perc", model_name="demo") == 0.25
    assert get("appliance:model_ready", **canary) == 1


# -- a real serve, scraped by a real Prometheus ------------------------------------------------


@dataclass
class Served:
    url: str
    key: str
    scrape_key: str
    slot_id: str
    root: Path

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        response = httpx.get(
            self.url + "/metrics", headers={"Authorization": f"Bearer {self.scrape_key}"}
        )
        response.raise_for_status()
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(response.text):
            for s in family.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
        return out

    def chat(self, *, stream: bool = False) -> None:
        response = httpx.post(
            self.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {self.key}"},
            json={
                "model": "demo",
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 4,
                "temperature": 0,
                "stream": stream,
            },
            timeout=60,
        )
        assert response.status_code == 200, response.text


def _models(url: str, key: str) -> list[str]:
    try:
        response = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    except httpx.TransportError:
        return []
    if response.status_code != 200:
        return []
    return [m["id"] for m in response.json()["data"]]


def _add_key(root: Path, name: str, *options: str) -> str:
    done = subprocess.run(
        [*CLI, "--root", str(root), "keys", "add", name, *options],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if not HAVE_LLAMA:
        pytest.skip(LLAMA_MISSING)
    base = tmp_path_factory.mktemp("monitoring")
    host = Host(root=base / "host", bundles=base / "bundles", sim=BundleSimulator())
    host.trust_init()
    model = write_model(base / "tiny.gguf", context=256).read_bytes()
    files = {"model/tiny.gguf": model, "recipe.toml": b'name = "demo"\n'}
    slot = host.install(
        host.sim.bundle("1.0.0", name="demo", files=files, runtime=RUNTIME),
        InstallOptions(skip_health_check=True),
    )
    key = _add_key(host.root, "client")
    scrape_key = _add_key(host.root, "prometheus", "--scope", "metrics")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (base / "serve.log").open("w")
    server = subprocess.Popen(
        [
            *CLI,
            "--root",
            str(host.root),
            "serve",
            "--port",
            str(port),
            "--threads",
            "1",
            "--max-concurrency",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: server.poll() is not None or _models(url, key) == ["demo"],
            timeout_s=90,
            what="appliance serve to start",
        )
        if server.poll() is not None:
            pytest.fail("serve exited:\n" + (base / "serve.log").read_text())
        yield Served(url=url, key=key, scrape_key=scrape_key, slot_id=slot.id, root=base)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_metrics_carry_the_aligned_names_with_model_and_slot(served: Served) -> None:
    before = served.metrics()
    served.chat()
    after = served.metrics()

    def value(
        samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
    ) -> float:
        return sum(v for ls, v in samples.get(name, ()) if labels.items() <= ls.items())

    ours = {"model_name": "demo", "slot": "active"}
    generated = value(after, "appliance:generation_tokens_total", **ours) - value(
        before, "appliance:generation_tokens_total", **ours
    )
    legacy = value(after, "appliance_completion_tokens_total") - value(
        before, "appliance_completion_tokens_total"
    )
    assert generated == legacy > 0  # the aligned and the first names count the same tokens
    assert value(after, "appliance:prompt_tokens_total", **ours) > 0
    for histogram in ("e2e_request_latency_seconds", "time_to_first_token_seconds"):
        assert value(after, f"appliance:{histogram}_count", **ours) >= 1, histogram
    ok = {"route": "/v1/chat/completions", "status": "200", **ours}
    assert value(after, "appliance:http_requests_total", **ok) == 1 + value(
        before, "appliance:http_requests_total", **ok
    )
    assert value(after, "appliance:num_requests_waiting", model_name="demo") == 0
    assert value(after, "appliance:num_requests_running", model_name="demo") == 0
    assert value(after, "appliance:kv_cache_usage_perc", model_name="demo") == 0
    assert value(after, "appliance:model_ready", **ours) == 1
    assert value(after, "appliance:slot_info", slot_id=served.slot_id, **ours) == 1
    # GPU figures only where NVML works; on a machine without, none (and the scrape works).
    gpu = [name for name in after if name.startswith("appliance:gpu_")]
    assert bool(gpu) == nvml_works(), gpu


def test_dashboard_and_alerts_read_only_exported_names(served: Served, tmp_path: Path) -> None:
    served.chat()
    served.chat(stream=True)  # time per output token is measured on streamed answers
    names = set(served.metrics())
    out = exported(tmp_path)
    # Series Prometheus makes itself, and GPU series a machine without a GPU cannot show
    # (their names come from the collector's own description, the code that exports them).
    known = names | {"up"} | {f.name for f in GpuCollector().describe()}
    for expr in [*dashboard_exprs(out / DASHBOARD), *alert_exprs(out / ALERTS)]:
        unknown = metric_names(expr) - known
        assert not unknown, f"{expr!r} reads {unknown}, which /metrics does not export"


@dataclass
class PrometheusServer:
    url: str
    rules: Path | None = None  # the rule file it loaded

    def query(self, promql: str) -> list[dict[str, Any]]:
        response = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])


@pytest.fixture
def prometheus(served: Served, tmp_path: Path) -> Iterator[PrometheusServer]:
    if shutil.which("prometheus") is None:
        pytest.skip(PROMETHEUS_MISSING)
    rules = exported(tmp_path) / ALERTS
    secret = tmp_path / "scrape-key"
    secret.write_text(served.scrape_key)
    secret.chmod(0o600)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{json.dumps(str(rules))}]\n"
        "scrape_configs:\n"
        "  - job_name: appliance\n"
        f"    authorization: {{credentials_file: {json.dumps(str(secret))}}}\n"
        f"    static_configs: [{{targets: [{json.dumps(served.url.removeprefix('http://'))}]}}]\n"
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            return True
        try:
            return httpx.get(url + "/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, timeout_s=30, what="prometheus to start")
        if process.poll() is not None:
            pytest.fail("prometheus exited:\n" + (tmp_path / "prometheus.log").read_text())
        yield PrometheusServer(url, rules)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@requires_prometheus
def test_a_real_prometheus_scrapes_serve_and_loads_the_rules(
    served: Served, prometheus: PrometheusServer
) -> None:
    wait_for(
        lambda: [r["value"][1] for r in prometheus.query('up{job="appliance"}')] == ["1"],
        timeout_s=20,
        what="a successful scrape (up == 1)",
    )
    served.chat()
    selector = 'appliance:http_requests_total{job="appliance", route="/v1/chat/completions"}'
    wait_for(lambda: bool(prometheus.query(selector)), timeout_s=20, what="our series")
    series = prometheus.query(selector)
    labels = series[0]["metric"]
    assert labels["model_name"] == "demo"
    assert labels["slot"] == "active"
    assert labels["status"] == "200"
    assert float(series[0]["value"][1]) >= 1
    info = prometheus.query('appliance:slot_info{job="appliance"}')
    assert [r["metric"]["slot_id"] for r in info] == [served.slot_id]
    tokens = prometheus.query('sum(appliance:generation_tokens_total{job="appliance"})')
    assert float(tokens[0]["value"][1]) > 0

    def rules() -> list[dict[str, Any]]:
        response = httpx.get(prometheus.url + "/api/v1/rules", timeout=10)
        response.raise_for_status()
        return [r for g in response.json()["data"]["groups"] for r in g["rules"]]

    wait_for(
        lambda: all(r["health"] == "ok" for r in rules()) and bool(rules()),
        timeout_s=20,
        what="every alert rule evaluated without error",
    )
    loaded = rules()
    assert prometheus.rules is not None
    assert len(loaded) == len(alert_exprs(prometheus.rules))
    firing = [r["name"] for r in loaded if r["state"] == "firing"]
    assert "ApplianceDown" not in firing and "ApplianceModelNotReady" not in firing


@requires_prometheus
def test_up_drops_to_zero_when_serve_is_gone(tmp_path: Path) -> None:
    """The "engine down" alert rests on up == 0: a scrape of a port nobody serves gives it."""
    dead = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - {{job_name: appliance, static_configs: [{{targets: ['127.0.0.1:{dead}']}}]}}\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = PrometheusServer(f"http://127.0.0.1:{port}")

    def down() -> bool:
        try:
            return [r["value"][1] for r in server.query('up{job="appliance"}')] == ["0"]
        except httpx.TransportError:
            return False

    try:
        wait_for(down, timeout_s=30, what="up == 0 for a server that is gone")
    finally:
        process.terminate()
        process.wait(timeout=30)
