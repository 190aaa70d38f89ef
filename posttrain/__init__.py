"""The library beneath the stages (stages/): what they share, once, and the tools as entry points."""
