"""``appliance monitoring``: hand the shipped dashboard and alert rules to the operator."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.console import emit_json
from appliance.monitoring import ALERTS, DASHBOARD, export


@click.group()
def monitoring() -> None:
    """The Grafana dashboard and Prometheus alert rules for 'appliance serve'."""


@monitoring.command("export")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the files written as JSON.")
def monitoring_export(directory: Path, as_json: bool) -> None:
    """Write dashboard.json and alerts.yml into DIRECTORY (replacing older copies).

    Import dashboard.json into Grafana; list alerts.yml under rule_files in prometheus.yml
    (docs/operator-guide.md, "Monitoring")."""
    written = export(directory)
    if as_json:
        emit_json({"files": [str(path) for path in written]})
        return
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(
        f"import {DASHBOARD} into Grafana; add {ALERTS} to rule_files in prometheus.yml "
        "and scrape /metrics as job 'appliance' with an API key"
    )
