"""A chat UI that streams tokens from a DirtyApp worker over SSE."""
