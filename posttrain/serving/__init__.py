"""Using a trained model: the OpenAI-compatible server, the arena, generate / chat."""
