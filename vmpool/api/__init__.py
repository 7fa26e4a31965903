"""The gRPC handlers: lease API, pool API, extension and admin APIs, and their call wrapper."""
