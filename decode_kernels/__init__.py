"""Hot loops of the decode round, as plain torch reference functions.

Each function here is the definition a faster kernel must reproduce exactly; the engine calls these
on every device until a kernel exists for it.
"""
