"""What a search produced: trial results and fronts, the final re-measured front, reports,
method maps, latency shares per target, co-design, and rebuilding a trial's model."""
