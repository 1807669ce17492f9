"""nephele.handoff"""
