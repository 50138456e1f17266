#!/usr/bin/env python3
"""Splits a GNU ld map file's output sections by where their bytes come from.

    python3 capi/firmware/footprint.py target/capi/firmware.map

Prints, for the .text output section (code and read-only data, see
link.ld), the bytes contributed by libbatchnorm_c.a (the Rust library with
its core, libm and compiler_builtins parts) and by everything else (the C
startup and test, newlib-nano, libgcc), after --gc-sections.
"""
import re
import sys

LINE = re.compile(r"^\s*(\S+)?\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+(\S.*)$")


def main(path):
    out_section = None
    pending = None  # an input section name alone on its line
    totals = {}
    for raw in open(path):
        line = raw.rstrip("\n")
        if line and not line[0].isspace():
            # an output section header, e.g. ".text   0x0  0x1234"
            out_section = line.split()[0]
            pending = None
            continue
        if out_section is None:
            continue
        m = LINE.match(line)
        if m is None:
            s = line.strip()
            pending = s if s.startswith(".") and " " not in s else None
            continue
        name = m.group(1) or pending
        pending = None
        if name is None or not name.startswith("."):
            continue
        size = int(m.group(3), 16)
        origin = "libbatchnorm_c.a" if "libbatchnorm_c.a" in m.group(4) else "C, newlib, libgcc"
        key = (out_section, origin)
        totals[key] = totals.get(key, 0) + size
    for (sec, origin), size in sorted(totals.items()):
        if sec in (".text", ".data", ".bss", ".ARM.exidx") and size:
            print(f"{sec:<11} {origin:<20} {size:>8} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
