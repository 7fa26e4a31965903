"""Building blocks with no project imports: time, durations, backoff, batching, echo."""
