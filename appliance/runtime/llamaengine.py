"""One supervised ``llama-server`` child: the llama.cpp engine's process (docs/adr/0014).

The builder compiles ``llama-server`` beside the bindings, from the same pinned llama.cpp source
and with the same portable flags (builder.llamabuild), so it lands in the slot's environment as
``site-packages/bin/llama-server`` next to the CPU variants. The child is private to this
process:

- it listens on a unix socket in a directory only this user can enter, and requires a random
  per-start secret as its API key: nothing else on the host can talk to it;
- its CPU backend is the variant this host was proven to execute (appliance.runtime.cpuvariant):
  ggml loads the best scored ``libggml-cpu-*.so`` of the executable's directory, and CPUID can
  lie (AMX here), so the engine runs from a directory of its own (:func:`engine_dir`) that holds
  a hard link to the server and links to that one variant and the GPU backends, nothing else;
- it dies with us (``PR_SET_PDEATHSIG``), is restarted with back-off when it crashes, and is
  stopped with SIGTERM (SIGKILL after :data:`STOP_TIMEOUT_S`).

Settings come from the signed runtime table (context, threads, GPU layers) and from serve
(parallel sequences). Threads default to half the CPUs this process may use, at least one: on a
shared host a llama.cpp thread that loses its core stalls every other one at the next barrier,
and throughput collapses; one thread per physical core (hyper-threads share the units) holds up.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import queue
import re
import secrets
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from appliance.runtime import cpuvariant
from appliance.runtime.base import DEFAULT_CONTEXT, RuntimeSettings
from appliance.slots import SlotPaths
from signing.errors import ModelError

LOG: Final = logging.getLogger(__name__)
ENGINE_PREFIX: Final = "llama-server "  # how every line of the child's log this module keeps begins
SERVER_NAME: Final = "llama-server"
READY_TIMEOUT_S: Final = 300.0
STOP_TIMEOUT_S: Final = 10.0
BACKOFF_S: Final = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_S: Final = 60.0  # a child that ran this long resets the back-off
TAIL_LINES: Final = 40
STARTUP_LINES: Final = 2000
LOG_LAG_S: Final = 5.0  # how long to wait for the log to catch up with /health
_LOADED: Final = "llama_server: model loaded"  # llama-server's last startup line that matters
# llama.cpp's log line: "0.00.006.873 E gguf_init_from_file: failed to open ..."
_LOG_LINE: Final = re.compile(r"^\s*[0-9.]+ (?P<level>[A-Z]) (?P<text>.*)$")
_PR_SET_PDEATHSIG: Final = 1


def default_threads() -> int:
    """Half the CPUs this process may run on, at least one (module docstring)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)


@dataclass(frozen=True)
class ServerBinary:
    """A ``llama-server`` and the libraries it loads."""

    server: Path
    lib: Path  # libllama.so, libggml*.so, libmtmd.so
    runtime: cpuvariant.Runtime | None  # the dispatch build's CPU variants, or None


def find_server() -> ServerBinary:
    """The ``llama-server`` installed with this interpreter's llama_cpp (``site-packages/bin``);
    ModelError when there is none (a runtime built before the server was part of it)."""
    runtime = cpuvariant.find_runtime()
    if runtime is not None:
        site = runtime.site
    else:
        import importlib.util  # noqa: PLC0415 - only here

        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or spec.origin is None:
            raise ModelError("the llama.cpp engine needs llama-cpp-python, which is not installed")
        site = Path(spec.origin).parent.parent
    server = site / "bin" / SERVER_NAME
    if not server.is_file():
        raise ModelError(
            f"this environment's llama.cpp has no {SERVER_NAME} ({server}): rebuild the bundle "
            "with this appliance-builder, which compiles it beside the bindings"
        )
    return ServerBinary(server=server, lib=site / "lib", runtime=runtime)


