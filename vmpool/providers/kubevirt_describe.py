"""Connection details of a KubeVirt VM for DescribeInstance: one GET of its
VirtualMachineInstance (status.interfaces, status.nodeName, status.phase)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from kubernetes_asyncio import client

from vmpool.config.schema import KubevirtProviderConfig
from vmpool.providers import errors
from vmpool.providers.base import VMDetails
from vmpool.providers.kubevirt_client import ApiCaller, load_client_configuration
from vmpool.providers.kubevirt_manifest import API_GROUP, API_VERSION

log = structlog.get_logger(__name__)

VMIS = "virtualmachineinstances"


def vmi_details(vmi: Mapping[str, Any]) -> VMDetails:
    """What a VMI's status says about reaching it. Every interface's IPs
    (``ipAddresses``, else ``ipAddress``), in order, without repeats."""
    status = vmi.get("status") or {}
    addresses: list[str] = []
    for iface in status.get("interfaces") or []:
        ips = iface.get("ipAddresses") or ([iface["ipAddress"]] if iface.get("ipAddress") else [])
        for ip in ips:
            if isinstance(ip, str) and ip and ip not in addresses:
                addresses.append(ip)
    return VMDetails(
        addresses=tuple(addresses),
        node=str(status.get("nodeName") or ""),
        phase=str(status.get("phase") or ""),
    )


class KubevirtDescriber:
    """Its own API client on the serving side; rate-limited like the provider."""

    def __init__(
        self,
        config: KubevirtProviderConfig,
        *,
        client_configuration: client.Configuration | None = None,
        request_timeout: float = 5.0,
    ) -> None:
        self._config = config
        self._client_configuration = client_configuration
        self._request_timeout = request_timeout
        self._caller = ApiCaller(qps=config.qps, burst=config.burst, max_wait=2.0, attempts=2)
        self._api_client: client.ApiClient | None = None

    async def _custom(self) -> client.CustomObjectsApi:
        if self._api_client is None:
            configuration = self._client_configuration or await load_client_configuration(
                self._config.kubeconfig
            )
            self._api_client = client.ApiClient(configuration)
        return client.CustomObjectsApi(self._api_client)

    async def describe(self, name: str) -> VMDetails | None:
        custom = await self._custom()
        ns = self._config.namespace
        try:
            obj: Any = await self._caller.call(
                "get",
                f"VirtualMachineInstance {ns}/{name}",
                lambda: custom.get_namespaced_custom_object(
                    API_GROUP, API_VERSION, ns, VMIS, name, _request_timeout=self._request_timeout
                ),
                expected=(errors.NotFound,),
            )
        except errors.NotFound:
            return None
        except errors.ProviderError as err:
            # Details are a courtesy: the lease itself is still answered.
            log.warning("kubevirt_describe_failed", vm=name, error=str(err))
            return None
        return vmi_details(obj) if isinstance(obj, dict) else None

    async def close(self) -> None:
        if self._api_client is not None:
            await self._api_client.close()
            self._api_client = None
