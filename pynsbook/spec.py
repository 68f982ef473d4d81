"""The one option table: every limit and option, parsed the same way for the CLI,
the magics and the Python API, so ``--mem 64M`` and ``memory="64M"`` mean one thing.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from .errors import OptionError

#: Namespace kinds as the kernel names them in /proc/self/ns, in namespaces(7) order.
NAMESPACES: Tuple[str, ...] = ("cgroup", "ipc", "net", "mnt", "pid", "time", "user", "uts")
_NS_ALIASES = {"mount": "mnt", "network": "net"}

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HOST_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

SIZE_FORM = "a size like 64M, 1.5G or 512K (K, M, G are powers of 1024)"
MIN_MEMORY = 8 << 20


@dataclass(frozen=True)
class IoLimit:
    """A bandwidth cap on one block device, in bytes per second."""

    device: str  # "major:minor"
    rate: int
    label: str   # as the user wrote the device, for messages


@dataclass(frozen=True)
class Spec:
    """Everything that shapes one container: limits, namespaces, filesystem and process."""

    memory: Optional[int] = None
    swap: Optional[int] = None
    cpus: Optional[float] = None
    cpuset: Optional[str] = None
    pids: Optional[int] = None
    io_read_bps: Tuple[IoLimit, ...] = ()
    io_write_bps: Tuple[IoLimit, ...] = ()
    namespaces: FrozenSet[str] = frozenset(NAMESPACES)
    net: str = "none"
    hostname: Optional[str] = None
    rootfs: Optional[str] = None
    image: Optional[str] = None
    timeout: Optional[float] = None
    uptime: Optional[float] = None
    env: Tuple[Tuple[str, str], ...] = ()
    workdir: Optional[str] = None
    name: Optional[str] = None
    best_effort: bool = False
    #: confinement (see confinement.py): all of root's powers instead of Docker's defaults
    privileged: bool = False
    cap_add: Tuple[str, ...] = ()
    cap_drop: Tuple[str, ...] = ()
    #: "default", "unconfined", or the path of a Docker-format JSON profile
    seccomp: str = "default"
    read_only: bool = False
    #: the namespaces the user named explicitly (these must not be dropped silently)
    explicit_namespaces: FrozenSet[str] = frozenset()

    def limits(self) -> Dict[str, Any]:
        """The resource limits that were asked for, by API keyword (None = unlimited)."""
        out: Dict[str, Any] = {}
        for key in LIMIT_KEYS:
            value = getattr(self, key)
            if value not in (None, ()):
                out[key] = [f"{io.label}:{io.rate}" for io in value] if key.startswith("io_") else value
        return out

    def replace(self, **changes: Any) -> "Spec":
        return dataclasses.replace(self, **changes)


LIMIT_KEYS: Tuple[str, ...] = ("memory", "swap", "cpus", "cpuset", "pids", "io_read_bps", "io_write_bps")


# ---------------------------------------------------------------------------------------
# value parsers: each takes the raw value and the option's label, returns the clean value

def host_memory() -> int:
    """This machine's memory in bytes (MemTotal)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_memory(raw: Any, label: str = "memory") -> int:
    """A memory limit: at least MIN_MEMORY, at most what this host has (a larger limit
    would limit nothing, and is most likely a typo)."""
    value = parse_size(raw, label, MIN_MEMORY)
    total = host_memory()
    if value > total:
        raise OptionError(label, raw, f"{SIZE_FORM}, from {format_size(MIN_MEMORY)} up to "
                          f"this host's {format_size(total)} (leave it out for no limit)")
    return value


def parse_size(raw: Any, label: str = "size", minimum: int = 0) -> int:
    """``64M`` -> 67108864. Plain numbers are bytes; units are powers of 1024."""
    if isinstance(raw, bool):
        raise OptionError(label, raw, SIZE_FORM)
    if isinstance(raw, (int, float)):
        value = int(raw)
    else:
        match = _SIZE_RE.match(str(raw))
        if not match:
            raise OptionError(label, raw, SIZE_FORM)
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value < max(minimum, 0) or (minimum == 0 and value < 0):
        need = f"at least {format_size(minimum)}" if minimum else "a size of 0 or more"
        raise OptionError(label, raw, f"{SIZE_FORM}, {need}")
    return value


