"""The stages' shared ground: config, files, tracking, runtime, the stage registry and command line."""
