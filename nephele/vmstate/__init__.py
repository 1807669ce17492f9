"""nephele.vmstate"""
