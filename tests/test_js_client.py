"""The JavaScript client's own tests (clients/js/test/, node:test) against a real pushsvc.

They spawn ``python -m pushsvc serve`` with this interpreter; skipped only when
``node`` (and so ``npm``) is not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "clients" / "js"

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_js_client_suite() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JavaScript client tests need Node.js 18 or later")
    npm = shutil.which("npm")
    if not (JS / "node_modules" / "ws").is_dir():
        if npm is None:
            pytest.skip("npm is not installed: cannot install the client's devDependencies")
        installed = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=JS,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert installed.returncode == 0, f"npm ci failed:\n{installed.stdout}\n{installed.stderr}"
    env = {**os.environ, "PUSHSVC_PYTHON": sys.executable}
    result = subprocess.run(
        # One file at a time: the suites start servers and measure delays, and the CI
        # machine has two cores.
        [node, "--test", "--test-concurrency=1", "--test-reporter=spec", "clients/js/test/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # the suites take 30-60 s (the browser one runs only with chromium)
        env=env,
    )
    assert result.returncode == 0, f"node --test failed:\n{result.stdout}\n{result.stderr}"
