"""Read-only passes over a Dynamo graph: blocks, regions, residual stream, timestep, indicators."""
