"""Memory and CPU time of a process tree, per process and by role, from /proc (Linux; no psutil).

``memory_report(pid)``: every process under ``pid`` (Ray's gcs_server and
raylet are children of the driver that started them, workers children of the
raylet) with its RSS and PSS in MB and a role read from its command line
(``replica RouterIngress``, ``serve proxy``, ``gcs``, ...). RSS counts shared
pages (torch's libraries, mapped by every replica) once per process, so the
RSS total overstates what the tree takes; PSS splits shared pages between
the processes that map them, so the PSS total is what the tree really holds.

``cpu_seconds(pid)``: user+system CPU seconds of every process under ``pid``
by role; the difference over a load point divided by its requests is the CPU
each part of the stack spends per request, which other work on a shared box
does not change (unlike throughput).
"""

from __future__ import annotations

import os
from pathlib import Path

ROLES = (  # (substring of the command line, role); first match wins
    ("ray::ServeController", "serve controller"),
    ("ray::ProxyActor", "serve proxy"),
    ("ray::IDLE", "idle worker"),
    ("ray::HAProxyManager", "serve haproxy manager"),
    ("dashboard/dashboard.py", "dashboard"),
    ("gcs_server", "gcs"),
    ("raylet", "raylet"),
    ("dashboard/agent.py", "dashboard agent"),
    ("runtime_env/agent", "runtime env agent"),
    ("log_monitor", "log monitor"),
    ("monitor.py", "monitor"),
    ("haproxy", "haproxy"),
)


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name field may hold spaces and parentheses
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    children, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _kb(text: str, key: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(key):
            return float(line.split()[1])
    return None


def process_memory(pid: int) -> dict | None:
    """RSS, PSS (MB) and command line of ``pid``; None when it is gone."""
    try:
        cmdline = (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip())
        rss = _kb(Path(f"/proc/{pid}/status").read_text(), "VmRSS:")
        pss = _kb(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss:")
    except OSError:
        return None
    return {"pid": pid, "cmdline": cmdline[:200], "rss_mb": round((rss or 0) / 1024, 1), "pss_mb": round((pss or 0) / 1024, 1)}


def role(cmdline: str, is_root: bool) -> str:
    if is_root:
        return "driver"
    if "ray::ServeReplica:" in cmdline:
        return "replica " + cmdline.split("ray::ServeReplica:", 1)[1].split()[0].split(":")[-1]
    for needle, name in ROLES:
        if needle in cmdline:
            return name
    if cmdline.startswith("ray::"):  # another actor; its title carries the running method (ray::Name.method)
        return "actor " + cmdline[5:].split()[0].split(".")[0]
    return os.path.basename(cmdline.split()[0]) if cmdline else "?"


def memory_report(root: int) -> dict:
    """Per-process and per-role memory of the tree under ``root``, with totals."""
    processes = []
    for pid in process_tree(root):
        mem = process_memory(pid)
        if mem is not None and mem["rss_mb"] > 0:
            processes.append(dict(mem, role=role(mem["cmdline"], pid == root)))
    by_role: dict[str, dict] = {}
    for p in processes:
        r = by_role.setdefault(p["role"], {"processes": 0, "rss_mb": 0.0, "pss_mb": 0.0})
        r["processes"] += 1
        r["rss_mb"] = round(r["rss_mb"] + p["rss_mb"], 1)
        r["pss_mb"] = round(r["pss_mb"] + p["pss_mb"], 1)
    return {
        "processes": sorted(processes, key=lambda p: -p["rss_mb"]),
        "by_role": dict(sorted(by_role.items(), key=lambda kv: -kv[1]["rss_mb"])),
        "total_rss_mb": round(sum(p["rss_mb"] for p in processes), 1),
        "total_pss_mb": round(sum(p["pss_mb"] for p in processes), 1),
    }


def _cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds used so far by the processes under ``root`` (``root`` itself included), summed by role."""
    out: dict[str, float] = {}
    for pid in process_tree(root):
        cpu = _cpu_s(pid)
        mem = process_memory(pid)
        if cpu is None or mem is None:
            continue
        name = role(mem["cmdline"], pid == root)
        out[name] = out.get(name, 0.0) + cpu
    return out


def cpu_ms_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """CPU milliseconds per request by role between two ``cpu_seconds`` readings (roles that used any)."""
    if requests <= 0:
        return {}
    out = {k: (after.get(k, 0.0) - before.get(k, 0.0)) * 1000.0 / requests for k in after}
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0}
