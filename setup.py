"""pushsvc's build: setup.cfg holds the metadata; this file adds the compiled frame path.

The modules in ``COMPILED`` are most of the way a frame goes between the WebSocket
engine and the store (docs/architecture.md says which stay out, and why). They are
compiled with mypyc (mypy's compiler for type-annotated Python, which black and mypy
ship with) when the build can: mypy in the build environment (pyproject.toml asks
for it) and a working C compiler. Otherwise, or with ``PUSHSVC_COMPILE=0``, they stay
plain Python: the same source and behaviour, slower (docs/performance.md, round 5).
A compile that fails never fails the install: it warns and installs the plain modules.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

#: The frame path. A module here must not be subclassed or monkeypatched
#: from interpreted code (mypyc classes refuse both) and its annotations must hold at
#: run time (mypyc checks them at every call into compiled code).
COMPILED = [
    "pushsvc/protocol/frames.py",
    "pushsvc/protocol/ids.py",
    "pushsvc/core/ratelimit.py",
    "pushsvc/transport/outbox.py",
    "pushsvc/transport/pacing.py",
    "pushsvc/transport/eager.py",
    "pushsvc/core/session.py",
    "pushsvc/delivery/tracker.py",
    "pushsvc/core/hub.py",
]


def _warn(message: str) -> None:
    print(f"pushsvc build: {message}; installing the plain Python modules", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Build the compiled modules all together or not at all."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # compiler missing or failing: the plain modules serve
            _warn(f"compiling the frame path failed ({exc})")
            # A partial set would not import. setuptools builds in build_lib and copies
            # in place (--inplace) only after a whole build, so build_lib is all there is.
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)


def _extensions() -> list[Any]:
    if os.environ.get("PUSHSVC_COMPILE", "1") == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _warn("mypyc is not installed")
        return []
    try:
        compiled = mypycify(COMPILED, opt_level="3", group_name="pushsvc.frame_path")
        return list(compiled)
    except (Exception, SystemExit) as exc:  # mypy found an error: compile nothing
        _warn(f"mypyc refused the modules ({exc})")
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
