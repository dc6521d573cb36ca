"""Test tooling (fuzzers) that the product never imports."""
