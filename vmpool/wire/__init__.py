"""gRPC on the wire: HTTP/2 limits, framing, the hot messages' codec, TLS, reflection."""
