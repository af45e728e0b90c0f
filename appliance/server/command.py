"""``appliance serve``, loaded by appliance.cli only when it is invoked (see _LazyGroup there)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from appliance.server.settings import ServerSettings, settings_options

if TYPE_CHECKING:
    from appliance.installer import Appliance


@click.command()
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML file of server settings (keys named like the options, with '_').",
)
@settings_options
@click.pass_obj
def serve(app: Appliance, /, config: Path | None, **options: Any) -> None:
    """Serve the active slot's model: an OpenAI-compatible REST API (see docs/cli.md).

    Every option may also come from the environment (APPLIANCE_<OPTION>) or --config;
    options win over the environment, the environment over the file.
    """
    from appliance.server.serve import serve as serve_active  # noqa: PLC0415 - heavy

    serve_active(app.paths.root, ServerSettings.load(config=config, **options))
