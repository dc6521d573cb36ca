"""No input ends in a traceback: the option grammar and every verb, property-based (issue 9.6).

Every parser of user text either returns a value or raises a :class:`MemslotsError`; every verb,
driven through click's CliRunner with options drawn from QEMU's grammar (and from outside it),
ends with an exit status of the table (``errors.EXIT_CODES``) and, when it fails, a one-line
``memslots: ...`` message, never an uncaught exception. Inputs include what broke before: sizes
of thousands of digits, non-ASCII digits (``٤``), integers beyond 2^64, files that are not
UTF-8, paths in missing directories and sockets nobody listens on.

Values that name files are confined to a temporary directory, and sizes given to the verbs that
map memory are small, so that no example touches the host or allocates much.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memslots import options
from memslots.cli import main as cli
from memslots.errors import EXIT_CODES, EXIT_OK, MemslotsError
from memslots.kvm.host import host_info
from memslots.monitor import runtime

#: Quick in the default run; each example of the verbs builds (and closes) a machine.
FAST = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
SLOW = settings(FAST, max_examples=30)

# -- values ---------------------------------------------------------------------------------------

#: Characters that Python's int(), float(), str.isdigit and regex \d take for digits.
LOOKALIKES = ("\u0664", "\uff14", "\u00b2", "\u07c4", "\u0ed1", "\U0001d7d9", "\u0661\u0660")
SUFFIXES = ("", "B", "K", "M", "G", "T", "P", "E", "k", "g", "X")


def _huge_digits() -> st.SearchStrategy[str]:
    return st.builds(lambda d, n: d * n, st.sampled_from("0192"), st.integers(19, 6000))


def numbers() -> st.SearchStrategy[str]:
    """Integer texts, inside and far outside every range, in QEMU's bases and beyond."""
    return st.one_of(
        st.integers(-(2**70), 2**70).map(str),
        st.integers(0, 2**70).map(hex),
        st.integers(0, 2**70).map(lambda n: "0" + oct(n)[2:]),
        _huge_digits(),
        st.sampled_from(["", "-", "0x", "0b1", "1_0", " 1", "1 ", "+1", "-0", "0xG", "08", "1e3"]),
        st.sampled_from(LOOKALIKES),
        st.text(max_size=6),
    )


def sizes() -> st.SearchStrategy[str]:
    """QEMU size texts, well-formed or not."""
    return st.one_of(
        st.builds(
            lambda n, frac, unit: f"{n}{frac}{unit}",
            st.integers(0, 2**66),
            st.sampled_from(["", ".5", ".", ".0000001", ".99999999999999999999"]),
            st.sampled_from(SUFFIXES),
        ),
        st.builds(lambda d, u: d + u, st.sampled_from(LOOKALIKES), st.sampled_from(SUFFIXES)),
        st.builds(lambda d, u: d + u, _huge_digits(), st.sampled_from(SUFFIXES)),
        st.builds(lambda d: "1." + d + "G", _huge_digits()),
        numbers(),
        st.sampled_from(
            ["nan", "inf", "-1G", "0x1M", "1e3G", "G", "1.5", "1,5G", "\u0661\u0662\u0668M"]
        ),
    )


def small_sizes() -> st.SearchStrategy[str]:
    """Sizes for verbs that map memory: small when well-formed, anything when not."""
    return st.one_of(
        st.sampled_from(["0", "2M", "4M", "64M", "128M", "256M", "1G", "1.5G", "0x400000"]),
        st.builds(lambda d, u: d + u, st.sampled_from(LOOKALIKES), st.sampled_from("MG")),
        st.builds(lambda d: d + "G", _huge_digits()),
        st.sampled_from(["", "nan", "-1", "1T0", "0x1M", "abc"]),
    )


def booleans() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["on", "off", "yes", "no", "true", "false", "ON", "", "auto", "1"]),
        st.text(max_size=4),
    )


def ids() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["mem0", "mem1", "vmem0", "d0", "c0", "a.b-c_d", "0a", ""]),
        st.text(max_size=8),
    )


def free_text() -> st.SearchStrategy[str]:
    # Lone surrogates are what a non-UTF-8 argv decodes to (surrogateescape).
    return st.text(st.characters(codec=None), max_size=24)


Pairs = dict[str, st.SearchStrategy[str]]


