"""nephele.cloudlet"""
