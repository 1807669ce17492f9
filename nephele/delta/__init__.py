"""nephele.delta"""
