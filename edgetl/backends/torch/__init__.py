"""The torch backend: the only package in edgetl that imports torch and its ecosystem."""

import os

# torch's CPU kernels run on OpenMP threads that by default wait for work by spinning. On a machine whose cores
# other processes also use (a laptop, a shared host), spinning threads steal each other's time slices: a
# training step with two threads on two busy cores measured 10-20x slower than with one (2026-12-06, this
# project's 2-core host at load 7), and 1.3-7x faster again with passive waiting. Set before torch loads
# OpenMP; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
