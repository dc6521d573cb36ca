"""Guest memory: regions, the address space and its flat view, memory backend objects, and the
interface of memslot consumers.
"""
