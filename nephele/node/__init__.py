"""nephele.node"""
