"""The confinement options: what each one gives back or takes away, in a real container.
(tests/security/ holds the attacks that must fail with the defaults.)"""
import errno
import json
import os

import pytest

import pynsbook
from pynsbook import Container
from pynsbook.engine import confine
from pynsbook.errors import OptionError
from pynsbook.linux import caps
from pynsbook.spec import make_spec

pytestmark = [pytest.mark.usefixtures("no_leaks")]
CONTAINER = pytest.mark.needs("userns") if os.geteuid() else pytest.mark.needs("root")

STATUS = "print({k: v.strip() for k, v in (l.split(':', 1) for l in open('/proc/self/status')) " \
         "if k in ('CapEff', 'CapBnd', 'CapPrm', 'CapInh', 'CapAmb', 'NoNewPrivs', 'Seccomp')})"


def _status(**options):
    r = pynsbook.run(STATUS, **options)
    assert r.exit_code == 0, r.stderr
    return eval(r.stdout)


def test_cap_add_and_drop_follow_dockers_rules():
    assert confine.from_spec(make_spec()).caps == caps.DEFAULT
    spec = make_spec(cap_add=["NET_ADMIN", "cap_sys_ptrace"], cap_drop="NET_RAW")
    assert confine.from_spec(spec).caps == caps.DEFAULT - {"NET_RAW"} | {"NET_ADMIN", "SYS_PTRACE"}
    only = make_spec(cap_drop="ALL", cap_add="NET_BIND_SERVICE")
    assert confine.from_spec(only).caps == {"NET_BIND_SERVICE"}
    assert confine.from_spec(make_spec(cap_add="ALL")).caps == caps.ALL
    assert confine.from_spec(make_spec(privileged=True)).privileged


def test_docker_default_capability_mask_is_a80425fb():
    assert caps.mask(caps.DEFAULT) == 0xA80425FB


@CONTAINER
def test_default_process_has_dockers_capabilities_no_new_privs_and_a_filter():
    st = _status()
    assert st["CapEff"] == st["CapPrm"] == st["CapBnd"] == "00000000a80425fb"
    assert st["CapInh"] == st["CapAmb"] == "0000000000000000"
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"


@CONTAINER
def test_privileged_keeps_every_capability_and_no_filter():
    st = _status(privileged=True)
    assert int(st["CapEff"], 16) == (1 << (caps.LAST_CAP + 1)) - 1
    assert st["NoNewPrivs"] == "0" and st["Seccomp"] == "0"


@CONTAINER
def test_seccomp_unconfined_drops_the_filter_but_not_the_capability_limits():
    st = _status(security_opt="seccomp=unconfined")
    assert st["Seccomp"] == "0"
    assert st["CapEff"] == "00000000a80425fb"


@CONTAINER
def test_cap_drop_all_makes_root_obey_file_modes_and_cap_add_net_admin_can_take_lo_down():
    unreadable = ["sh", "-c", "echo x > /tmp/f && chmod 000 /tmp/f && cat /tmp/f"]
    assert pynsbook.run(unreadable).stdout == "x\n"  # root passes by DAC_OVERRIDE
    r = pynsbook.run(unreadable, cap_drop="ALL")
    assert r.exit_code != 0 and "Permission denied" in r.stderr
    down = ["sh", "-c", "ip link set lo down && ip -o link show lo"]
    r = pynsbook.run(down, cap_add="NET_ADMIN")
    assert r.exit_code == 0, r.stderr
    assert "state DOWN" in r.stdout or "<LOOPBACK>" in r.stdout
    r = pynsbook.run(down)
    assert r.exit_code != 0  # without it: the default set has no NET_ADMIN


@CONTAINER
def test_cap_add_sys_admin_brings_mount_back_as_docker_does():
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "os.makedirs('/tmp/m', exist_ok=True)\n"
            "print(libc.mount(b'none', b'/tmp/m', b'tmpfs', 0, None), ctypes.get_errno())")
    assert pynsbook.run(code).stdout.split() == ["-1", str(errno.EPERM)]
    assert pynsbook.run(code, cap_add="SYS_ADMIN").stdout.split() == ["0", "0"]


@CONTAINER
def test_a_docker_format_profile_is_loaded_instead_of_the_default(tmp_path):
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["getcwd"], "action": "SCMP_ACT_ERRNO", "errnoRet": 42}]}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    code = "import os\ntry:\n    os.getcwd()\nexcept OSError as e:\n    print(e.errno)"
    r = pynsbook.run(code, security_opt=f"seccomp={path}")
    assert r.stdout.strip() == "42", r.stderr
    # the profile replaces the default filter: keyctl is allowed by this one
    r = pynsbook.run("import ctypes\nl = ctypes.CDLL(None, use_errno=True)\n"
                     "print(l.syscall(250, 0, -1, 0) == -1 and ctypes.get_errno())",
                     security_opt=f"seccomp={path}")
    assert r.stdout.strip() != str(errno.EPERM)


