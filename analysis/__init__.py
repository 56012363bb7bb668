"""The maths behind ``scripts/compare.py``, importable and testable without the command line.

- ``runs``        finding, loading, labelling and grouping runs (through ``engine.run_dir``), and
                  setting diverged runs apart (``engine.instability``'s rule)
- ``speedup``     curves on four cost axes and the speed-up at matched loss
- ``scaling``     model size, loss against size and FLOPs, the size at which one line matches another
- ``verdicts``    Welch's t-test between seed groups: the difference of final losses, its 95% interval, p
- ``sensitivity`` final loss against ``optimizer.lr`` per optimizer: best lr, width of the flat range
- ``horizons``    final loss against tokens over horizons per line: a fitted power law, the token ratio
                  at which two lines reach equal loss
- ``plots``       the figures (matplotlib, imported when drawing)
- ``units``       SI-prefixed numbers for labels and notes
"""
