"""Where VMs come from: the Provider protocol, the fake and KubeVirt providers."""
