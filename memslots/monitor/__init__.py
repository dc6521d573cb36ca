"""memslots run: the QMP server and commands, Prometheus metrics, the client side."""
