"""The option table: one parser for CLI, magics and API, with one-line errors."""
import pickle

import pytest

from pynsbook.errors import OptionError, UnsupportedError, error_from_dict
from pynsbook.spec import NAMESPACES, format_size, make_spec, parse_size


@pytest.mark.parametrize("raw,expected", [("64M", 64 << 20), ("1.5G", 3 << 29), ("512k", 512 << 10),
                                          ("100", 100), ("64MiB", 64 << 20), ("64mb", 64 << 20),
                                          (1024, 1024)])
def test_sizes_parse_with_binary_units(raw, expected):
    assert parse_size(raw) == expected


@pytest.mark.parametrize("kwargs,needle", [
    ({"memory": "64X"}, "invalid value '64X' for --mem: expected a size like 64M"),
    ({"cpus": "-1"}, "invalid value '-1' for --cpus: expected a number of CPUs from 0.01"),
    ({"namespaces": "bogus"}, "invalid value 'bogus' for --ns: expected a comma-separated list"),
    ({"rootfs": "/no/such/dir"}, "for --rootfs: expected an existing directory"),
    ({"pids": "1"}, "from 2 (the container's init counts as one)"),
    ({"pids": "99999999999999999999"}, "to 4194304"),
    ({"memory": "99999T"}, "up to this host's"),
    ({"uptime": "1e300"}, "up to 3155760000 (100 years)"),
    ({"uptime": "nan"}, "for --uptime: expected a number of seconds"),
    ({"cap_add": "NET_ADMN"}, "invalid value 'NET_ADMN' for --cap-add: expected capability names"),
    ({"cap_drop": ""}, "for --cap-drop"),
    ({"seccomp": "apparmor=x"}, "for --security-opt: expected seccomp=unconfined"),
    ({"seccomp": "seccomp=/no/such.json"}, "cannot read /no/such.json"),
    ({"memory": "1M"}, "at least 8 MiB"),
    ({"hostname": "bad_host!"}, "for --hostname"),
    ({"env": ["NOEQUALS"]}, "expected KEY=VALUE"),
    ({"timeout": "0"}, "more than 0"),
    ({"workdir": "relative"}, "an absolute path"),
    ({"cpuset": "7-3"}, "for --cpuset"),
    ({"io_read_bps": "/dev/null:10M"}, "is not a block device"),
])
def test_bad_values_name_the_value_and_the_accepted_form(kwargs, needle):
    with pytest.raises(OptionError) as info:
        make_spec(kwargs, cli=True)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_api_errors_use_keyword_names():
    with pytest.raises(OptionError, match="for memory:"):
        make_spec(memory="lots")


def test_unknown_keyword_is_a_type_error_listing_the_known_ones():
    with pytest.raises(TypeError, match="known options: memory"):
        make_spec(memroy="64M")


def test_namespaces_default_to_all_and_no_ns_removes():
    assert make_spec().namespaces == frozenset(NAMESPACES)
    spec = make_spec({"no_namespaces": "net,user"}, cli=True)
    assert spec.namespaces == frozenset(NAMESPACES) - {"net", "user"}
    assert make_spec(namespaces="pid,mount").namespaces == {"pid", "mnt"}


def test_net_host_means_no_network_namespace():
    assert "net" not in make_spec(net="host").namespaces


def test_hostname_needs_the_uts_namespace():
    with pytest.raises(OptionError, match="uts"):
        make_spec({"hostname": "box", "no_namespaces": "uts"}, cli=True)


def test_limits_report_what_was_asked():
    spec = make_spec(memory="64M", cpus="0.5", pids=32)
    assert spec.limits() == {"memory": 64 << 20, "cpus": 0.5, "pids": 32}


def test_format_size_is_readable():
    assert format_size(64 << 20) == "64 MiB"
    assert format_size(1536 << 20) == "1.5 GiB"
    assert format_size(None) == "unlimited"


def test_errors_pickle_and_travel_as_json():
    err = UnsupportedError("--cpus 0.5", "no cpu controller", "echo +cpu > x")
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and isinstance(again, UnsupportedError)
    assert str(error_from_dict(err.to_dict())) == str(err)
    opt = OptionError("--mem", "64X", "a size")
    assert str(pickle.loads(pickle.dumps(opt))) == str(opt)


def test_explicit_namespace_choices_are_remembered_as_required():
    assert make_spec(namespaces="pid,net").explicit_namespaces == {"pid", "net"}
    assert make_spec(net="none").explicit_namespaces == {"net"}
    assert make_spec().explicit_namespaces == frozenset()
    with pytest.raises(OptionError, match="--net none needs a network namespace"):
        make_spec({"net": "none", "no_namespaces": "net"}, cli=True)
