"""Content-addressed blob storage and upload staging."""

from engine.blobs.store import BlobStore, StagedBlob, is_upload_id

__all__ = ["BlobStore", "StagedBlob", "is_upload_id"]
