"""The library beneath the stages (stages/), by concern: core, data, model, train, evaluation, export, serving and
tools (command-line tools)."""
