"""Is this process in a container, and does an output path survive it?

``lvsa generate --output /abs/path.mp4`` inside ``docker run --rm`` writes into the
container's own file system unless the path is on a bind mount: the video is lost with
the container (troubleshooting guide, Symptom 3). These helpers read
``/proc/self/mountinfo`` and the usual container markers and phrase the warning.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple

_VIRTUAL_FS = {"proc", "sysfs", "tmpfs", "devtmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "overlay",
               "aufs", "securityfs", "debugfs", "tracefs", "pstore", "bpf", "ramfs", "shm", "fusectl"}


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def parse_mountinfo(text: str) -> List[Tuple[str, str, str]]:
    """``(mount_point, fstype, root)`` per line of ``/proc/self/mountinfo``."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if " - " not in line or len(parts) < 7:
            continue
        left, right = line.split(" - ", 1)
        lp, rp = left.split(), right.split()
        if len(lp) < 5 or not rp:
            continue
        out.append((_unescape(lp[4]), rp[0], _unescape(lp[3])))
    return out


def container_evidence(root: str = "/") -> Optional[str]:
    """Why we think we run in a container (``None``: no evidence)."""
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    if os.path.exists(j(".dockerenv")):
        return "/.dockerenv exists"
    if os.path.exists(j("run", ".containerenv")):
        return "/run/.containerenv exists"
    cg = _read(j("proc", "1", "cgroup")) + _read(j("proc", "self", "cgroup"))
    for word in ("docker", "kubepods", "containerd", "libpod", "lxc"):
        if word in cg:
            return f"/proc/1/cgroup mentions {word}"
    for mp, fstype, _ in parse_mountinfo(_read(j("proc", "self", "mountinfo"))):
        if mp == "/" and fstype in ("overlay", "aufs"):
            return f"the root file system is {fstype} (/proc/self/mountinfo)"
    return None


def mount_of(path: str, mounts: List[Tuple[str, str, str]]) -> Optional[Tuple[str, str, str]]:
    best = None
    for m in mounts:
        mp = m[0].rstrip("/") or "/"
        if path == mp or path.startswith(mp.rstrip("/") + "/") or mp == "/":
            if best is None or len(mp) > len(best[0].rstrip("/") or "/"):
                best = m
    return best


def on_bind_mount(path: str, root: str = "/") -> bool:
    """Whether ``path`` lives on a mount the host can see (not the container's own root or a tmpfs)."""
    m = mount_of(path, parse_mountinfo(_read(os.path.join(root, "proc", "self", "mountinfo"))))
    if m is None:
        return False
    mp, fstype, _ = m
    return (mp.rstrip("/") or "/") != "/" and fstype not in _VIRTUAL_FS


def container_path_warning(arg: str, path: str, flag: str = "--output", root: str = "/") -> Optional[str]:
    """The Symptom 3 warning for an absolute output path outside any bind mount in a container."""
    if not os.path.isabs(os.path.expanduser(arg)):
        return None
    why = container_evidence(root)
    if why is None or on_bind_mount(path, root):
        return None
    return (f"WARNING: running inside a container ({why}) and {flag} {path} is not on a bind mount: "
            "the file stays inside the container and is lost with `docker run --rm`. Use a relative path "
            "below a bind-mounted working directory instead, e.g. `docker run -v $(pwd):/workdir/code "
            f"-w /workdir/code ... lvsa generate {flag} outputs/{os.path.basename(path)}`, then "
            "`chown -R $(id -u):$(id -g) outputs` on the host")
