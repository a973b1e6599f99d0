#!/usr/bin/env python3
"""What each crate contributes to a binary's code and data, from its symbol table.

Usage: size-by-crate.py UNSTRIPPED_BINARY [NM (default nm)] [TOP (default 25)]

Reads `NM --print-size --size-sort --demangle` and attributes every sized symbol to the
crate its demangled path starts with (for `<A as B>::f`, A's crate; generic code lands in the
crate that defines it, wherever it was instantiated, as `cargo bloat --crates` does). Symbols
without a Rust path (C and C++ code: CycloneDDS, ring's assembly, libc) are grouped as
"[C/C++/asm]". Prints a markdown table of the largest crates and the total. Build the binary
with CARGO_PROFILE_DIST_STRIP=false in the environment to keep the symbols (zigbuild ignores
`--config profile.dist.strip=false`), and strip a copy for its size.
"""
import collections
import re
import subprocess
import sys

binary = sys.argv[1]
nm = sys.argv[2] if len(sys.argv) > 2 else "nm"
top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
out = subprocess.run(
    [nm, "--print-size", "--size-sort", "--demangle", binary],
    check=True, capture_output=True, text=True,
).stdout

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
sizes = collections.Counter()
total = 0
for line in out.splitlines():
    parts = line.split(None, 3)
    if len(parts) < 4 or parts[2].lower() not in "tdrbvw":
        continue
    size = int(parts[1], 16)
    name = parts[3]
    total += size
    path = name.lstrip("<&*( ").removeprefix("dyn ").removeprefix("mut ")
    crate = "[C/C++/asm]"
    if "::" in path:
        m = IDENT.match(path)
        if m:
            crate = m.group(0)
    sizes[crate] += size

if total == 0:
    sys.exit(f"size-by-crate: {binary} has no symbols (stripped); build it with --config profile.dist.strip=false")
print("| crate | KiB | share |")
print("|---|---:|---:|")
for crate, size in sizes.most_common(top):
    print(f"| {crate} | {size / 1024:,.0f} | {100 * size / total:.1f} % |")
rest = total - sum(s for _, s in sizes.most_common(top))
print(f"| the other {max(0, len(sizes) - top)} | {rest / 1024:,.0f} | {100 * rest / total:.1f} % |")
print(f"| **all sized symbols** | **{total / 1024:,.0f}** | |")
