"""Where does install time go? In-process experiments on one bundle (docs/benchmarks.md).

Calls ``appliance.installer.Appliance`` directly (no CLI start-up), with:

- different ``Limits`` (chunk size, number of buffers);
- experimental staging sinks defined here, swapped in for ``appliance.staging.StagingSink``
  for the duration of one run (the product code is not modified): an instrumented copy of the
  product's writer loop that records the time spent in ``os.write`` and ``fsync`` and the time
  the reader waited for a free buffer, and variants of it (``fdatasync``; ``fsync`` on a
  thread of its own; early writeback with ``sync_file_range``; no fsync at all, as a lower
  bound that is not a proposal);
- reference runs in the same interleaving: read only, read + sha256 (``Appliance.verify``),
  and ``tar -xf`` + ``sync`` / per-file fsync, as child processes.

``install (product)`` takes the product's path for a bundle file (``CopyingSink``: kernel copy,
hash of the staged bytes); ``install (product, streaming path)`` and every experimental sink
run the streaming path (``StagingSink``) on the same file (``Limits.copy_window_bytes=0``).

    .venv/bin/python bench/profile_install.py --size 1G --repeat 3

Builds its own bundle with the real CLI (through bench_bundle.Fixture) unless --bundle and
--root-json are given. Prints one table: median and min wall time per variant and the
ratio to ``tar -xf && sync``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import os
import queue
import shutil
import statistics
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from bench_bundle import (
    DEFAULT_WORKDIR,
    MIB,
    Fixture,
    parse_size,
    run_child,
    settle,
    shuffled,
    size_label,
    tools,
    warm,
)

import appliance.staging as staging_module
from appliance.installer import Appliance, InstallOptions
from appliance.staging import StagingSink
from signing.bundle import Limits

_SYNC_FILE_RANGE_WRITE = 2
# Step I7 (health check) loads the model: random weights cannot load, and loading is no part
# of the streaming copy measured here.
INSTALL_OPTIONS = (
    InstallOptions(skip_health_check=True)  # type: ignore[call-arg]
    if "skip_health_check" in {f.name for f in dataclasses.fields(InstallOptions)}
    else InstallOptions()
)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def sync_file_range_write(fd: int, offset: int, length: int) -> None:
    """Start writeback of a range now, without waiting for it (SYNC_FILE_RANGE_WRITE)."""
    if _libc.sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Stats:
    """Seconds accumulated by the instrumented sink during one install."""

    def __init__(self) -> None:
        self.write = 0.0
        self.fsync = 0.0
        self.wait_buffer = 0.0
        self.writer_idle = 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


class ExperimentSink(StagingSink):
    """The product's StagingSink writer loop, copied, timed, with optional changes.

    mode: "fsync" (the product), "fdatasync", "thread" (fsync each finished file on a second
    thread while the next file is written), "sfr" (sync_file_range(WRITE) after every chunk,
    fsync at the end of the file), "none" (no file fsync: the lower bound).
    """

    mode: ClassVar[str] = "fsync"
    stats: ClassVar[Stats] = Stats()

    def buffer(self) -> bytearray:
        start = time.perf_counter()
        buf = super().buffer()
        type(self).stats.wait_buffer += time.perf_counter() - start
        return buf

    def _run(self) -> None:  # mirrors StagingSink._run, plus variants
        stats = type(self).stats
        mode = type(self).mode
        fd = -1
        offset = 0
        made_dirs: set[Path] = {self._dir}
        syncer: queue.Queue[int | None] = queue.Queue()
        syncer_errors: list[OSError] = []

        def fsync_worker() -> None:
            while (item := syncer.get()) is not None:
                try:
                    os.fsync(item)
                    os.close(item)
                except OSError as exc:
                    syncer_errors.append(exc)

        worker = threading.Thread(target=fsync_worker, daemon=True)
        if mode == "thread":
            worker.start()
        while True:
            idle = time.perf_counter()
            op, arg, length = self._ops.get()
            stats.writer_idle += time.perf_counter() - idle
            if op == "stop":
                break
            try:
                if self._error is not None:
                    continue
                if op == "begin":
                    path = self._dir / arg
                    staging_module._make_parents(path.parent, made_dirs)
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                    fd = os.open(path, flags, 0o644)
                    offset = 0
                elif op == "write":
                    start = time.perf_counter()
                    view = memoryview(arg)[:length]
                    while view:
                        view = view[os.write(fd, view) :]
                    if mode == "sfr":
                        sync_file_range_write(fd, offset, length)
                    offset += length
                    stats.write += time.perf_counter() - start
                elif op == "end":
                    start = time.perf_counter()
                    if mode == "thread":
                        syncer.put(fd)
                    else:
                        if mode == "fdatasync":
                            os.fdatasync(fd)
                        elif mode != "none":
                            os.fsync(fd)
                        os.close(fd)
                    fd = -1
                    stats.fsync += time.perf_counter() - start
            except OSError as exc:
                self._error = exc
            finally:
                if op == "write":
                    self._free.put(arg)
        if fd >= 0:
            os.close(fd)
        start = time.perf_counter()
        if mode == "thread":
            syncer.put(None)
            worker.join()
            if syncer_errors and self._error is None:
                self._error = syncer_errors[0]
        if self._error is None:
            for directory in sorted(made_dirs, key=lambda p: len(p.parts), reverse=True):
                staging_module.fsync_dir(directory)
        stats.fsync += time.perf_counter() - start


def kernel_copy_prototype(bundle: Path, dest: Path, window: int = 8 << 20) -> None:
    """A prototype of the proposed install data path, not a full install (no head, no slot).

    For each payload member: ``os.copy_file_range`` copies a window from the bundle into the
    staging file inside the kernel (one copy instead of read + write), then the window is read
    back from the staging file's page cache and hashed, so what is hashed is what was stored;
    finished files are fsynced on a second thread. Member offsets come from :mod:`tarfile` here
    (the product would advance its strict reader past the data instead).
    """
    with tarfile.open(bundle) as archive:
        members = [
            (m.name, m.offset_data, m.size)
            for m in archive.getmembers()
            if m.name.startswith("payload/")
        ]
    to_sync: queue.Queue[int | None] = queue.Queue()

    def syncer() -> None:
        while (fd := to_sync.get()) is not None:
            os.fsync(fd)
            os.close(fd)

    thread = threading.Thread(target=syncer)
    thread.start()
    buf = bytearray(window)
    src = os.open(bundle, os.O_RDONLY)
    try:
        for name, offset, size in members:
            path = dest / name
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            digest = hashlib.sha256()
            done = 0
            while done < size:
                n = min(window, size - done)
                got = 0
                while got < n:
                    got += os.copy_file_range(src, fd, n - got, offset + done + got, done + got)
                view = memoryview(buf)[:n]
                os.preadv(fd, [view], done)
                digest.update(view)
                done += n
            to_sync.put(fd)
    finally:
        to_sync.put(None)
        thread.join()
        os.close(src)


# -- runs -------------------------------------------------------------------------------------


class Runner:
    def __init__(self, fx: Fixture, bundle: Path, root_json: Path) -> None:
        self.fx = fx
        self.bundle = bundle
        self.root_data = root_json.read_bytes()
        self.scratch = fx.work / "profile-scratch"
        self.host = self.scratch / "host"
        self.child_cpu = 0.0

    def fresh(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True)
        Appliance(self.host).trust_init(self.root_data, fingerprint=None)

    def install(self, *, mode: str | None = None, limits: Limits | None = None) -> float:
        if mode is not None:
            # The experimental sinks replace StagingSink, the streaming path: keep a bundle
            # file off the kernel copy (CopyingSink) so that they are what runs.
            limits = dataclasses.replace(limits or Limits(), copy_window_bytes=0)
        app = Appliance(self.host, limits=limits)
        original = staging_module.StagingSink
        if mode is not None:
            ExperimentSink.mode = mode
            staging_module.StagingSink = ExperimentSink  # type: ignore[misc]
        try:
            start = time.perf_counter()
            app.install(str(self.bundle), INSTALL_OPTIONS)
            return time.perf_counter() - start
        finally:
            staging_module.StagingSink = original  # type: ignore[misc]

    def verify(self) -> float:
        start = time.perf_counter()
        Appliance(self.host).verify(str(self.bundle))
        return time.perf_counter() - start

    def kernel_copy(self) -> float:
        dest = self.scratch / "kernel-copy"
        dest.mkdir()
        start = time.perf_counter()
        kernel_copy_prototype(self.bundle, dest)
        return time.perf_counter() - start

    def read_only(self) -> float:
        buf = bytearray(MIB)
        start = time.perf_counter()
        with self.bundle.open("rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
        return time.perf_counter() - start

    def shell(self, script: str) -> float:
        extract = self.scratch / "extract"
        extract.mkdir()
        argv = ["sh", "-c", script, "sh", str(self.bundle), str(extract)]
        sample = run_child(argv, log=self.fx.log)
        self.child_cpu = sample.user_s + sample.sys_s
        return sample.wall_s


MODES = {
    "fsync": "fsync in the writer",
    "thread": "fsync on a thread",
    "sfr": "sync_file_range",
    "fdatasync": "fdatasync in the writer",
    "none": "no file fsync (bound)",
}


def variants(
    runner: Runner, chunk_sizes: list[int], buffer_counts: list[int], base_chunk: int
) -> dict[str, Any]:
    """Every variant names its sink and chunk size explicitly, whatever the product's defaults.

    "install (product)" is the product as it stands (its StagingSink, default Limits); the
    other install variants run ExperimentSink: "fsync in the writer" is the product's writer
    loop before 5dd0363 (it fsynced each file on the writer thread, with 1 MiB chunks).
    """
    tar = 'tar -xf "$1" -C "$2"'
    out: dict[str, Callable[[], float]] = {
        "tar -xf && sync": lambda: runner.shell(f"{tar} && sync"),
        "tar -xf && fsync each file": lambda: runner.shell(
            f'{tar} && find "$2" -exec sync -- {{}} +'
        ),
        "openssl dgst -sha256 bundle": lambda: runner.shell('openssl dgst -sha256 "$1"'),
        "read only (python, 1 MiB)": runner.read_only,
        "verify (product: read + sha256)": runner.verify,
        "install (product)": runner.install,
        "install (product, streaming path: copy_window_bytes=0)": lambda: runner.install(
            limits=Limits(copy_window_bytes=0)
        ),
        "prototype: in-kernel copy, hash the staged bytes": runner.kernel_copy,
    }

    def add(mode: str, chunk: int, buffers: int = 8) -> None:
        name = f"install, {MODES[mode]}, {size_label(chunk)}"
        if buffers != 8:
            name += f" x {buffers} buffers"
        limits = Limits(chunk_bytes=chunk, buffers=buffers)
        out[name] = lambda: runner.install(mode=mode, limits=limits)

    for mode in MODES:
        add(mode, base_chunk)
    for chunk in chunk_sizes:
        for mode in ("fsync", "thread", "sfr"):
            add(mode, chunk)
    for count in buffer_counts:
        add("fsync", base_chunk, count)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--base-chunk", default="1M", help="chunk size of the sink variants")
    parser.add_argument("--chunks", default="256K,4M", help="other chunk sizes to try")
    parser.add_argument("--buffers", default="2,32", help="buffer counts to try")
    parser.add_argument("--only", default="", help="comma-separated substrings of variants")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR.with_name("profile"))
    parser.add_argument("--bundle", type=Path, help="an existing bundle (with --root-json)")
    parser.add_argument("--root-json", type=Path, help="the root that signed --bundle")
    args = parser.parse_args()

    appliance, builder = tools()
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.setdefault("SOURCE_DATE_EPOCH", str(int(time.time())))
    try:
        fx = Fixture(work, appliance, builder, work / "commands.log")
        if args.bundle is not None and args.root_json is not None:
            bundle, root_json = args.bundle.resolve(), args.root_json.resolve()
        else:
            bundle, _ = fx.build(parse_size(args.size), args.files)
            root_json = fx.root_json
        runner = Runner(fx, bundle, root_json)
        table = variants(
            runner,
            [parse_size(c) for c in args.chunks.split(",") if c],
            [int(b) for b in args.buffers.split(",") if b],
            parse_size(args.base_chunk),
        )
        if args.only:
            keep = [s.strip() for s in args.only.split(",")]
            table = {
                k: v
                for k, v in table.items()
                if k.startswith(("tar", "openssl")) or any(s in k for s in keep)
            }
        names = list(table)
        samples: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        phases: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for rep in range(args.repeat):
            order = shuffled(names, rep)
            for name in order:
                runner.fresh()
                settle()
                warm(bundle)
                ExperimentSink.stats = Stats()
                runner.child_cpu = 0.0
                before = os.times()
                samples[name].append(table[name]())
                after = os.times()
                cpu[name].append(
                    after.user - before.user + after.system - before.system + runner.child_cpu
                )
                phases[name].append(ExperimentSink.stats.as_dict())
            print(f"repetition {rep + 1}/{args.repeat} done", flush=True)
        shutil.rmtree(runner.scratch, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(samples["tar -xf && sync"])
    print(
        f"\n{size_label(parse_size(args.size))} bundle, {args.files} files, "
        f"{args.repeat} repetitions, in-process (no CLI start-up)\n"
    )
    base_min = min(samples["tar -xf && sync"])
    print(
        "| variant | median | min | / tar+sync (median) | / tar+sync (min) | CPU (median) "
        "| write | fsync | reader waits | writer idle |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        s = samples[name]
        ph = phases[name]
        cells = [
            name,
            f"{statistics.median(s):.2f} s",
            f"{min(s):.2f} s",
            f"{statistics.median(s) / base:.2f}x",
            f"{min(s) / base_min:.2f}x",
            f"{statistics.median(cpu[name]):.2f} s",
        ]
        if any(p["write"] for p in ph):
            for key in ("write", "fsync", "wait_buffer", "writer_idle"):
                cells.append(f"{statistics.median(p[key] for p in ph):.2f} s")
        else:
            cells += [""] * 4
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
