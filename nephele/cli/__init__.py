"""Thin command-line front ends: `nephele` (declarative) and `nephele-client` (the original tool's)."""
