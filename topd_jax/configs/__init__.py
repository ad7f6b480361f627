"""Run configs shipped inside the package (so an installed wheel has its embedded demo).

``configs/demo.yaml`` at the repository root is a link to ``demo.yaml`` here.
"""

from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"
