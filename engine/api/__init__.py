"""The ASGI application: OCI distribution routes and cairn's own endpoints."""