@st.composite
def option(draw: st.DrawFn, heads: Sequence[str], keys: Pairs, implied: bool = True) -> str:
    """One option string: a head (driver, type...) and key=value pairs, QEMU's grammar, with
    unknown keys, duplicates, empty elements and unescaped commas now and then."""
    if draw(st.integers(0, 19)) == 0:
        return draw(free_text())
    chosen = draw(st.lists(st.sampled_from(sorted(keys)), max_size=len(keys) + 1))
    words = []
    head = draw(st.one_of(st.sampled_from(heads), st.text(max_size=6)))
    if implied:
        words.append(head)
    for key in chosen:
        value = draw(keys[key])
        words.append(f"{key}={value.replace(',', ',,') if draw(st.booleans()) else value}")
    if draw(st.integers(0, 9)) == 0:
        words.insert(draw(st.integers(0, len(words))), draw(st.sampled_from(["", "=", "x", "=1"])))
    return ",".join(words)


def memory_options(size: Callable[[], st.SearchStrategy[str]]) -> st.SearchStrategy[str]:
    return option(
        ["128M", "4G", "1G", "0", "2G", "4096"],
        {"maxmem": size(), "slots": numbers(), "size": size()},
    )


def object_options(
    paths: st.SearchStrategy[str], size: Callable[[], st.SearchStrategy[str]]
) -> st.SearchStrategy[str]:
    return option(
        ["memory-backend-ram", "memory-backend-memfd", "memory-backend-file", "iothread"],
        {
            "id": ids(),
            "size": size(),
            "share": booleans(),
            "reserve": booleans(),
            "mem-path": paths,
            "hugetlb": booleans(),
            "hugetlbsize": sizes(),
            "seal": booleans(),
            "qom-type": st.sampled_from(["memory-backend-ram", "x"]),
        },
    )


def device_options(size: Callable[[], st.SearchStrategy[str]]) -> st.SearchStrategy[str]:
    return option(
        [
            "virtio-mem",
            "virtio-mem-pci",
            "pc-dimm",
            "vhost-user-blk",
            "vhost-user-blk-pci",
            "vhost-user-fs",
            "vhost-user-fs-pci",
            "virtio-net",
        ],
        {
            "id": ids(),
            "memdev": ids(),
            "requested-size": size(),
            "block-size": sizes(),
            "dynamic-memslots": booleans(),
            "unplugged-inaccessible": st.one_of(st.sampled_from(["on", "off", "auto"]), ids()),
            "memaddr": numbers(),
            "addr": numbers(),
            "node": numbers(),
            "slot": numbers(),
            "memslot-size": sizes(),
            "chardev": ids(),
            "tag": free_text(),
            "memslot-accounting": st.sampled_from(["qemu", "precise", "x"]),
        },
    )


def chardev_options(paths: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return option(
        ["socket", "pipe"],
        {"id": ids(), "path": paths, "server": booleans(), "host": ids(), "port": numbers()},
    )


def accel_options() -> st.SearchStrategy[str]:
    return option(["auto", "kvm", "sim", "tcg"], {"slot-zap-all": booleans(), "accel": ids()})


def hosts() -> st.SearchStrategy[str]:
    """Loopback names, and names the resolver refuses before asking anyone (no DNS lookup,
    never a listener on all interfaces)."""
    return st.sampled_from(["127.0.0.1", "localhost", "[::1]", "::1", "\x80", "a..b", "", "[x"])


def qmp_options(paths: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.builds("unix:{},server=on,wait=off".format, paths),
        option(
            ["unix:", "tcp:", "tcp:localhost:", "stdio"],
            {"server": booleans(), "wait": booleans()},
        ).map(lambda t: t.replace("tcp:localhost:", "tcp:localhost:" + "٤")),
        st.builds("tcp:{}:{}".format, hosts(), numbers()),
    )


def machine_args(
    paths: st.SearchStrategy[str], size: Callable[[], st.SearchStrategy[str]]
) -> st.SearchStrategy[list[str]]:
    """-m, -object, -device, -chardev and -accel words, as a command line has them."""
    flag = st.one_of(
        st.tuples(st.just("-m"), memory_options(size)),
        st.tuples(st.just("-object"), object_options(paths, size)),
        st.tuples(st.just("-device"), device_options(size)),
        st.tuples(st.just("-chardev"), chardev_options(paths)),
        st.tuples(st.just("-accel"), accel_options()),
    )
    return st.lists(flag, max_size=6).map(lambda fs: [w for f in fs for w in f])


# -- files and sockets ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory with a regular file, a non-UTF-8 file, a directory and a dead socket."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "file").write_text("0,1G\n")
    (root / "latin1.csv").write_bytes(b"time,size\n0,1G\n60,2G \xe9\xff\n")
    (root / "dir").mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(root / "dead.sock"))  # bound, never listening: connect() is refused
    yield root
    dead.close()


