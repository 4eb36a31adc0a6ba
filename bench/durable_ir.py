#!/usr/bin/env python3
"""bench/durable_ir.py - instructions per acked message (bench/durable.py under callgrind).

Wall-clock figures mean little on a shared 2-core machine; the server's CPU
time per message (bench/durable.py's µs/msg) moves by ±20 % with what else
runs on its core. The instructions it executes do not: this runs
bench/durable.py with the server under ``valgrind --tool=callgrind
--instr-atstart=no`` and switches instrumentation on for the measured window
only (``callgrind_control -i on/off``), then prints the instructions (Ir, user
space of every server thread; the kernel is not counted) per acked message.

The server is about 50 times slower under callgrind, so use few users and a
rate it keeps up with; ``--phases rate`` gives every side the same messages in
the same time (timers and WAL checkpoints then cost the same per message):

    python bench/durable_ir.py --label head -- --phases rate --rate 10 --duration 20 \\
        --users 200 --senders 50
    python bench/durable_ir.py --src /tmp/old-tree --label old -- --phases rate ...

``--src`` runs another source tree's server (a ``git archive`` of another
commit) with this venv's packages; its ``plugins`` folder stands in for the
installed ``pushsvc_plugins``. Needs valgrind (``callgrind_control``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import durable  # noqa: E402 - the benchmark this drives, beside this file


def wrapper(src: Path, out: str, work: Path) -> Path:
    """A shell script that runs ``src``'s pushsvc under callgrind (instrumentation off)."""
    shim = work / "shim"
    shim.mkdir()
    (shim / "pushsvc_plugins").symlink_to(src / "plugins")
    script = work / "pushsvc.sh"
    script.write_text(
        f"#!/bin/sh\ncd {src}\nPYTHONPATH={shim}:{src} exec valgrind --tool=callgrind "
        f'--instr-atstart=no --callgrind-out-file={out} {sys.executable} -m pushsvc "$@"\n'
    )
    script.chmod(0o755)
    return script


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default=str(HERE.parent), help="source tree of the server")
    parser.add_argument("--label", default="run", help="name of the callgrind output")
    parser.add_argument("durable_args", nargs="*", help="bench/durable.py arguments (after --)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pushsvc-ir-"))
    out = str(work / f"callgrind.{args.label}")
    script = wrapper(Path(args.src).resolve(), out, work)
    durable.START_SECONDS = 600  # python's imports under valgrind
    durable.DRAIN_SECONDS = 120
    state: dict[str, Any] = {"calls": 0, "pid": None}
    server_cpu, machine_cpu = durable.server_cpu, durable.machine_cpu

    def track_pid(pid: int, thread: int | None = None) -> float:
        state["pid"] = pid  # taskset, sh and valgrind exec: the same process
        return server_cpu(pid, thread)

    def toggle() -> float:  # called once as the window opens, once as it closes
        state["calls"] += 1
        switch = "on" if state["calls"] % 2 else "off"
        subprocess.run(
            ["callgrind_control", "-i", switch, str(state["pid"])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        return machine_cpu()

    phases: list[durable.Phase] = []
    rows = durable.rows

    def keep(found: list[durable.Phase]) -> list[str]:
        phases[:] = found
        return rows(found)

    durable.server_cpu, durable.machine_cpu, durable.rows = track_pid, toggle, keep
    # Its table goes beside the callgrind output unless --out says otherwise: a run
    # under callgrind is no figure for bench/results/durable-latest.md.
    out_args = [] if "--out" in args.durable_args else ["--out", str(work / "durable.md")]
    status = durable.main(["--pushsvc", str(script), *out_args, *args.durable_args])
    total = 0
    for path in work.glob(f"callgrind.{args.label}*"):
        found = re.search(r"^totals: (\d+)", path.read_text(), re.M)
        total += int(found.group(1)) if found else 0
    acked = phases[-1].window_acked if phases else 0
    if not total or not acked:
        print(f"{args.label}: no instructions or no acked message measured", file=sys.stderr)
        return 1
    print(f"{args.label}: {total:,} instructions, {acked} acked, {total / acked:,.0f} per message")
    print(f"callgrind output: {out}.<pid> (callgrind_annotate)")
    return status


if __name__ == "__main__":
    sys.exit(main())
