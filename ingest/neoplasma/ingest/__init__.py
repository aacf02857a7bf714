"""Ingest: plasma's publishers unchanged, their Redis Pub/Sub messages read into the cluster."""
