"""Script registry: versioned scripts in MinIO, a PostgreSQL catalog, and the registry-fn API."""
