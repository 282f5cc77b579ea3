"""The HTTP surface: OpenAI-compatible routes, admin and dashboard routes, errors, SSE framing."""
