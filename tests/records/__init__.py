"""One module of registry records per loss family; tests/registry.py lists them all."""