def format_size(n: Optional[float]) -> str:
    """67108864 -> '64 MiB' (for messages and tables)."""
    if n is None:
        return "unlimited"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= div:
            value = n / div
            return f"{value:.0f} {unit}" if value == int(value) or value >= 100 else f"{value:.1f} {unit}"
    return f"{int(n)} B"


def host_cpus() -> List[int]:
    """The CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0))


def parse_cpus(raw: Any, label: str = "cpus") -> float:
    ncpu = len(host_cpus())
    form = f"a number of CPUs from 0.01 to {ncpu}, like 0.5"
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise OptionError(label, raw, form) from None
    if not (0.01 <= value <= ncpu):
        raise OptionError(label, raw, form)
    return value


def parse_cpuset(raw: Any, label: str = "cpuset") -> str:
    allowed = host_cpus()
    form = f"a list of CPU numbers like 0 or 0-1 or 0,{allowed[-1]} (this host has {_ranges(allowed)})"
    cpus: set = set()
    for part in str(raw).replace(" ", "").split(","):
        match = re.match(r"^(\d+)(?:-(\d+))?$", part)
        if not match:
            raise OptionError(label, raw, form)
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if hi < lo:
            raise OptionError(label, raw, form)
        cpus.update(range(lo, hi + 1))
    if not cpus or not cpus.issubset(allowed):
        raise OptionError(label, raw, form)
    return _ranges(sorted(cpus))


def _ranges(cpus: List[int]) -> str:
    out, start = [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            out.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(out)


#: the most processes Linux allows at all (PID_MAX_LIMIT on 64-bit machines)
MAX_PIDS = 4194304


def parse_pids(raw: Any, label: str = "pids") -> int:
    form = (f"a whole number of processes from 2 (the container's init counts as one) "
            f"to {MAX_PIDS}")
    try:
        value = int(str(raw), 10)
    except ValueError:
        raise OptionError(label, raw, form) from None
    if not 2 <= value <= MAX_PIDS:
        raise OptionError(label, raw, form)
    return value


def parse_io(raw: Any, label: str) -> Tuple[IoLimit, ...]:
    """``/dev/vda:10M`` or ``254:0:10M`` (several separated by commas or given as a list)."""
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    form = "DEVICE:RATE like /dev/vda:10M or 254:0:10M (a block device and bytes per second)"
    out = []
    for item in items:
        if isinstance(item, IoLimit):
            out.append(item)
            continue
        for one in str(item).split(","):
            dev, _, rate = one.rpartition(":")
            if not dev or not rate:
                raise OptionError(label, one, form)
            if re.match(r"^\d+:\d+$", dev):
                device = dev
            else:
                try:
                    st = os.stat(dev)
                except OSError:
                    raise OptionError(label, one, form + f"; {dev} does not exist") from None
                if not stat.S_ISBLK(st.st_mode):
                    raise OptionError(label, one, form + f"; {dev} is not a block device")
                device = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            out.append(IoLimit(device, parse_size(rate, label, minimum=1), dev))
    return tuple(out)


def parse_namespaces(raw: Any, label: str = "namespaces") -> FrozenSet[str]:
    form = "a comma-separated list of " + ", ".join(NAMESPACES) + " (or all, or none)"
    items = raw if isinstance(raw, (list, tuple, set, frozenset)) else str(raw).split(",")
    out = set()
    for item in items:
        name = str(item).strip().lower()
        name = _NS_ALIASES.get(name, name)
        if name == "all":
            out.update(NAMESPACES)
        elif name in ("none", ""):
            continue
        elif name in NAMESPACES:
            out.add(name)
        else:
            raise OptionError(label, item, form)
    return frozenset(out)


def parse_choice(choices: Tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(raw: Any, label: str) -> str:
        value = str(raw).strip().lower()
        if value not in choices:
            raise OptionError(label, raw, " or ".join(choices))
        return value
    return parse


#: 100 years: the time namespace refuses clock offsets near the kernel's 292-year limit
MAX_SECONDS = 100 * 365.25 * 86400


def parse_seconds(raw: Any, label: str, allow_zero: bool = False) -> float:
    form = ("a number of seconds like 10 or 0.5, " + ("0" if allow_zero else "more than 0")
            + f" up to {MAX_SECONDS:.0f} (100 years)")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise OptionError(label, raw, form) from None
    if not (0 <= value <= MAX_SECONDS) or (value == 0 and not allow_zero):
        raise OptionError(label, raw, form)  # NaN fails the comparison too
    return value


def parse_env(raw: Any, label: str = "env") -> Tuple[Tuple[str, str], ...]:
    form = "KEY=VALUE (KEY made of letters, digits and _)"
    if isinstance(raw, Mapping):
        items = [f"{k}={v}" for k, v in raw.items()]
    elif isinstance(raw, (list, tuple)):
        items = list(raw)
    else:
        items = [raw]
    out = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2:
            key, value = item
        else:
            key, sep, value = str(item).partition("=")
            if not sep:
                raise OptionError(label, item, form)
        if not _ENV_RE.match(key):
            raise OptionError(label, item, form)
        out.append((key, str(value)))
    return tuple(out)


def parse_abs_path(raw: Any, label: str) -> str:
    value = str(raw)
    if not value.startswith("/"):
        raise OptionError(label, raw, "an absolute path like /tmp")
    return os.path.normpath(value)


def parse_rootfs(raw: Any, label: str = "rootfs") -> str:
    path = os.path.abspath(os.path.expanduser(str(raw)))
    if not os.path.isdir(path):
        raise OptionError(label, raw, "an existing directory holding a root filesystem "
                          f"(no directory at {path})")
    return path


def parse_name(raw: Any, label: str = "name") -> str:
    value = str(raw)
    if not _NAME_RE.match(value):
        raise OptionError(label, raw, "a name of letters, digits, '_', '.' and '-', "
                          "starting with a letter or digit, at most 63 characters")
    return value


def parse_hostname(raw: Any, label: str = "hostname") -> str:
    value = str(raw)
    if len(value) > 64 or not _HOST_RE.match(value):
        raise OptionError(label, raw, "a hostname of letters, digits and '-', at most 64 characters")
    return value


def parse_bool(raw: Any, label: str) -> bool:
    if isinstance(raw, bool):
        return raw
    value = str(raw).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise OptionError(label, raw, "true or false")


def parse_caps(raw: Any, label: str) -> Tuple[str, ...]:
    """``NET_ADMIN,cap_sys_ptrace`` -> ("NET_ADMIN", "SYS_PTRACE"); ``ALL`` stays ALL."""
    from .linux import caps
    out = []
    for item in str(raw).replace(" ", ",").split(","):
        if not item:
            continue
        try:
            out.append(caps.normalize(item))
        except KeyError:
            raise OptionError(label, item, caps.FORM) from None
    if not out:
        raise OptionError(label, raw, caps.FORM)
    return tuple(out)


SECURITY_OPT_FORM = "seccomp=unconfined or seccomp=PROFILE.json (a Docker-format seccomp profile)"


def parse_security_opt(raw: Any, label: str) -> str:
    """``seccomp=unconfined`` or ``seccomp=/path/profile.json`` -> what the seccomp field holds."""
    if isinstance(raw, (list, tuple)) and len(raw) == 1:  # security_opt=["seccomp=..."]
        raw = raw[0]
    key, sep, value = str(raw).partition("=")
    if not sep:
        key, sep, value = str(raw).partition(":")  # Docker once spelled it seccomp:unconfined
    if key.strip() != "seccomp" or not value.strip():
        raise OptionError(label, raw, SECURITY_OPT_FORM)
    value = value.strip()
    if value in ("unconfined", "default"):
        return value
    from .linux import seccomp
    path = os.path.abspath(os.path.expanduser(value))
    try:
        seccomp.load_profile(path)
    except seccomp.ProfileError as err:
        raise OptionError(label, raw, f"{SECURITY_OPT_FORM}; {err}") from None
    return path


# ---------------------------------------------------------------------------------------
# the table

@dataclass(frozen=True)
class Option:
    """One option: its API keyword, its command-line flags, how to parse it, its help."""

    key: str
    flags: Tuple[str, ...]
    parse: Callable[[Any, str], Any]
    help: str
    metavar: Optional[str] = None
    repeat: bool = False      # the flag may be given several times (values collected)
    switch: bool = False      # a flag without a value
    aliases: Tuple[str, ...] = ()  # extra API/`%cgroup` keywords

    @property
    def flag(self) -> str:
        return self.flags[0]


OPTIONS: Tuple[Option, ...] = (
    Option("memory", ("--mem", "--memory"), parse_memory,
           "memory limit, like 64M or 1.5G; going over it gets the container OOM-killed",
           "SIZE", aliases=("mem",)),
    Option("swap", ("--swap",), parse_size,
           "swap the container may use on top of --mem (default 0 when --mem is set)", "SIZE"),
    Option("cpus", ("--cpus",), parse_cpus,
           "CPU quota in CPUs, like 0.5 for half of one CPU", "N"),
    Option("cpuset", ("--cpuset",), parse_cpuset,
           "which CPUs the container may run on, like 0 or 0-1", "LIST"),
    Option("pids", ("--pids",), parse_pids,
           "most processes the container may have at once (stops fork bombs)", "N"),
    Option("io_read_bps", ("--io-read-bps",), parse_io,
           "read bandwidth cap for a block device, like /dev/vda:10M", "DEV:RATE", repeat=True),
    Option("io_write_bps", ("--io-write-bps",), parse_io,
           "write bandwidth cap for a block device, like /dev/vda:10M", "DEV:RATE", repeat=True),
    Option("namespaces", ("--ns",), parse_namespaces,
           "namespaces to create (default: all the host supports): " + ",".join(NAMESPACES),
           "LIST"),
    Option("no_namespaces", ("--no-ns",), parse_namespaces,
           "namespaces to leave out, like --no-ns net,user", "LIST"),
    Option("net", ("--net",), parse_choice(("none", "host")),
           "network: none (own namespace with only loopback, the default) or host", "MODE"),
    Option("hostname", ("--hostname",), parse_hostname, "the container's hostname", "NAME"),
    Option("rootfs", ("--rootfs",), parse_rootfs,
           "run on this directory as root filesystem (never modified: writes go to a "
           "throwaway layer)", "DIR"),
    Option("image", ("--image",), parse_name, "run on this image's layers (see pynsbook images ls)", "NAME"),
    Option("timeout", ("--timeout",), lambda v, l: parse_seconds(v, l),
           "stop the container after this many seconds (exit status 124)", "SECONDS"),
    Option("uptime", ("--uptime",), lambda v, l: parse_seconds(v, l, allow_zero=True),
           "what the container's uptime starts at, in seconds (time namespace)", "SECONDS"),
    Option("env", ("--env", "-e"), parse_env, "set an environment variable; repeatable",
           "KEY=VALUE", repeat=True),
    Option("workdir", ("--workdir", "-w"), parse_abs_path,
           "working directory inside the container", "DIR"),
    Option("name", ("--name",), parse_name,
           "name the container so later runs can use it", "NAME"),
    Option("privileged", ("--privileged",), parse_bool,
           "give the container all of root's powers: every capability, no seccomp filter, "
           "/proc and /sys unmasked (for experiments; never for code you do not trust)",
           switch=True),
    Option("cap_add", ("--cap-add",), parse_caps,
           "add capabilities to Docker's default set, like NET_ADMIN or ALL", "CAPS",
           repeat=True),
    Option("cap_drop", ("--cap-drop",), parse_caps,
           "drop capabilities from the default set, like NET_RAW or ALL", "CAPS", repeat=True),
    Option("seccomp", ("--security-opt",), parse_security_opt,
           "seccomp=unconfined (no system-call filter) or seccomp=PROFILE.json "
           "(a Docker-format profile instead of the default)", "OPT",
           aliases=("security_opt",)),
    Option("read_only", ("--read-only",), parse_bool,
           "make the container's root filesystem read-only (/tmp, /run and /dev/shm stay "
           "writable)", switch=True),
    Option("best_effort", ("--best-effort",), parse_bool,
           "run with what the host can enforce and report what was dropped, "
           "instead of refusing", switch=True),
)

_BY_KEY: Dict[str, Option] = {}
for _opt in OPTIONS:
    _BY_KEY[_opt.key] = _opt
    for _alias in _opt.aliases:
        _BY_KEY[_alias] = _opt

KEYWORDS: Tuple[str, ...] = tuple(o.key for o in OPTIONS)


def option(key: str) -> Option:
    """The option for an API keyword or alias (``mem`` and ``memory`` are the same)."""
    return _BY_KEY[key]


def make_spec(values: Optional[Mapping[str, Any]] = None, *, cli: bool = False,
              base: Optional[Spec] = None, **kwargs: Any) -> Spec:
    """Parse raw option values (strings from a command line, or Python values) into a Spec.

    ``cli`` only changes how options are named in messages (``--mem`` vs ``memory``).
    Unknown keywords raise ``TypeError`` like any Python call would.
    """
    raw = dict(values or {})
    raw.update(kwargs)
    parsed: Dict[str, Any] = {}
    for key, value in raw.items():
        if value is None or (isinstance(value, (list, tuple)) and not value and key != "namespaces"):
            continue
        if key not in _BY_KEY:
            raise TypeError(f"unknown option {key!r}; known options: {', '.join(KEYWORDS)}")
        opt = _BY_KEY[key]
        label = opt.flag if cli else opt.key
        if opt.repeat and isinstance(value, (list, tuple)) and not isinstance(value, IoLimit):
            if opt.key == "env":
                parsed[opt.key] = parse_env(list(value), label)
            else:
                parsed[opt.key] = tuple(x for v in value for x in opt.parse(v, label))
        else:
            parsed[opt.key] = opt.parse(value, label)
    return _assemble(parsed, base or Spec(), cli)


def _assemble(parsed: Dict[str, Any], base: Spec, cli: bool) -> Spec:
    label = (lambda key: option(key).flag) if cli else (lambda key: key)
    listed = "namespaces" in parsed  # --ns: exactly these, each one required
    ns = set(parsed.pop("namespaces", base.namespaces))
    explicit = set(ns) if listed else set(base.explicit_namespaces)
    ns -= parsed.pop("no_namespaces", frozenset())
    explicit &= ns
    net = parsed.get("net", base.net)
    if net == "host":
        if listed and "net" in ns:
            raise OptionError(label("net"), "host", "--net none when --ns lists net "
                              "(a container on the host network has no network namespace)")
        ns.discard("net")
        explicit.discard("net")
    elif "net" in parsed:  # --net none asked for: the network namespace is required
        if "net" not in ns:
            raise OptionError(label("net"), net, "--net host when the net namespace is off "
                              "(--net none needs a network namespace)")
        explicit.add("net")
    if "hostname" in parsed and "uts" not in ns:
        raise OptionError(label("hostname"), parsed["hostname"],
                          "no hostname unless the uts namespace is on (drop --no-ns uts)")
    if "uptime" in parsed and "time" not in ns:
        raise OptionError(label("uptime"), parsed["uptime"],
                          "no uptime unless the time namespace is on (drop --no-ns time)")
    if (parsed.get("rootfs") or base.rootfs) and (parsed.get("image") or base.image):
        raise OptionError(label("image"), parsed.get("image") or base.image,
                          "either --rootfs DIR or --image NAME, not both")
    if "swap" in parsed and "memory" not in parsed and base.memory is None:
        raise OptionError(label("swap"), parsed["swap"], "--swap together with --mem")
    spec = base.replace(namespaces=frozenset(ns), explicit_namespaces=frozenset(explicit),
                        **parsed)
    return spec


def add_arguments(parser: argparse.ArgumentParser, keys: Optional[Sequence[str]] = None) -> None:
    """Add the options of the table (all, or those named by ``keys``) to an argparse parser
    (values stay raw strings)."""
    for opt in OPTIONS:
        if keys is not None and opt.key not in keys:
            continue
        if opt.switch:
            parser.add_argument(*opt.flags, dest=opt.key, action="store_true", default=None,
                                help=opt.help)
        elif opt.repeat:
            parser.add_argument(*opt.flags, dest=opt.key, action="append", metavar=opt.metavar,
                                help=opt.help)
        else:
            parser.add_argument(*opt.flags, dest=opt.key, metavar=opt.metavar, help=opt.help)


def spec_from_args(args: argparse.Namespace) -> Spec:
    """Build a Spec from what ``add_arguments`` parsed."""
    values = {opt.key: getattr(args, opt.key, None) for opt in OPTIONS}
    return make_spec(values, cli=True)
