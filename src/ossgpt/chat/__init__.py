"""Chatting with a model: the Harmony format of gpt-oss (harmony.py) and the terminal chat session (session.py)."""
