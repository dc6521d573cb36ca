"""The monitor's options: -qmp, and the client's QMP address and arguments."""

from __future__ import annotations

import pytest

from memslots.errors import OptionError
from memslots.options import QmpEndpoint, parse_address, parse_arguments, parse_qmp_option


def test_parse_qmp_option() -> None:
    assert parse_qmp_option("unix:/tmp/x.sock,server=on,wait=off") == QmpEndpoint(
        path="/tmp/x.sock"
    )
    assert parse_qmp_option("tcp:127.0.0.1:4444,server=on,wait=off") == QmpEndpoint(
        host="127.0.0.1", port=4444
    )
    for bad in (
        "unix:",
        "tcp:localhost",
        "unix:/x,server=off",
        "unix:/x,colour=red",
        "pipe:x",
        "tcp:127.0.0.1:99999",
    ):
        with pytest.raises(OptionError):
            parse_qmp_option(bad)


def test_parse_address() -> None:
    assert parse_address("/run/qmp.sock") == "/run/qmp.sock"
    assert parse_address("qmp.sock") == "qmp.sock"
    assert parse_address("unix:/tmp/a:1") == "/tmp/a:1"
    assert parse_address("localhost:4444") == ("localhost", 4444)
    assert parse_address("tcp:127.0.0.1:4444") == ("127.0.0.1", 4444)
    assert parse_address("[::1]:4444") == ("::1", 4444)
    assert parse_address("./dir:1") == "./dir:1"


def test_parse_arguments() -> None:
    assert parse_arguments([]) == {}
    assert parse_arguments(["path=vmem0", "value=1073741824", "flag=true", "s=1G"]) == {
        "path": "vmem0",
        "value": 1073741824,
        "flag": True,
        "s": "1G",
    }
    assert parse_arguments(['{"path": "vmem0", "n": [1]}']) == {"path": "vmem0", "n": [1]}
    assert parse_arguments(["x=NaN"]) == {"x": "NaN"}
    for bad, message in [
        (["novalue"], "not of the form key=value"),
        (["=1"], "not of the form key=value"),
        (["a=1", "a=2"], "given twice"),
        (["{not json"], "not valid JSON"),
        (['{"a": 1}x'], "not valid JSON"),
        (["[1]"], "not of the form key=value"),
    ]:
        with pytest.raises(OptionError, match=message):
            parse_arguments(bad)


@pytest.mark.parametrize(
    "text", ["tcp:localhost:\u0664\u0664", "tcp:localhost:\u00b2", "tcp:h:" + "1" * 5000, "tcp:h:"]
)
def test_qmp_port_is_ascii_and_bounded(text: str) -> None:
    with pytest.raises(OptionError, match="port up to 65535"):
        parse_qmp_option(text + ",server=on,wait=off")


def test_address_port_is_bounded() -> None:
    with pytest.raises(OptionError, match="the port must be 0-65535"):
        parse_address("localhost:65536")
    with pytest.raises(OptionError, match="the port must be 0-65535"):
        parse_address("localhost:" + "9" * 5000)
    assert parse_address("localhost:\u0664") == "localhost:\u0664"  # not digits: a socket path


def test_deep_json_arguments_are_refused() -> None:
    with pytest.raises(OptionError, match="nested too deeply"):
        parse_arguments(["value=" + "[" * 100_000 + "]" * 100_000])
    with pytest.raises(OptionError, match="nested too deeply"):
        parse_arguments(['{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"])


def test_hosts_must_be_names() -> None:
    with pytest.raises(OptionError, match="is not a host name"):
        parse_qmp_option("tcp:\x80:4444,server=on,wait=off")
    with pytest.raises(OptionError, match="is not a host name"):
        parse_address("a..b:4444")
