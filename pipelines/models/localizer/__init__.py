"""HCL-AL-compatible hierarchical CLIP lesion localizer (HCL-AL, Gao et al. 2025).

Public entry points: :class:`~pipelines.models.localizer.model.Localizer` and its outputs.
"""

from pipelines.models.localizer.lesion_mask import LesionBox
from pipelines.models.localizer.model import GEOMETRY_MODES, LesionQuery, Localizer, LocalizerOutput

__all__ = ["GEOMETRY_MODES", "LesionBox", "LesionQuery", "Localizer", "LocalizerOutput"]
