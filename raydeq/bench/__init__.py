"""Side-by-side benchmarks of raydeq against its baselines and peers: `python -m raydeq.bench`."""
