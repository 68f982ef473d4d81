"""What a container's processes may do to the kernel they share, and confining a process
to it.

By default a container gets Docker's defaults and a little more: the 14 capabilities
Docker keeps (``caps.DEFAULT``), ``no_new_privs``, a seccomp filter with the semantics of
Docker's default profile (linux/seccomp.py), runc's masked and read-only paths and a /dev
of harmless devices (linux/rootfs.py: the init sets those up). ``--privileged`` turns all
of it off; ``--cap-add``/``--cap-drop`` and ``--security-opt seccomp=...`` change one part.

:func:`apply` is the last step before a process runs its workload. Order matters, because
each step takes away what a later one might need: a session keyring of its own first
(keyctl is filtered afterwards), then the capability bounding set, no_new_privs, the
seccomp filter (loading it unprivileged needs no_new_privs), and last the effective,
permitted and inheritable sets (capset is allowed by the filter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Optional

from ..errors import ContainerError
from ..linux import caps, libc, seccomp
from ..spec import Spec


#: the init's capabilities once the container is built
INIT_CAPS = frozenset({"KILL"})


@dataclass(frozen=True)
class Confinement:
    """The confinement of one container's processes, derived from its Spec."""

    caps: FrozenSet[str]
    #: None (no filter), "default", or the path of a Docker-format profile
    seccomp: Optional[str]
    no_new_privs: bool
    #: MASKED and READ_ONLY applied (the init does it, when it builds the root)
    mask_paths: bool
    read_only_root: bool
    #: the profile file's content hash: a spare confined with an older version of the file
    #: is not adopted (pool.shape compares whole Confinements)
    profile_digest: Optional[str] = None

    @property
    def privileged(self) -> bool:
        return self.caps == caps.ALL and self.seccomp is None and not self.mask_paths

    def for_init(self) -> Optional[Dict[str, Any]]:
        """What the container's init keeps once it has built the container: only KILL (to
        pass host signals on to processes of any uid) under no_new_privs and the default
        filter. Otherwise a process given SYS_PTRACE could drive the init, which held every
        capability, into undoing a read-only mount. None when privileged."""
        if self.privileged:
            return None
        return {"caps": sorted(INIT_CAPS), "seccomp": self.seccomp is not None,
                "profile": None, "no_new_privs": True}

    def to_msg(self) -> Dict[str, Any]:
        """What the process that becomes the workload applies (engine/confine.py)."""
        profile = None
        if self.seccomp not in (None, "default"):
            profile = seccomp.load_profile(self.seccomp)
        return {"caps": sorted(self.caps), "seccomp": self.seccomp is not None,
                "profile": profile, "no_new_privs": self.no_new_privs}


def from_spec(spec: Spec) -> Confinement:
    """Docker's rules: start from the default set (or every capability when privileged),
    drop what --cap-drop names, then add what --cap-add names (ALL means every one)."""
    if spec.privileged:
        return Confinement(caps.ALL, None, False, False, spec.read_only)
    kept = set(caps.DEFAULT)
    if "ALL" in spec.cap_drop:
        kept.clear()
    kept -= set(spec.cap_drop)
    if "ALL" in spec.cap_add:
        kept |= caps.ALL
    kept |= set(spec.cap_add) - {"ALL"}
    seccomp = None if spec.seccomp == "unconfined" else spec.seccomp
    digest = None
    if seccomp not in (None, "default"):
        import hashlib
        try:
            with open(seccomp, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            digest = "unreadable"  # to_msg says why, when the container starts
    return Confinement(frozenset(kept), seccomp, True, True, spec.read_only, digest)


def prepare(cfg: Optional[Dict[str, Any]]) -> None:
    """Compile the seccomp filter into ``cfg["bpf"]`` while the host's files (libseccomp)
    are still in reach: the entrant calls it before it forks the run. Cheap when the
    launcher compiled the same filter already (its forks share the cache)."""
    if cfg is not None and cfg.get("seccomp") and "bpf" not in cfg:
        try:
            cfg["bpf"] = seccomp.compile_bpf(frozenset(cfg["caps"]), cfg.get("profile"))
        except (ImportError, OSError, ValueError, RuntimeError) as err:
            raise ContainerError(f"could not build the seccomp filter: {err}") from None


def warm() -> None:
    """Compile the default filters (a run's, an init's) once, in the launcher, before
    anything is forked."""
    try:
        seccomp.compile_bpf(caps.DEFAULT)
        seccomp.compile_bpf(INIT_CAPS)
    except Exception:
        pass  # no libseccomp: doctor says so, and each run reports it


def apply(cfg: Optional[Dict[str, Any]]) -> None:
    """Apply ``Confinement.to_msg()`` (made ready by :func:`prepare`) to this process;
    no-op for None (privileged). Raises OSError naming the step that failed: a process
    that cannot be confined does not run."""
    if cfg is None:
        return
    try:
        libc.join_new_session_keyring()
    except OSError:
        pass  # a kernel without keys, or a filter already forbidding keyctl: nothing shared
    kept = frozenset(cfg["caps"])
    if kept != caps.ALL:
        caps.restrict_bounding(kept)
    if cfg.get("no_new_privs"):
        caps.no_new_privs()
    if cfg.get("seccomp"):
        seccomp.load_bpf(cfg["bpf"])
    if kept != caps.ALL:
        caps.restrict(kept)
