"""What runs per token: host store, transfer engine, cache and policies, the call schedule, expert compute."""
