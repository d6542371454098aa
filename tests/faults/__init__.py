"""Fault injection at every file operation of an edgetl stage: an LD_PRELOAD shim (faultshim.c) and the harness
that runs a stage under it and checks that a failure never costs the user a good result (harness.py)."""