def paths_in(root: Path) -> st.SearchStrategy[str]:
    names = ["file", "latin1.csv", "dir", "dead.sock", "missing", "missing/x", "dir/new", ""]
    return st.one_of(
        st.sampled_from([str(root / n) for n in names]),
        st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8).map(
            lambda n: str(root / "dir" / n)
        ),
    )


# -- the checks -----------------------------------------------------------------------------------


def assert_clean(result: Result) -> None:
    """An exit status of the table, and a failure says why in one ``memslots:`` line."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}") from result.exception
    assert result.exit_code in EXIT_CODES, result.exit_code
    assert "Traceback" not in result.output
    if result.exit_code != EXIT_OK:
        assert result.stderr.startswith("memslots: "), result.stderr


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(cli.main, args, catch_exceptions=True)


def expect_option_error(parse: Callable[[str], object], text: str) -> None:
    with contextlib.suppress(MemslotsError):
        parse(text)


# -- the parsers ----------------------------------------------------------------------------------


@FAST
@given(data=st.data())
def test_every_parser_returns_or_raises_memslots_error(data: st.DataObject) -> None:
    paths = st.sampled_from(["/nonexistent/fuzz", "x"])
    parsers: list[tuple[Callable[[str], object], st.SearchStrategy[str]]] = [
        (options.parse_size, sizes()),
        (options.parse_machine_memory, memory_options(sizes)),
        (options.parse_backend, object_options(paths, sizes)),
        (options.parse_any_device, device_options(sizes)),
        (options.parse_chardev, chardev_options(paths)),
        (options.parse_accel, accel_options()),
        (options.parse_qmp_option, qmp_options(paths)),
        (
            options.parse_address,
            st.one_of(free_text(), st.builds("{}:{}".format, hosts(), numbers())),
        ),
        (options.parse_offsets, st.lists(sizes(), max_size=4).map(",".join)),
        (
            functools.partial(options.parse_strategies, strategy="dynamic"),
            st.lists(
                st.one_of(st.sampled_from(["single", "dynamic"]), sizes().map("fixed:{}".format)),
                min_size=1,
                max_size=3,
            ).map(",".join),
        ),
        (
            options.parse_trace,
            st.lists(
                st.tuples(
                    st.one_of(numbers(), st.sampled_from(["0.5", "nan", "inf", "1e400"])), sizes()
                ).map(",".join),
                max_size=4,
            ).map("\n".join),
        ),
    ]
    for parse, texts in parsers:
        expect_option_error(parse, data.draw(texts))
    words = data.draw(st.lists(free_text(), max_size=3))
    expect_option_error(lambda _: options.parse_arguments(words), "")


def test_deeply_nested_json_argument_is_refused() -> None:
    with pytest.raises(MemslotsError):
        options.parse_arguments(["value=" + "[" * 100_000])
    with pytest.raises(MemslotsError):
        options.parse_arguments(['{"a": ' + "[" * 100_000])


# -- the verbs ------------------------------------------------------------------------------------


def flags(choices: dict[str, st.SearchStrategy[str] | None]) -> st.SearchStrategy[list[str]]:
    """Some of a verb's flags, each with a value (None: a switch)."""

    def words(name: str) -> st.SearchStrategy[list[str]]:
        value = choices[name]
        return st.just([name]) if value is None else value.map(lambda v: [name, v])

    return st.lists(st.sampled_from(sorted(choices)).flatmap(words), max_size=4).map(
        lambda fs: [w for f in fs for w in f]
    )


