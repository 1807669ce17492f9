"""nephele.agent"""
