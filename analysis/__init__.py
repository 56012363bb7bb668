"""The maths behind ``scripts/compare.py``, importable and testable without the command line.

- ``runs``     finding, loading, labelling and grouping runs (through ``engine.run_dir``)
- ``speedup``  curves on four cost axes and the speed-up at matched loss
- ``scaling``  model size, loss against size and FLOPs, the size at which one line matches another
- ``plots``    the figures (matplotlib, imported when drawing)
- ``units``    SI-prefixed numbers for labels and notes
"""
