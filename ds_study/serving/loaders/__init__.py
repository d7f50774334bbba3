"""What moves a run's items (transition E, reused KV) to the receiver: one module per loader."""
