"""Microcontrollers: the static kernel schedule, its C code, the cross toolchain, peak SRAM
and flash, and the bare-metal artefact."""
