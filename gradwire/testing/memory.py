"""Peak-memory checks in a child process (test helper).

``ru_maxrss`` is a per-process high-water mark, so a test that wants to bound what one operation
allocates runs it in a fresh interpreter: the child does its setup, records its peak RSS, runs the
operation, and reports the growth of the peak (plus whatever else the script puts in ``out``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_PRELUDE = """
import json, resource, sys
def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
out = {}
"""


# glibc adapts its mmap threshold upwards after large frees, after which freed blocks stay in the
# heap and the peak RSS depends on fragmentation (measured: 11-27 MiB for the same seeded work).
# A fixed threshold keeps every large block mmapped, so the peak tracks what was live.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def run_measured(setup: str, measured: str, *, timeout_s: float = 300.0) -> dict:
    """Run ``setup`` then ``measured`` (Python source) in a child interpreter; return the dict
    ``out`` the code filled, plus ``rss_growth_mib``: the peak RSS after ``measured`` minus the
    peak after ``setup``. The child inherits the environment (GRADWIRE_BUILD_DIR etc.) plus
    ``FIXED_MALLOC`` and the working directory, so it imports the same gradwire."""
    src = (_PRELUDE + textwrap.dedent(setup) + "\n_rss0 = _peak_mib()\n" + textwrap.dedent(measured)
           + "\nout['rss_growth_mib'] = _peak_mib() - _rss0\nprint('GW_RESULT ' + json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=timeout_s,
                          cwd=os.getcwd(), env={**os.environ, **FIXED_MALLOC})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("GW_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"child failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("GW_RESULT "):])
