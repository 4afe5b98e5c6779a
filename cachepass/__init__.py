"""cachepass: a torch.compile backend that skips redundant diffusion-denoiser work, as a compiler pass.

    pipe.transformer = torch.compile(pipe.transformer, backend="cachepass", options={"policy": "interval"})
"""

from __future__ import annotations

from .api import explain, reset, stats
from .backend import backend, cachepass_backend
from .calibration import calibrate
from .errors import OptionError
from .policies import POLICIES

__version__ = "0.1.0"
__all__ = ["backend", "cachepass_backend", "calibrate", "explain", "reset", "stats", "OptionError", "POLICIES", "__version__"]
