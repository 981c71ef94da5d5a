"""The ground every step stands on: the model protocol and loading, hooks, forward passes and
generation, the attention maths, spans and prompts, one validation per concept, io and errors.

Imports nothing from the rest of focuslens.
"""

from __future__ import annotations

from . import errors, io, checks, models, hooks, forward, generation, attention, prompts
from .errors import *  # noqa: F401,F403
from .io import *  # noqa: F401,F403
from .version import __version__  # noqa: F401
from .checks import *  # noqa: F401,F403
from .models import *  # noqa: F401,F403
from .hooks import *  # noqa: F401,F403
from .forward import *  # noqa: F401,F403
from .generation import *  # noqa: F401,F403
from .attention import *  # noqa: F401,F403
from .prompts import *  # noqa: F401,F403

# each module's own __all__, in the order above
__all__ = [*errors.__all__, *io.__all__, *checks.__all__, *models.__all__, *hooks.__all__, *forward.__all__, *generation.__all__, *attention.__all__, *prompts.__all__] + ["__version__"]
