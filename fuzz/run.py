"""``python fuzz/run.py TARGET [libFuzzer options]``: fuzz one target of targets.py with atheris.

Only pushsvc's modules are instrumented for coverage (all of them would take
the fuzzer half a minute to start).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["pushsvc"]):
    from targets import TARGETS


def main() -> None:
    """Fuzz the target named by the first argument; libFuzzer reads the rest."""
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
