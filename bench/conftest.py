"""Make an in-place build of the core (src/fastetcd/_core*.so) importable without installing the project."""
import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent / "src"
if list((_SRC / "fastetcd").glob("_core*.so")) and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))
