"""Views built from the log: updated inline with each append, rebuildable."""

from engine.projections.activity import ActivityProjection
from engine.projections.base import Projection, apply_events, checkpoints
from engine.projections.blob_links import BlobLinkProjection
from engine.projections.catalog import CatalogProjection
from engine.projections.manifests import ManifestProjection, ReferrerProjection
from engine.projections.tags import TagHistoryProjection, TagProjection

ALL_PROJECTIONS: tuple[Projection, ...] = (
    CatalogProjection(),
    BlobLinkProjection(),
    ManifestProjection(),
    ReferrerProjection(),
    TagProjection(),
    TagHistoryProjection(),
    ActivityProjection(),
)

__all__ = ["ALL_PROJECTIONS", "Projection", "apply_events", "checkpoints"]
