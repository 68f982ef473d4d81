"""How a request is carried out on a host that lacks something: refused with the reason,
or with best effort run without it and said so — never silently ignored.

The host's namespace support is replaced here by a table (this is the decision logic);
the no-privilege VM lane runs the same requests on a host that really lacks them."""
import pytest

from pynsbook import probe
from pynsbook.engine.plan import make_plan
from pynsbook.errors import UnsupportedError
from pynsbook.spec import NAMESPACES, make_spec

NO_NS = {n: (False, "user namespaces are disabled (user.max_user_namespaces = 0)",
             "sudo sysctl -w user.max_user_namespaces=15000") for n in NAMESPACES}


@pytest.fixture
def no_namespaces(monkeypatch):
    monkeypatch.setattr(probe, "namespaces", lambda: NO_NS)


@pytest.mark.parametrize("options,flag", [({"hostname": "box"}, "--hostname box"),
                                          ({"uptime": 5}, "--uptime 5"),
                                          ({"net": "none"}, "--ns net")])
def test_an_option_whose_namespace_is_missing_is_refused_with_the_reason(no_namespaces, options, flag):
    with pytest.raises(UnsupportedError) as info:
        make_plan(make_spec(**options))
    assert str(info.value).startswith(flag)
    assert "max_user_namespaces" in str(info.value)


def test_with_best_effort_it_runs_without_and_says_so(no_namespaces):
    plan = make_plan(make_spec(hostname="box", uptime=5, best_effort=True))
    assert set(plan.dropped) >= {"hostname", "uptime"}
    assert plan.namespaces == []


def test_a_root_filesystem_without_a_mount_namespace_is_refused_even_with_best_effort(
        no_namespaces, tmp_path):
    with pytest.raises(UnsupportedError, match="needs a mnt namespace"):
        make_plan(make_spec(rootfs=str(tmp_path), best_effort=True))


def test_defaults_run_with_what_the_host_has(no_namespaces):
    plan = make_plan(make_spec())
    assert plan.namespaces == [] and set(plan.dropped_namespaces) == set(NAMESPACES)
