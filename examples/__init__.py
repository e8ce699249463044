"""Runnable examples (each also a function the tests call on 2 gloo ranks)."""
