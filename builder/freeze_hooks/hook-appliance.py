"""The appliance's own modules: commands loaded by name (``appliance serve``), the modules its
children run with ``-m`` (``appliance.runtime.healthcheck``), and ``signing``."""

from PyInstaller.utils.hooks import collect_data_files, collect_submodules, copy_metadata

hiddenimports = collect_submodules("appliance") + collect_submodules("signing")
# ``appliance --version`` reads the distribution's version.
datas = copy_metadata("airgap-appliance")
# Files the appliance reads beside its modules (the monitoring dashboard and alert rules).
datas += collect_data_files("appliance") + collect_data_files("signing")
