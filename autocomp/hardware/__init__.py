"""Hardware side: target profiles, lowering to TVM, and latency measurement."""