@FAST
@given(data=st.data())
def test_plan_never_ends_in_a_traceback(data: st.DataObject, sandbox: Path) -> None:
    args = data.draw(machine_args(paths_in(sandbox), sizes))
    args += data.draw(
        flags(
            {
                "--kvm-max-memslots": numbers(),
                "--kvm-free-memslots": numbers(),
                "--vhost-max-memslots": numbers(),
                "--vhost-free-memslots": numbers(),
                "--vhost-kind": st.sampled_from(["kernel", "user", "x"]),
                "--cpu-vendor": st.sampled_from(["amd", "intel", "arm"]),
                "--phys-bits": numbers(),
                "--working-set": numbers(),
                "--json": None,
                "--wide": None,
            }
        )
    )
    assert_clean(invoke(["plan", *args]))


@pytest.mark.parametrize(
    "value", ["32768", str(2**64), "1" * 5000, "٤", "-1", "0"], ids=lambda v: v[:8]
)
def test_kvm_max_memslots_out_of_range_is_a_usage_error(value: str) -> None:
    result = invoke(["plan", "-m", "4G,maxmem=8G", "--kvm-max-memslots", value])
    assert_clean(result)
    assert result.exit_code == 1 and "--kvm-max-memslots" in result.stderr


@SLOW
@given(data=st.data())
def test_simulate_never_ends_in_a_traceback(data: st.DataObject, sandbox: Path) -> None:
    paths = paths_in(sandbox)
    args = ["-accel", "sim", *data.draw(machine_args(paths, small_sizes))]
    args += data.draw(
        flags(
            {
                "--trace": paths,
                "--scenario": st.sampled_from(["ramp-up", "sawtooth", "burst", "x"]),
                "--max-size": small_sizes(),
                "--steps": st.sampled_from(["1", "2", "0", "-1", "1" * 30, "٢"]),
                "--period": st.sampled_from(["0", "60", "nan", "inf", "-1", "1e308", "x"]),
                "--strategy": st.sampled_from(["single", "dynamic", "fixed:1G", "fixed:0", "x"]),
                "--compare": st.sampled_from(["single,dynamic", "fixed:٤G", ",", "fixed:"]),
                "--guest-pinned": st.lists(small_sizes(), max_size=2).map(",".join),
                "--working-set": numbers(),
                "--csv": paths,
                "--json": None,
                "--request-log": None,
            }
        )
    )
    assert_clean(invoke(["simulate", *args]))


