"""Small helpers with no iropt dependencies: name suggestions, importing user code by path.
Imports: nothing of iropt's but iropt.errors.
"""
