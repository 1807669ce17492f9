"""nephele.reconcile"""
