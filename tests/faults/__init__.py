"""Fault-injection tests over the running Ray Serve app (a package, so its Ray fixtures are torn down
before tests/ray starts its own Ray)."""
