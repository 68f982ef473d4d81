"""Decide how a Spec is carried out on this host: which namespaces, which limits go to the
cgroup, which to the fallback (rlimits, CPU affinity, sampling) — or refuse, naming why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List

from .. import cgroups, probe
from ..cgroups.base import LIMIT_CONTROLLER
from ..errors import UnsupportedError
from ..spec import NAMESPACES, Spec, format_size, option


@dataclass
class Plan:
    namespaces: List[str]
    cgroup_limits: Dict[str, Any] = field(default_factory=dict)
    #: enforced without cgroups: "memory" (sampling), "pids" (RLIMIT_NPROC), "cpuset" (affinity)
    fallback_limits: Dict[str, Any] = field(default_factory=dict)
    dropped: Dict[str, str] = field(default_factory=dict)
    dropped_namespaces: Dict[str, str] = field(default_factory=dict)
    use_cgroup: bool = False
    #: the limits in force, by keyword
    limits: Dict[str, Any] = field(default_factory=dict)

    @property
    def enforcement(self) -> str:
        if self.use_cgroup and not self.fallback_limits:
            return cgroups.backend().name
        return "fallback" if self.fallback_limits or not self.use_cgroup else cgroups.backend().name


def _describe(key: str, value: Any) -> str:
    flag = option(key).flag
    if key in ("memory", "swap"):
        return f"{flag} {format_size(value)}"
    if key.startswith("io_"):
        return f"{flag} " + ",".join(f"{io.label}:{format_size(io.rate)}/s" for io in value)
    return f"{flag} {value}"


#: options that mean nothing without a namespace, and the namespace each needs
_NEEDS_NAMESPACE = (("hostname", "uts", "--hostname"), ("uptime", "time", "--uptime"),
                    ("rootfs", "mnt", "--rootfs"), ("image", "mnt", "--image"))


def _options_needing_namespaces(spec: Spec, plan: Plan, support: Dict[str, Any]) -> None:
    """An option whose namespace this host cannot give is an error (or, with best
    effort, a dropped option), never silently ignored."""
    for key, ns, flag in _NEEDS_NAMESPACE:
        value = getattr(spec, key, None)
        if value is None or ns in plan.namespaces:
            continue
        reason = plan.dropped_namespaces.get(ns) or support[ns][1] or f"the {ns} namespace is off"
        what = f"{flag} {value}"
        if key in ("rootfs", "image") or not spec.best_effort:
            fix = support[ns][2] or f"drop --no-ns {ns}"
            raise UnsupportedError(what, f"needs a {ns} namespace, and {reason}",
                                   fix + ("" if key in ("rootfs", "image") else
                                          " — or pass --best-effort to run without it"))
        plan.dropped[key] = f"needs a {ns} namespace: {reason}"


def make_plan(spec: Spec) -> Plan:
    support = probe.namespaces()
    namespaces, dropped_ns = [], {}
    for name in NAMESPACES:
        if name not in spec.namespaces:
            continue
        ok, reason, fix = support[name]
        if ok:
            namespaces.append(name)
        elif name in spec.explicit_namespaces and not spec.best_effort:
            raise UnsupportedError(f"--ns {name}", reason, fix)
        else:
            dropped_ns[name] = reason
    if os.geteuid() != 0 and "user" not in namespaces:
        # without a user namespace an unprivileged user can create no namespace at all
        for name in list(namespaces):
            namespaces.remove(name)
            dropped_ns[name] = support["user"][1]
    plan = Plan(namespaces=namespaces, dropped_namespaces=dropped_ns)
    if not namespaces and spec.namespaces:
        # never silent: the code runs, but it is no container at all
        why = dropped_ns.get("user") or next(iter(dropped_ns.values()), "")
        plan.dropped["namespaces"] = (f"this host gives no namespaces ({why}): the code runs "
                                      "WITHOUT ISOLATION, as an ordinary process of this user "
                                      "on the host")
    _options_needing_namespaces(spec, plan, support)

    backend = cgroups.backend()
    have = backend.controllers()
    plan.use_cgroup = bool(have)
    for key, value in spec.limits().items():
        raw = getattr(spec, key)
        controller = LIMIT_CONTROLLER[key]
        if controller in have and (key != "swap" or backend.can_swap()):
            plan.cgroup_limits[key] = raw
            plan.limits[key] = value
            continue
        missing = backend.missing(controller)
        reason = missing.reason
        if key == "swap" and controller in have:
            reason = "this kernel does not account swap per cgroup (swapaccount=1 is off)"
        if not spec.best_effort:
            raise UnsupportedError(_describe(key, raw), reason,
                                   (missing.fix or "") + " — or pass --best-effort to run without it")
        if key == "pids" and "user" not in plan.namespaces:
            # RLIMIT_NPROC counts processes per user and user namespace: without a user
            # namespace of its own, it would count every process this user has
            plan.dropped[key] = (f"{reason}; and without a user namespace a process limit "
                                 "would count all of this user's processes, not the container's")
        elif key in ("memory", "cpuset") or (key == "pids" and os.geteuid() != 0):
            plan.fallback_limits[key] = raw
            plan.limits[key] = value
        else:
            plan.dropped[key] = reason
    if spec.memory is not None and "memory" in plan.cgroup_limits and spec.swap is None:
        plan.cgroup_limits["swap"] = 0 if backend.can_swap() else None
        if backend.can_swap():
            plan.limits["swap"] = 0
        plan.cgroup_limits = {k: v for k, v in plan.cgroup_limits.items() if v is not None or k != "swap"}
    if spec.timeout is not None:
        plan.limits["timeout"] = spec.timeout
    _seccomp(spec, plan)
    return plan


def _seccomp(spec: Spec, plan: Plan) -> None:
    """Without libseccomp the default filter is left out, and said so; a profile the user
    named is refused instead."""
    if spec.privileged or spec.seccomp == "unconfined":
        return
    from ..linux import seccomp
    ok, why = seccomp.available()
    if ok:
        return
    if spec.seccomp != "default":
        raise UnsupportedError(f"--security-opt seccomp={spec.seccomp}", why)
    plan.dropped["seccomp"] = f"the default system-call filter is off: {why}"
