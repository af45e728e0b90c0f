"""``python -m builder``: the same as the ``appliance-builder`` command."""

from builder.cli import main

main()
