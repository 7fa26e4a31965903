"""What every server process does, whatever its role: stop on signals, listen
on its ports, serve its metrics."""
