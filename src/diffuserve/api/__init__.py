"""HTTP layer: FastAPI app, thin routes, auth, request ids, the error envelope and Prometheus metrics."""
