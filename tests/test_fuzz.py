"""The fuzz targets of ``fuzz/targets.py`` in the suite: hypothesis bytes, seeds, regressions.

``make fuzz`` runs each target under atheris (coverage-guided) for minutes;
here every target gets a bounded run of hypothesis-generated inputs, its
seed corpus, and the inputs that once crashed it (each a regression case).
With atheris installed, each target also gets a few seconds of atheris.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fuzz"))

from targets import TARGETS  # noqa: E402

#: Inputs that crashed a target once (found by atheris), kept as regression cases.
REGRESSIONS: dict[str, list[bytes]] = {
    # ConfigError named an empty section "" (the message began with ':'); now quoted.
    "config_loader": [b'""=""', b'[server]\n"a b" = 1'],
}


def seeds(name: str) -> list[bytes]:
    return [path.read_bytes() for path in sorted((ROOT / "fuzz" / "seeds" / name).iterdir())]


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_and_regressions(name: str) -> None:
    for data in seeds(name) + REGRESSIONS.get(name, []):
        TARGETS[name](data)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_hypothesis_bytes(name: str) -> None:
    target = TARGETS[name]
    corpus = seeds(name)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.one_of(st.binary(max_size=400), st.sampled_from(corpus).flatmap(mutations)))
    def run(data: bytes) -> None:
        target(data)

    run()


def mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """A seed with a few bytes changed, cut or inserted."""
    return st.lists(
        st.tuples(st.integers(0, max(0, len(seed) - 1)), st.binary(max_size=3), st.booleans()),
        max_size=4,
    ).map(lambda edits: _apply(seed, edits))


def _apply(seed: bytes, edits: list[tuple[int, bytes, bool]]) -> bytes:
    data = bytearray(seed)
    for pos, chunk, replace in edits:
        pos = min(pos, len(data))
        data[pos : pos + (len(chunk) if replace else 0)] = chunk
    return bytes(data)


@pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import atheris"], capture_output=True).returncode,
    reason="atheris is not installed (a dev dependency on Linux x86-64 only)",
)
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_atheris_bounded_run(name: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "fuzz" / "run.py"),
            name,
            "-max_total_time=2",
            f"-artifact_prefix={tmp_path}/",
            str(tmp_path),
            str(ROOT / "fuzz" / "seeds" / name),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
