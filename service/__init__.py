"""FastAPI front end: accepts experiment specs and submits them as Ray jobs."""
