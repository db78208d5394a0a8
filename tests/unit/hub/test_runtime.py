"""A serving process settles its interpreter once start-up is done (:func:`settle_process`)."""

from __future__ import annotations

import subprocess
import sys

from hie.hub.runtime import SWITCH_INTERVAL


def test_a_settled_process_keeps_its_start_up_objects_out_of_the_collector() -> None:
    # in a fresh interpreter: freezing this test process would keep every later test's garbage
    script = (
        "import gc, sys\n"
        "import hie.fhir.app\n"
        "from hie.hub.runtime import settle_process\n"
        "before = (gc.get_freeze_count(), sys.getswitchinterval())\n"
        "settle_process()\n"
        "print(*before, gc.get_freeze_count(), sys.getswitchinterval())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    frozen_before, switch_before, frozen, switch = (
        int(out[0]),
        float(out[1]),
        int(out[2]),
        float(out[3]),
    )
    assert frozen_before == 0 and switch_before == 0.005  # CPython's defaults
    assert frozen > 50_000  # the hub's modules and their objects
    assert switch == SWITCH_INTERVAL == 0.001
