"""R²ec model core: backbone loading, prompts, the two-head model, RecPO, evaluation.

With 2 torch threads and any other busy process, OpenMP's spin-waiting makes
generation ~10x slower on the 2-core machines this runs on (docs/architecture.md §6), and the
policy is read once when libgomp loads, so it must be set before torch is
imported. `setdefault` keeps a user's explicit choice.

This is the one place it is set: entry points (the `r2ec` command, bench/) import `model`
before torch or faiss.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
