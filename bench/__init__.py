"""Benchmarks of bertfast outside the installed library: the suite, first light, render, compare (see README.md)."""
