"""pip, as source files: the installer runs ``SLOT/env/bin/python .../pip/__pip-runner__.py``
(appliance.pipsetup), which needs a real file and imports pip from the folder beside it."""

from pathlib import Path

from PyInstaller.utils.hooks import collect_data_files, collect_submodules, get_package_paths

module_collection_mode = "py"
# Every module: pip imports its commands and vendored packages by name.
hiddenimports = collect_submodules("pip")
_, _package = get_package_paths("pip")
datas = [*collect_data_files("pip"), (str(Path(_package) / "__pip-runner__.py"), "pip")]
