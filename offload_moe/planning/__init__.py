"""Offline tools: the memory planner, the performance model, and the replay of routing traces."""
