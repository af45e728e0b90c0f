"""The frozen ``appliance`` program's entry (builder/freeze.py, docs/adr/0018).

The ``appliance`` command line, or, under a ``python*`` name or with an interpreter option
first, the Python interpreter of slot environments (appliance.interpreter). Nothing is imported
before that choice but the chooser, so that an environment's packages are found first.
"""

import sys

from appliance.interpreter import main as python_main
from appliance.interpreter import wants_interpreter

if wants_interpreter(sys.argv):
    try:
        status = python_main(sys.argv)
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - as python: print an uncaught exception, status 1
        import traceback

        traceback.print_exc()
        status = 1
    sys.exit(status)
else:
    from appliance.interpreter import program_metadata

    sys.path.append(str(program_metadata()))
    from appliance.cli import main

    main()
