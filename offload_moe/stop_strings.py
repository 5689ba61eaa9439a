"""Stop strings: where a reply ends, and how much of a growing reply is still undecided.

Shared by `OffloadedModel.stream()` and the server's streaming, so a streamed reply joins to
exactly the reply returned whole.
"""

from __future__ import annotations


def stop_list(stop: str | list[str] | None) -> list[str]:
    """`stop` (a string, a list of strings or None) as a list of its non-empty strings."""
    return [s for s in ([stop] if isinstance(stop, str) else (stop or [])) if s]


def cut_at_stop(text: str, stop: str | list[str] | None) -> str:
    """`text` cut before the first occurrence of any stop string."""
    cut = len(text)
    for s in stop_list(stop):
        found = text.find(s)
        if found != -1:
            cut = min(cut, found)
    return text[:cut]


def stop_prefix_length(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (still undecided)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