def engine_dir(binary: ServerBinary, variant: Path | None, where: Path) -> Path:
    """A directory from which the server loads exactly ``variant`` and the GPU backends: a hard
    link (or copy) of the server, symbolic links to the libraries (module docstring)."""
    where.mkdir(parents=True, exist_ok=True)
    for old in where.iterdir():
        old.unlink()
    server = where / SERVER_NAME
    try:
        os.link(binary.server, server)
    except OSError:  # another file system: a copy runs the same
        import shutil  # noqa: PLC0415

        shutil.copy2(binary.server, server)
    backends = [variant] if variant is not None else []
    if binary.runtime is not None:
        backends += list(binary.runtime.others)
    for backend in backends:
        (where / backend.name).symlink_to(backend)
    return server


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class _Spawner:
    """Starts the children from one thread that lives as long as the process.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends, not the process:
    a child started from a request's worker thread, or from the slot follower, would be killed
    when that thread is retired. This thread is never retired.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[list[str], dict[str, Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None

    def popen(self, command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="appliance-engine-spawner", daemon=True
                )
                self._thread.start()
        done: Future[subprocess.Popen[bytes]] = Future()
        self._jobs.put((command, kwargs, done))
        return done.result()

    def _run(self) -> None:
        while True:
            command, kwargs, done = self._jobs.get()
            try:
                done.set_result(subprocess.Popen(command, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)


_SPAWNER: Final = _Spawner()


class EngineProcess:
    """One supervised ``llama-server`` (module docstring). :meth:`start` returns once it
    answers ``/health``; a crash later is restarted with back-off until :meth:`close`."""

    def __init__(
        self,
        settings: RuntimeSettings,
        *,
        embeddings: bool = False,
        chat_template: str | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
        launcher: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.embeddings = embeddings
        self.chat_template = chat_template  # Jinja, for a GGUF without one (chattemplates)
        self.secret = secrets.token_urlsafe(32)
        self._ready_timeout_s = ready_timeout_s
        # What the server (and the CPU-variant probe) run under: an emulator of an older CPU
        # (``qemu-x86_64 -cpu EPYC-Rome``) in the portability tests; nothing in production.
        self._launcher = tuple(launcher)
        self._binary = find_server()
        self._home = Path(tempfile.mkdtemp(prefix="appliance-engine-"))  # 0700
        self.socket = self._home / "engine.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._ready = threading.Event()
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        # What the child logged until it said the model is loaded (llama.cpp's buffer sizes:
        # memreport); set again by each start.
        self.startup_lines: list[str] = []
        self._loaded_logged = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.restarts = 0
        self.props: dict[str, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def command(self, server: Path) -> list[str]:
        s = self.settings
        parallel = 1 if self.embeddings else max(1, s.parallel)
        per_sequence = s.context_size or DEFAULT_CONTEXT
        threads = s.threads or default_threads()
        command = [
            str(server),
            "--model", str(s.model_path.absolute()),  # the child runs in its own directory
            "--host", str(self.socket),
            "--api-key", self.secret,
            "--alias", s.model_id,
            "--ctx-size", str(per_sequence * parallel),
            "--parallel", str(parallel),
            "--threads", str(threads),
            "--threads-batch", str(threads),
            "--threads-http", str(parallel + 4),  # the generations, and room for the rest
            "--n-gpu-layers", str(-1 if s.gpu_layers is None else s.gpu_layers),
            "--jinja",
            "--no-webui",
            "--metrics",
            "--no-slots",
            "--reasoning-format", "deepseek",
            "--timeout", "3600",
            "--log-verbosity", "4",  # llama.cpp's INFO: its buffer sizes (memreport)
            "--no-warmup",
            # No prompt cache in host memory beyond the slots' own KV cache (llama-server's
            # default is 8 GiB): the signed memory estimate is what the host was checked for.
            "--cache-ram", "0",
        ]  # fmt: skip
        for adapter in s.adapters:  # LoRA, bound to these weights by the signed manifest
            command += ["--lora", str(adapter.absolute())]
        if self.embeddings:
            command += ["--embeddings", "--pooling", "mean"]
        if self.chat_template is not None:
            template = self._home / "chat-template.jinja"
            template.write_text(self.chat_template, encoding="utf-8")
            command += ["--chat-template-file", str(template)]
        return command

    def start(self) -> None:
        """Start the child and wait until it serves (ModelError with its last words if not)."""
        variant = self._variant()
        server = engine_dir(self._binary, variant, self._home / "bin")
        self._server = server
        self._spawn()
        self._wait_ready()
        self._supervisor = threading.Thread(
            target=self._supervise, name="appliance-engine", daemon=True
        )
        self._supervisor.start()

    def _variant(self) -> Path | None:
        runtime = self._binary.runtime
        if runtime is None:
            return None  # a build with one CPU backend, linked in: nothing to choose
        memory = None if self.settings.slot is None else SlotPaths(self.settings.slot).cpu_variant
        choice = cpuvariant.choose(
            runtime, model_path=self.settings.model_path, memory=memory, launcher=self._launcher
        )
        LOG.info("%s", choice.describe())
        for warning in cpuvariant.gpu_backend_warnings(runtime):  # the CPU serves instead
            LOG.warning("%s", warning)
        return choice.path

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(self._binary.lib), env.get("LD_LIBRARY_PATH", "")) if p
        )
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        proc = subprocess.Popen(
            [*self._launcher, *self.command(self._server)],
            cwd=self._server.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - prctl only, no locks taken
        )
        with self._lock:
            self._proc = proc
        self._ready.clear()
        self.startup_lines = []
        self._loaded_logged = threading.Event()
        threading.Thread(
            target=self._drain, args=(proc,), name="appliance-engine-log", daemon=True
        ).start()

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        startup, loaded = self.startup_lines, self._loaded_logged
        for raw in proc.stdout or ():
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._tail.append(line)
                if not loaded.is_set():
                    if len(startup) < STARTUP_LINES:
                        startup.append(line)
                    if _LOADED in line:
                        loaded.set()
                LOG.debug("%s%s", ENGINE_PREFIX, line)
        loaded.set()  # the child is gone: nothing more to wait for

    def last_words(self) -> str:
        """Why the child failed: its first error line (llama.cpp's first complaint is the cause;
        later ones repeat it), else its last line, without llama.cpp's time and level prefix."""
        lines = list(self._tail)
        for line in lines:
            match = _LOG_LINE.match(line)
            if match is not None and match.group("level") == "E":
                return match.group("text").strip()
        return _LOG_LINE.sub(r"\g<text>", lines[-1]).strip() if lines else "no output"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._ready_timeout_s
        with self.client(timeout=5.0) as http:
            while time.monotonic() < deadline:
                proc = self._proc
                if proc is None or proc.poll() is not None:
                    code = None if proc is None else proc.returncode
                    raise ModelError(
                        f"{SERVER_NAME} exited ({_describe_exit(code)}) while loading the "
                        f"model: {self.last_words()}"
                    )
                try:
                    if http.get("/health").status_code == 200:
                        self.props = http.get("/props").json()
                        # llama.cpp logs from a thread of its own: the pipe may lag /health.
                        self._loaded_logged.wait(LOG_LAG_S)
                        self._ready.set()
                        return
                except (httpx.TransportError, ValueError):
                    pass
                time.sleep(0.05)
        self._kill()
        raise ModelError(
            f"{SERVER_NAME} did not load the model within {self._ready_timeout_s:.0f} s: "
            f"{self.last_words()}"
        )

    def _supervise(self) -> None:
        failures = 0
        while not self._closing.is_set():
            proc = self._proc
            if proc is None:
                return
            started = time.monotonic()
            code = proc.wait()
            if self._closing.is_set():
                return
            self._ready.clear()
            if time.monotonic() - started > STABLE_S:
                failures = 0
            delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
            failures += 1
            LOG.error(
                "%s exited (%s): %s; restarting in %.1f s",
                SERVER_NAME,
                _describe_exit(code),
                self.last_words(),
                delay,
            )
            if self._closing.wait(delay):
                return
            try:
                self._spawn()
                self._wait_ready()
                self.restarts += 1
                LOG.info("%s restarted and serving", SERVER_NAME)
            except ModelError as exc:
                LOG.error("%s did not come back: %s", SERVER_NAME, exc.diagnostics())  # noqa: TRY400

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def close(self) -> None:
        """Stop the child: SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`."""
        self._closing.set()
        self._kill()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=STOP_TIMEOUT_S)
        import shutil  # noqa: PLC0415

        shutil.rmtree(self._home, ignore_errors=True)

    def _kill(self) -> None:
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.pid

    # -- talking to it ---------------------------------------------------------------------

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    def client(self, *, timeout: float | None = 30.0) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.socket))
        return httpx.Client(
            transport=transport, base_url="http://engine", headers=self.headers, timeout=timeout
        )

    def async_client(self) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(uds=str(self.socket))
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        return httpx.AsyncClient(
            transport=transport,
            base_url="http://engine",
            headers=self.headers,
            timeout=httpx.Timeout(None),
            limits=limits,
        )


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "not started"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"
