"""vmpool: pools of pre-warmed VMs leased over gRPC."""
