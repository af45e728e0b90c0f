"""The ``appliance`` CLI with the changes proposed in docs/benchmarks.md (experiment only).

The first two changes below went into the product in commit 5dd0363 (its own implementation);
this driver keeps them patched in so that runs of older trees can be compared, and so that
the product's implementation can be checked against this one. Same command line as
``appliance``; before running it, the changes are patched in at run time (the product code is
not modified):

- ``Limits.chunk_bytes`` 256 KiB instead of 1 MiB (8 buffers: 2 MiB in flight), for install
  and verify;
- the staging writer hands each finished file to a second thread that fsyncs and closes it,
  and goes on writing the next file; all files are fsynced before the directories, as now
  (``profile_install.ExperimentSink``, mode "thread").

By default it imports the whole CLI module, so its start-up cost is the product's. With
``--lean`` as the first argument it stands for a CLI that imports only what install and verify
use (click, the installer, trust, host, verifier: no server, API keys, service or rich),
and runs ``--root DIR install BUNDLE [--skip-health-check]`` or ``--root DIR verify BUNDLE``
itself through ``Appliance``, as the real commands do. bench_bundle.py runs both with
``--proposed``.

    .venv/bin/python bench/proposed_cli.py --root DIR install bundle.tar
    .venv/bin/python bench/proposed_cli.py --lean --root DIR verify bundle.tar
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from profile_install import ExperimentSink

import appliance.installer as installer_module
from signing.bundle import Limits

PROPOSED_CHUNK = 256 << 10


def lean(argv: list[str]) -> None:
    """install / verify through Appliance, importing only what those commands need."""
    import click  # noqa: F401 - the real CLI needs it; its import cost belongs in the time

    from appliance.installer import Appliance, InstallOptions

    parser = argparse.ArgumentParser(prog="appliance (lean)")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("command", choices=["install", "verify"])
    parser.add_argument("bundle")
    parser.add_argument("--skip-health-check", action="store_true")
    args = parser.parse_args(argv)
    app = Appliance(args.root)
    if args.command == "verify":
        verified = app.verify(args.bundle)
        print(f"OK {verified.manifest.name} {verified.manifest.version}")
        return
    options = InstallOptions(skip_health_check=args.skip_health_check)  # type: ignore[call-arg]
    slot = app.install(args.bundle, options)
    print(f"installed {slot.name} {slot.version} into slot {slot.id}; now active")


def main() -> None:
    ExperimentSink.mode = "thread"
    installer_module.StagingSink = ExperimentSink  # type: ignore[misc]
    installer_module.Limits = functools.partial(Limits, chunk_bytes=PROPOSED_CHUNK)  # type: ignore[misc]
    if sys.argv[1:2] == ["--lean"]:
        lean(sys.argv[2:])
        return
    from appliance.cli import main as appliance_main

    sys.argv[0] = "appliance"
    appliance_main()


if __name__ == "__main__":
    main()
