"""A fake Kubernetes API server with a simulated KubeVirt controller, for tests.

Start it in-process (``FakeKube``, or the pytest fixtures in
``tests.fakekube.fixtures``) or standalone::

    python -m tests.fakekube --port 0 --kubeconfig /tmp/kubeconfig
"""

from __future__ import annotations

from tests.fakekube.server import (
    NODES,
    VMIS,
    VMS,
    FakeKube,
    Request,
    running_fakekube,
    status_object,
)

__all__ = [
    "NODES",
    "VMIS",
    "VMS",
    "FakeKube",
    "Request",
    "running_fakekube",
    "status_object",
]
