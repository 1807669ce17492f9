"""nephele.cli"""
