"""Model runtimes behind one interface (:class:`appliance.runtime.base.Backend`)."""
