from __future__ import annotations

import pytest

from vmpool.cli.connection import parse_server
from vmpool.cli.errors import CliError
from vmpool.config.loading import ConfigError, parse_config
from vmpool.core.address import split_host_port


def test_host_port() -> None:
    assert split_host_port("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert split_host_port("[::1]:0") == ("::1", 0)
    assert split_host_port(":9090", "0.0.0.0") == ("0.0.0.0", 9090)


@pytest.mark.parametrize("bad", ["localhost", "host:", "host:65536", "host:-1", "host:x", "h:²"])
def test_not_host_port(bad: str) -> None:
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        split_host_port(bad)


def test_config_and_cli_read_addresses_alike() -> None:
    with pytest.raises(ConfigError, match="listen"):
        parse_config({"listen": "localhost"})
    assert parse_config({"listen": "[::]:0"}).listen == "[::]:0"
    assert parse_server("[::1]:50051") == ("::1", 50051)
    assert parse_server(":50051") == ("localhost", 50051)
    for bad in ("localhost", "h:0"):
        with pytest.raises(CliError, match="--server"):
            parse_server(bad)
