"""Behaviour evals that drive the runtime and score what it generates, and their reports."""
