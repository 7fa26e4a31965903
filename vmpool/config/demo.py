"""What `vmpool serve` runs with no config file: a demo a newcomer can poke at."""

from __future__ import annotations

from typing import Any

DEMO_CONFIG: dict[str, Any] = {
    "listen": "127.0.0.1:50051",
    "metrics_listen": "127.0.0.1:9090",
    "default_pool": "small",
    "provider": {"kind": "fake", "fake": {"boot_seconds": 2}},
    "pools": [
        {
            "name": "small",
            "labels": {"os": "cirros", "size": "small"},
            "zone": "demo-zone-a",
            "min_ready": 2,
            "max_size": 5,
            "max_provisioning": 2,
            "default_lease": "30m",
            "max_lease": "8h",
            "reservation_ttl": "5m",
            "boot_timeout": "2m",
        }
    ],
}
