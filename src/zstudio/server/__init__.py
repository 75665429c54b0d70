"""The studio server: FastAPI app, job queue, SQLite history and Gradio UI."""
