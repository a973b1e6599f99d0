#!/usr/bin/env python3
"""The memory of a set of processes as the kernel charges it: every resident page counted once.

Usage: memory.py LABEL=PID... ; prints a markdown table (one row per process: RSS, USS, and
how much of it is the executable's pages) and the total: the number of distinct physical
pages (PFNs from /proc/<pid>/pagemap, root only) mapped by any of them, so pages the processes
share (the one binary) count once and pages they keep to themselves count fully. PSS would
split the binary's pages with every other process that maps it (other lab nodes too), and
summing RSS counts them once per process.
"""
import os
import re
import struct
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")
PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63


def rollup(pid):
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            m = re.match(r"(\w+):\s+(\d+) kB", line)
            if m:
                fields[m.group(1)] = int(m.group(2))
    return fields


def mappings(pid):
    """(start, end, path, rss_kb) of every mapping with resident pages."""
    out, current = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \d+\s*(.*)", line)
            if m:
                current = [int(m.group(1), 16), int(m.group(2), 16), m.group(3).strip(), 0]
                out.append(current)
            elif line.startswith("Rss:") and current is not None:
                current[3] = int(line.split()[1])
    return [m for m in out if m[3] > 0]


def frames(pid):
    """Physical frames of pid's resident pages, and those of its executable."""
    exe = os.path.realpath(f"/proc/{pid}/exe")
    every, binary = set(), set()
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        for start, end, path, _ in mappings(pid):
            pm.seek(start // PAGE * 8)
            data = pm.read((end - start) // PAGE * 8)
            for (entry,) in struct.iter_unpack("<Q", data):
                if entry & PRESENT:
                    pfn = entry & PFN_MASK
                    if pfn == 0:
                        sys.exit("memory.py: pagemap shows no frame numbers; run as root")
                    every.add(pfn)
                    if path == exe:
                        binary.add(pfn)
    return every, binary


def mib(kb):
    return f"{kb / 1024:.1f}"


def main():
    procs = [a.split("=", 1) for a in sys.argv[1:]]
    if not procs:
        sys.exit(__doc__)
    all_frames, all_binary = set(), set()
    print("| process | RSS MiB | USS MiB | of RSS: the binary's pages, MiB |")
    print("|---|---|---|---|")
    uss_sum = 0
    for label, pid in procs:
        r = rollup(pid)
        uss = r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)
        uss_sum += uss
        every, binary = frames(pid)
        all_frames |= every
        all_binary |= binary
        print(f"| {label} | {mib(r.get('Rss', 0))} | {mib(uss)} | {mib(len(binary) * PAGE / 1024)} |")
    total = len(all_frames) * PAGE / 1024
    shared_binary = len(all_binary) * PAGE / 1024
    print(
        f"| **all {len(procs)}, each page once** | **{mib(total)}** | sum {mib(uss_sum)} | "
        f"binary once: {mib(shared_binary)} |"
    )


main()
