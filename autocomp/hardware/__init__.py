"""Hardware side: target profiles, compiling with TVM, measuring and estimating latency, the
MCU memory model, and the deployable artefacts."""
