"""Closing a slide while another thread reads it must not crash the process.

A stop request (SIGTERM, Ctrl-C) unwinds the main thread, which closes the slide, while the pipeline's prefetch
thread may still be inside OpenSlide; OpenSlide then aborts (``tc->outstanding == 0``), exit status -6, as seen in
CI. The handle's ``close`` waits for reads in flight. Run in a subprocess: an abort must not take pytest with it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.hostile

SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from lpfm_toolkit.errors import LpfmError
    from lpfm_toolkit.sources.local import open_local

    h = open_local(sys.argv[1])
    lv = h.levels[0]
    started, results = threading.Event(), []

    def reader():
        for _ in range(50):
            started.set()
            try:
                results.append(h.read_region(0, 0, 0, lv.width, lv.height).shape)
            except LpfmError as exc:
                results.append(str(exc))
                return

    t = threading.Thread(target=reader)
    t.start()
    started.wait()
    time.sleep(0.01)  # inside a read, most likely: a whole-level read takes about 0.1 s
    h.close()
    t.join()
    print(len(results), results[-1])
    """
)


@pytest.mark.parametrize("attempt", range(3))
def test_close_waits_for_a_read_in_another_thread(sample_slide: Path, attempt: int) -> None:
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(sample_slide)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "closed before a queued read began" in res.stdout, res.stdout
