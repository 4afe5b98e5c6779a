"""Passes that write graphs: partition around the cache decision, build the head and the variants."""
