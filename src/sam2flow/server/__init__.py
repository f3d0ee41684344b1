"""The dedicated SAM2 inference server (FastAPI on uvicorn)."""
