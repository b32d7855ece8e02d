"""`python -m bench.noise`: how much each metric of a grid moves under float noise and across seeds; the
regression check's windows come from it. The measurement and its page live in bench/studies/noise.py."""

import sys

from bench.studies.noise import main

if __name__ == "__main__":
    sys.exit(main())
