"""nephele.manifest"""
