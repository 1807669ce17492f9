"""nephele: declarative VM placement across edge cloudlets, with WAN-optimized live handoff."""

__version__ = "0.1.0"
