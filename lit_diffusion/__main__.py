"""`python -m lit_diffusion ...`; also the script that `fabric run` and `torchrun` launch."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # launched as a file path: `fabric run lit_diffusion/__main__.py ...`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_diffusion.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
