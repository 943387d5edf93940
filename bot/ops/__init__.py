"""Operations: Prometheus metrics, health checks and the optional loopback HTTP endpoints."""
