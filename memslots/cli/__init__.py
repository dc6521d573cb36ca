"""The memslots command line."""
