"""The REST server: an OpenAI-compatible API for the model in the active slot.

Entry points live in their modules (this package imports nothing, so that the CLI can read
:class:`~appliance.server.settings.ServerSettings` without loading FastAPI):
:func:`appliance.server.app.create_app`, :func:`appliance.server.run.run_server`,
:class:`appliance.server.holder.ModelHolder`, :func:`appliance.server.serve.serve`.
"""
