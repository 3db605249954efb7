"""Training: configs with YAML and command-line overrides, optimizer and schedule, atomic DCP
checkpoints with exact resume, metrics, and the loop that ties them together."""