def test_a_profile_that_is_not_dockers_format_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"syscalls": []}')
    with pytest.raises(OptionError) as info:
        make_spec(security_opt=f"seccomp={bad}", cli=True)
    assert "defaultAction" in str(info.value) and "\n" not in str(info.value)


@CONTAINER
def test_read_only_root_refuses_writes_but_tmp_and_run_stay_writable():
    r = pynsbook.run(["sh", "-c", "touch /x; echo $?; touch /tmp/x /run/x /dev/shm/x && echo ok"],
                     read_only=True)
    lines = r.stdout.split()
    assert lines == ["1", "ok"], (r.stdout, r.stderr)
    assert "Read-only file system" in r.stderr


@CONTAINER
def test_a_spare_worker_is_confined_before_it_runs_a_named_containers_code():
    # a named container adopting a spare gets its hostname set by a fresh entrant;
    # the spare's waiting worker, confined already, is not used for it
    for _ in range(3):
        pynsbook.run("pass")
    with Container("conf-named") as c:
        r = c.run("import socket\n" + STATUS.replace("print(", "print(socket.gethostname(), "))
    name, st = r.stdout.split(" ", 1)
    assert name == "conf-named"
    assert eval(st)["Seccomp"] == "2"


@CONTAINER
def test_ptrace_works_on_the_containers_own_processes_and_not_on_its_init():
    # as Docker's default profile on kernels >= 4.8: strace and gdb work inside
    code = """import ctypes, os, signal, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
child = os.fork()
if child == 0:
    time.sleep(5)
    os._exit(0)
ok = libc.ptrace(16, child, None, None)  # PTRACE_ATTACH
os.waitpid(child, 0)
libc.ptrace(17, child, None, None)  # PTRACE_DETACH
os.kill(child, signal.SIGKILL)
init = libc.ptrace(16, 1, None, None)
print(ok, init, ctypes.get_errno())"""
    r = pynsbook.run(code)
    assert r.stdout.split() == ["0", "-1", str(errno.EPERM)], (r.stdout, r.stderr)


@CONTAINER
@pytest.mark.parametrize("options", [
    pytest.param({}, id="default"),
    pytest.param({"cap_add": "SYS_PTRACE"}, id="cap-add-SYS_PTRACE"),
    # without a user namespace only root has a container (and its init) at all
    pytest.param({"namespaces": "cgroup,ipc,net,mnt,pid,time,uts"}, id="no-userns",
                 marks=pytest.mark.needs("root"))])
def test_the_init_keeps_only_kill_under_the_filter_and_cannot_be_traced(options):
    """A process given SYS_PTRACE could once drive the init, which held every capability,
    into undoing a read-only mount (host root: core_pattern). Now the init holds KILL only,
    under no_new_privs and the filter, and is not dumpable: without SYS_PTRACE no process
    of the container may attach to it."""
    code = ("import ctypes\nst = dict(l.split(':', 1) for l in open('/proc/1/status'))\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]\n"
            "seize = libc.ptrace(0x4206, 1, None, None)\n"  # PTRACE_SEIZE: stops nothing
            "print(st['CapEff'].strip(), st['NoNewPrivs'].strip(), st['Seccomp'].strip(),"
            " seize, ctypes.get_errno() if seize else 0)")
    r = pynsbook.run(code, **options)
    cap_eff, nnp, filt, seize, err = r.stdout.split()
    assert (int(cap_eff, 16), nnp, filt) == (1 << caps.NUMBER["KILL"], "1", "2"), r.stdout
    if "cap_add" in options:
        assert seize == "0"  # it may trace the init: which holds less than it does
    else:
        assert (seize, err) == ("-1", str(errno.EPERM))


@pytest.mark.parametrize("rule,why", [
    ({"names": ["mkdir"], "action": "SCMP_ACT_ERRNO",
      "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}, "argument index 6"),
    ({"names": ["rmdir"], "action": "SCMP_ACT_ERRNO",
      "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_NE"},
               {"index": 0, "value": 2, "op": "SCMP_CMP_NE"}]}, "once per rule"),
    ({"names": ["unlink"], "action": "SCMP_ACT_ERRNO", "errnoRet": 99999}, "errnoRet 99999"),
    ({"names": "chdir", "action": "SCMP_ACT_ERRNO"}, "not a list of system call names"),
    ({"names": ["chdir"], "action": "SCMP_ACT_KILL_ALL"}, "unknown action"),
])
def test_a_profile_rule_that_cannot_apply_as_written_is_refused_not_dropped(tmp_path, rule, why):
    """A filter silently weaker than its profile fails open: each of these rules used to
    vanish without a word."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule]}))
    with pytest.raises(OptionError) as info:
        make_spec(security_opt=f"seccomp={path}", cli=True)
    assert why in str(info.value) and "\n" not in str(info.value)
