"""device_bench.py and its requirements.txt, copied to phones as they are (a bundle leaves this file out).

A package only so that pyproject.toml can map this folder into the wheel as `edgetl.assets.device_bench`;
device_bench.py itself never imports edgetl.
"""
