"""One router per resource; :mod:`appliance.server.app` mounts them."""
