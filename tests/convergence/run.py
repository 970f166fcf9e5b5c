"""``python tests/convergence/run.py --seed S --minutes M --nodes K --profile P``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.convergence.cli import main

raise SystemExit(main())
