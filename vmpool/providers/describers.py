"""The serving side's view of VMs for DescribeInstance, by provider kind."""

from __future__ import annotations

from vmpool.config.schema import Config
from vmpool.providers.base import Describer
from vmpool.providers.fake import FakeDescriber
from vmpool.store.db import Database
from vmpool.store.fakecloud import FakeCloud


def build_describer(config: Config, db: Database) -> Describer:
    if config.provider.kind == "kubevirt":
        # lazy: kubernetes_asyncio takes seconds to import; only provider kubevirt needs it
        from vmpool.providers.kubevirt_describe import KubevirtDescriber

        return KubevirtDescriber(config.provider.kubevirt)
    return FakeDescriber(FakeCloud(db))
