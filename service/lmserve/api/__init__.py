"""The API layer: everything that knows HTTP (and, later, gRPC). Nothing below it does.

errors.py (one error table), auth.py, limits.py, generation.py (transport-neutral generation flow),
schemas.py + openai_format.py (OpenAI shapes), middleware.py and http.py (the FastAPI app).
"""
