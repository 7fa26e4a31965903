"""The background control loop: the reconciler and its thread."""