@SLOW
@given(data=st.data())
def test_run_never_ends_in_a_traceback(
    data: st.DataObject, sandbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real runtime, told to quit as soon as it serves: what it refuses, it refuses before.
    serve = functools.partial(runtime.serve, ready=lambda rt: rt.quit(), install_signals=False)
    monkeypatch.setattr(runtime, "serve", serve)
    paths = paths_in(sandbox)
    args = ["-accel", "sim", *data.draw(machine_args(paths, small_sizes))]
    args += ["-qmp", data.draw(qmp_options(paths))]
    args += data.draw(
        flags({"--metrics-port": numbers(), "-guest": st.sampled_from(["linux", "none", "x"])})
    )
    assert_clean(invoke(["run", *args]))


@FAST
@given(data=st.data())
def test_client_verbs_never_end_in_a_traceback(data: st.DataObject, sandbox: Path) -> None:
    where = data.draw(
        st.one_of(
            paths_in(sandbox),
            free_text().filter(lambda t: ":" not in t),  # HOST:PORT would ask the resolver
            st.builds("{}:{}".format, hosts(), numbers()),
        )
    )
    verb = data.draw(st.sampled_from(["qmp", "resize", "info"]))
    timeout = ["--timeout", data.draw(st.sampled_from(["0.5", "0", "nan", "inf", "-1", "x"]))]
    if verb == "qmp":
        args = [where, data.draw(ids()), *data.draw(st.lists(free_text(), max_size=2))]
    elif verb == "resize":
        args = [where, data.draw(ids()), data.draw(sizes())]
        args += data.draw(flags({"--wait": None, "--json": None}))
    else:
        args = [where, data.draw(st.sampled_from(["memslots", "memory-devices", "budget", "x"]))]
        args += data.draw(flags({"--json": None, "--all": None, "--wide": None}))
    assert_clean(invoke([verb, *args, *timeout]))


@SLOW
@given(data=st.data())
def test_measure_and_demo_never_end_in_a_traceback(
    data: st.DataObject, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arguments only: without /dev/kvm measure stops (status 2) once they are checked.
    without_kvm = dataclasses.replace(host_info(), kvm=False)
    monkeypatch.setattr("memslots.cli.plan.host_info", lambda: without_kvm)
    args = data.draw(
        flags(
            {"--device-size": sizes(), "--plugged": sizes(), "--repeats": numbers(), "--json": None}
        )
    )
    assert_clean(invoke(["measure", *args]))
    accel = data.draw(st.one_of(accel_options(), st.just("sim")))
    if options_accepted(accel):
        return  # a real demo takes seconds; test_cli runs it
    assert_clean(invoke(["demo", "-accel", accel]))


def options_accepted(accel: str) -> bool:
    try:
        options.parse_accel(accel)
    except MemslotsError:
        return False
    return True


def test_unknown_verbs_and_options_say_memslots() -> None:
    for args in (["nonsense"], ["plan", "--nonsense"], ["plan", "-m"], ["info"]):
        result = invoke(args)
        assert_clean(result)
        assert result.exit_code == 1


def test_help_of_every_verb(capsys: Any) -> None:
    for name in cli.main.commands:
        assert_clean(invoke([name, "--help"]))


# -- the cases issues 8 and 9 named ---------------------------------------------------------------


def test_trace_that_is_not_utf8(sandbox: Path) -> None:
    result = invoke(["simulate", "-accel", "sim", "--trace", str(sandbox / "latin1.csv")])
    assert_clean(result)
    assert result.exit_code == 1 and "latin1.csv:3: not UTF-8 text" in result.stderr


def test_csv_in_a_missing_directory_is_refused_before_simulating(sandbox: Path) -> None:
    result = invoke(
        ["simulate", "-accel", "sim", "--json", "--csv", str(sandbox / "missing" / "x.csv")]
    )
    assert_clean(result)
    assert result.exit_code == 1 and "--csv" in result.stderr and "missing" in result.stderr
    assert result.stdout == ""  # nothing was simulated (or lost)


def test_plots_into_a_file_are_refused_before_simulating(sandbox: Path) -> None:
    result = invoke(["simulate", "-accel", "sim", "--json", "--plots", str(sandbox / "file")])
    assert_clean(result)
    assert result.exit_code == 1 and "--plots" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("name", ["dead.sock", "file", "dir", "missing"])
@pytest.mark.parametrize("verb", [["qmp", "query-status"], ["info", "memslots"]])
def test_client_verbs_on_a_dead_socket(sandbox: Path, name: str, verb: list[str]) -> None:
    result = invoke([verb[0], str(sandbox / name), *verb[1:]])
    assert_clean(result)
    assert result.exit_code == 1 and f"cannot connect to {sandbox / name}" in result.stderr


def test_resize_on_a_dead_socket(sandbox: Path) -> None:
    result = invoke(["resize", str(sandbox / "dead.sock"), "vmem0", "1G", "--wait"])
    assert_clean(result)
    assert result.exit_code == 1 and "cannot connect" in result.stderr


def test_metrics_port_in_use(sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "serve", functools.partial(runtime.serve, install_signals=False))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke(
            [
                "run",
                "-accel",
                "sim",
                "-qmp",
                f"unix:{sandbox}/m.sock,server=on,wait=off",
                "--metrics-port",
                str(port),
            ]
        )
    assert_clean(result)
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert not (sandbox / "m.sock").exists()  # the monitor's socket went away with it


def test_qmp_socket_in_a_missing_directory(sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "serve", functools.partial(runtime.serve, install_signals=False))
    path = sandbox / "missing" / "q.sock"
    result = invoke(["run", "-accel", "sim", "-qmp", f"unix:{path},server=on,wait=off"])
    assert_clean(result)
    assert result.exit_code == 1 and f"cannot listen on {path}" in result.stderr


def test_plots_without_matplotlib_are_refused_before_simulating(
    sandbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a base install has
    result = invoke(["simulate", "-accel", "sim", "--json", "--plots", str(sandbox / "plots")])
    assert_clean(result)
    assert result.exit_code == 2 and result.stdout == ""  # refused before anything ran
    assert f"{sys.executable} -m pip install 'matplotlib>=3.8'" in result.stderr
    assert not (sandbox / "plots").exists()
